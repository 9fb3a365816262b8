"""User errors are one line: what is wrong, with which key or file, and what to do. No traceback.

A mistake in what the user typed or pointed at (a config value, a file in the wrong format, an out_dir that holds
another run) raises UserError, the project's own error type (a ValueError, so `except ValueError` still catches
it), or an OSError about a file (missing, a folder where a file belongs, no permission, a full disk), whose message
says it all. Every command-line tool calls `report_user_errors(argv)` first: such an exception then ends the
program with `error: <message>` on stderr and exit code 1. Anything else, a ValueError or TypeError from deep
inside a library included, is a bug and keeps Python's full traceback; so does every error with `--debug` on the
command line or NANOLORA_DEBUG=1 in the environment.
"""
import errno
import os
import sys

DEBUG_ENV = "NANOLORA_DEBUG"
DEBUG_FLAG = "--debug"


class UserError(ValueError):
    """Something the user can fix, said in one line that names it and what to do."""


# what a user's files and machine can cause besides a UserError
FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)
MACHINE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)  # a full disk, a read-only one, a quota


def is_user_error(error):
    if isinstance(error, (UserError, *FILE_ERRORS)):
        return True
    return isinstance(error, OSError) and error.errno in MACHINE_ERRNOS


def one_line(error):
    message = " ".join(str(error).split())  # one line, even for a multi-line message
    if isinstance(error, OSError) and error.errno in MACHINE_ERRNOS:
        message += ": free some space or choose a writable folder" if error.errno != errno.EROFS else \
            ": choose a writable folder"
    return message


def report_user_errors(argv):
    """Install the one-line reporting (unless debugging) and return argv without --debug."""
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if not debug and getattr(sys.excepthook, "__name__", "") != "_one_line_hook":
        previous = sys.excepthook

        def _one_line_hook(kind, error, tb):
            if not is_user_error(error):
                return previous(kind, error, tb)
            if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: say it once
                print(f"error: {one_line(error)} (run with {DEBUG_FLAG} or {DEBUG_ENV}=1 for the traceback)",
                      file=sys.stderr)

        sys.excepthook = _one_line_hook
    return [a for a in argv if a != DEBUG_FLAG]

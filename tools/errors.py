"""User errors are one line: what is wrong, with which key or file, and what to do. No traceback.

A mistake in what the user typed or pointed at (a config value, a file in the wrong format, an out_dir that holds
another run) raises a ValueError or an OSError about a file, whose message says it all. The command-line scripts
call `report_user_errors(argv)` first: such an exception then ends the program with `error: <message>` on stderr
and exit code 1. Anything else (a bug) keeps Python's full traceback, and so does every error with `--debug` on
the command line or NANOLORA_DEBUG=1 in the environment.
"""
import os
import sys

DEBUG_ENV = "NANOLORA_DEBUG"
DEBUG_FLAG = "--debug"
# what a user's input can cause; a RuntimeError, IndexError, AssertionError ... is a bug and keeps its traceback
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def report_user_errors(argv):
    """Install the one-line reporting (unless debugging) and return argv without --debug."""
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if not debug and getattr(sys.excepthook, "__name__", "") != "_one_line_hook":
        previous = sys.excepthook

        def _one_line_hook(kind, error, tb):
            if not issubclass(kind, USER_ERRORS):
                return previous(kind, error, tb)
            if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: say it once
                message = " ".join(str(error).split("\n"))  # one line, even for a multi-line message
                print(f"error: {message} (run with {DEBUG_FLAG} or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)

        sys.excepthook = _one_line_hook
    return [a for a in argv if a != DEBUG_FLAG]

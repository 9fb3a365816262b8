"""Atomic file writes: write to a temp file in the same folder, then rename.

A crash (or Ctrl-C) halfway through a save must never leave a truncated checkpoint,
adapter or data shard that looks finished. os.replace is atomic on POSIX and Windows
when source and target are on the same filesystem, which a sibling temp file guarantees.
A process killed outright (SIGKILL, out of memory) cannot delete its temp file: the next
run that writes into the folder removes it with remove_stale_temps.

A whole folder is built the same way (temp_folder: a hidden sibling, renamed into place at the end). While its
maker lives it holds a lock on the folder's .lock file (flock: the kernel drops it when the process dies, however
it dies), so remove_stale_temp_folders deletes only the temp folders of processes that are gone.

A full disk shows up in writers as anything but a clear message (torch.save: "RuntimeError: [enforce fail at
inline_container.cc] unexpected pos"; safetensors: SafetensorError; numpy: "OSError: 100000 requested and 22464
written", without errno): atomic_path turns such a failure into OSError(ENOSPC) naming the file, which
tools/errors.py reports in one line.
"""
import errno
import fcntl
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager

# the temp names a killed write leaves: atomic_path's (mkstemp: .NAME.XXXXXXXX.tmp), and those of safetensors'
# save_file, which writes its own temp file (.tmpXXXXXX) and renames it, inside ours
TEMP_NAME = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp|\.tmp[A-Za-z0-9]{6}")
LOCK_NAME = ".lock"
# how writers word a failed write when they do not raise the OSError itself
WRITE_FAILED = re.compile(r"unexpected pos|file write failed|failed writing|requested and \d+ written|No space left|"
                          r"os error 28|Disk quota exceeded|os error 122|Read-only file system|os error 30")


@contextmanager
def atomic_path(path):
    """Yield a temp path next to `path`; on success rename it over `path`, on error delete it.

        with atomic_path("out/ckpt.pt") as tmp:
            torch.save(obj, tmp)
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=folder)
    except OSError as e:  # name the file being written, not the temp file
        raise type(e)(e.errno, f"cannot write {path}: {e.strerror}") from None
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes the file owner-only, and some writers (safetensors) replace it by their own owner-only
        # file: give the finished file a normal file's permissions, as the umask says, just before the rename
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        failure = write_failure(e, path, folder)
        if failure is not None:
            raise failure from e
        raise


def write_failure(error, path, folder):
    """An OSError(ENOSPC | EDQUOT | EROFS) naming `path` when `error` is a writer's own wording of a failed write
    (torch.save on a full disk: RuntimeError 'unexpected pos'), else None."""
    already_clear = isinstance(error, OSError) and error.errno is not None  # numpy's short write has no errno
    if already_clear or not isinstance(error, Exception) or not WRITE_FAILED.search(str(error)):
        return None
    text = str(error)
    if "Read-only" in text or "os error 30" in text:
        return OSError(errno.EROFS, f"cannot write {path}: read-only file system")
    if "quota" in text or "os error 122" in text:
        return OSError(errno.EDQUOT, f"cannot write {path}: disk quota exceeded")
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = 0
    if "No space" in text or "os error 28" in text or free < 64 * 2**20:
        return OSError(errno.ENOSPC, f"cannot write {path}: disk full ({free / 2**20:,.1f} MiB free)")
    return None


def remove_stale_temps(folder):
    """Delete the temp files that killed atomic writes left in `folder`; returns their names."""
    if not os.path.isdir(folder):
        return []
    stale = sorted(name for name in os.listdir(folder)
                   if TEMP_NAME.fullmatch(name) and os.path.isfile(os.path.join(folder, name)))
    for name in stale:
        os.remove(os.path.join(folder, name))
    return stale


# ---- folders ------------------------------------------------------------------------------------------------------
def try_lock(path):
    """An open fd holding an exclusive flock on `path` (created if missing), or None when another process holds it.
    The lock lasts until the fd is closed or the process ends, whichever way it ends."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def lock_file(path):
    """try_lock(path) for a lock file that its holder removes when done (unlock_file): a process that locked the
    file just removed locks the new one instead. None when another process holds it."""
    while True:
        fd = try_lock(path)
        if fd is None:
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def unlock_file(path, fd):
    """Remove the lock file, then let go of the lock (lock_file's other half)."""
    try:
        os.unlink(path)
    except OSError:
        pass
    os.close(fd)


def temp_folder_pattern(name):
    """The names temp_folder gives the temp folders of a folder called `name`."""
    return re.compile(re.escape(f".{name}.") + r"[A-Za-z0-9_]{8}\.tmp")


@contextmanager
def temp_folder(path):
    """Yield a new hidden folder next to `path` (.NAME.XXXXXXXX.tmp), locked while this process lives; removed on
    error and at the end. The caller moves what it built into place before leaving the block: its files one by one
    (os.replace), or the whole folder with rename_folder."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    try:
        tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    except OSError as e:  # name the folder being written, not the temp folder
        raise type(e)(e.errno, f"cannot write {path}: {e.strerror}") from None
    fd = try_lock(os.path.join(tmp, LOCK_NAME))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)
        if os.path.isdir(tmp):  # the caller moved its contents out: the empty folder (and its lock) go
            shutil.rmtree(tmp, ignore_errors=True)


def rename_folder(tmp, path):
    """Rename temp_folder's `tmp` to `path` (which must not exist), without its lock file."""
    os.remove(os.path.join(tmp, LOCK_NAME))
    os.rename(tmp, path)


def remove_stale_temp_folders(path, min_age_s=60):
    """Delete the temp folders of `path` (temp_folder's) whose maker is gone; returns their names. A folder without
    its lock file is only taken for stale once older than min_age_s (its maker may be about to lock it)."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    if not os.path.isdir(parent):
        return []
    pattern, stale = temp_folder_pattern(name), []
    for entry in sorted(os.listdir(parent)):
        folder = os.path.join(parent, entry)
        if not pattern.fullmatch(entry) or not os.path.isdir(folder) or os.path.islink(folder):
            continue
        lock = os.path.join(folder, LOCK_NAME)
        if not os.path.exists(lock):
            if time.time() - os.path.getmtime(folder) < min_age_s:
                continue
            fd = None
        else:
            fd = try_lock(lock)
            if fd is None:  # its maker is running
                continue
        try:
            shutil.rmtree(folder)
        finally:
            if fd is not None:
                os.close(fd)
        stale.append(entry)
    return stale


def current_umask():
    """The process's umask (os.umask can only be read by setting it, so it is set back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask

"""Atomic file writes: write to a temp file in the same folder, then rename.

A crash (or Ctrl-C) halfway through a save must never leave a truncated checkpoint,
adapter or data shard that looks finished. os.replace is atomic on POSIX and Windows
when source and target are on the same filesystem, which a sibling temp file guarantees.
A process killed outright (SIGKILL, out of memory) cannot delete its temp file: the next
run that writes into the folder removes it with remove_stale_temps.
"""
import os
import re
import tempfile
from contextlib import contextmanager

# the temp names a killed write leaves: atomic_path's (mkstemp: .NAME.XXXXXXXX.tmp), and those of safetensors'
# save_file, which writes its own temp file (.tmpXXXXXX) and renames it, inside ours
TEMP_NAME = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp|\.tmp[A-Za-z0-9]{6}")


@contextmanager
def atomic_path(path):
    """Yield a temp path next to `path`; on success rename it over `path`, on error delete it.

        with atomic_path("out/ckpt.pt") as tmp:
            torch.save(obj, tmp)
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes the file owner-only, and some writers (safetensors) replace it by their own owner-only
        # file: give the finished file a normal file's permissions, as the umask says, just before the rename
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale_temps(folder):
    """Delete the temp files that killed atomic writes left in `folder`; returns their names."""
    if not os.path.isdir(folder):
        return []
    stale = sorted(name for name in os.listdir(folder) if TEMP_NAME.fullmatch(name))
    for name in stale:
        os.remove(os.path.join(folder, name))
    return stale


def current_umask():
    """The process's umask (os.umask can only be read by setting it, so it is set back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask

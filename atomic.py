"""Atomic file writes: write to a temp file in the same folder, then rename.

A crash (or Ctrl-C) halfway through a save must never leave a truncated checkpoint,
adapter or data shard that looks finished. os.replace is atomic on POSIX and Windows
when source and target are on the same filesystem, which a sibling temp file guarantees.
"""
import os
import tempfile
from contextlib import contextmanager


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
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file owner-only; give it a normal file's permissions
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

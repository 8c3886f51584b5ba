"""Temporary files for atomic writes, with the permissions of a normal file; file checksums;
a lock file per folder.

``tempfile.mkstemp`` creates files readable by their owner only (0600). An
output renamed into place from such a file would keep that mode, and a
colleague opening the GeoPackage from a shared disk would be refused. The
temporary files here get ``0666`` minus the process umask, like any file
the user creates.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile


def _file_mode() -> int:
    # os.umask can only be read by setting it: do it once, at import, not while
    # other threads (Dask tasks) may be creating files
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _file_mode()


def mkstemp(*, prefix: str, suffix: str = "", dir: str | os.PathLike[str]) -> tuple[int, str]:  # noqa: A002
    """``tempfile.mkstemp`` with the mode a new file would get (0666 minus the umask)."""
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=dir)
    with contextlib.suppress(OSError):  # file systems without permissions
        os.fchmod(fd, _MODE)
    return fd, path


# -- checksums ---------------------------------------------------------------
def file_record(path: str | os.PathLike[str]) -> dict[str, int | str]:
    """``{"bytes": size, "sha256": hex digest}`` of a file, the size taken from the open file
    that is hashed (the two describe the same bytes)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    return {"bytes": size, "sha256": digest}


# -- a lock per folder ------------------------------------------------------------
class LockHeld(Exception):
    """Another open file (another process, or another open in this one) holds the lock."""


def acquire_lock(path: str | os.PathLike[str]) -> int:
    """An exclusive, non-blocking ``flock`` on ``path`` (created if needed); returns its descriptor.

    Raises :class:`LockHeld` when another holder has it, ``OSError`` when the file cannot be
    created or the file system cannot lock (``ImportError`` where there is no ``fcntl``). The OS
    drops the lock when its holder exits, crashed or not. :func:`release_lock` removes the file
    while the lock is held; a process that opened the old file before that and locks it after
    finds the path gone or pointing to another file and locks the new one instead.
    """
    import fcntl

    path = os.fspath(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), _MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(path) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            held, now = os.fstat(fd), os.stat(path)
            current = (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)
        except FileNotFoundError:
            current = False
        if current:
            return fd
        os.close(fd)  # its previous holder removed it: lock the file now at ``path``


def release_lock(fd: int, path: str | os.PathLike[str]) -> None:
    """Remove the lock file (still holding it), then release the lock."""
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    finally:
        os.close(fd)

"""Temporary files for atomic writes, with the permissions of a normal file; file checksums;
a lock file per folder; what to say when a write fails (a full disk, a file size limit).

``tempfile.mkstemp`` creates files readable by their owner only (0600). An
output renamed into place from such a file would keep that mode, and a
colleague opening the GeoPackage from a shared disk would be refused. The
temporary files here get ``0666`` minus the process umask, like any file
the user creates.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from pipeline.core.errors import DiskFull, FileSizeLimit, OutputError

log = logging.getLogger(__name__)


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
def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """Hex digest of a file with the :mod:`hashlib` ``algorithm`` (hashlib releases the GIL, so
    files hash in parallel in threads)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, algorithm).hexdigest()


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


# -- failed writes ------------------------------------------------------------------
class WriteCheckFailed(Exception):
    """A file read back before it is renamed into place is not what was written (truncated,
    blocks missing, not readable): the writing library did not report its failure."""


#: errno values that mean "no room on the device" (a quota counts as no room).
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: How the libraries say it when they do not pass the errno on (GDAL's libtiff messages carry
#: strerror's text, SQLite says SQLITE_FULL in words).
_NO_SPACE_TEXT = ("no space left on device", "database or disk is full", "disk quota exceeded")
_TOO_LARGE_TEXT = ("file too large",)
#: A write failure without an errno counts as a full disk when less than this much (plus the
#: size of the file being written, where known) is free on the output's file system: the
#: failing write, a library's own temporary files or another process's writes can have needed
#: it; what is free once they gave up is no measure of what they needed.
LOW_SPACE_MARGIN = 64 * 2**20


def _errnos(exc: BaseException | None) -> set[int]:
    found: set[int] = set()
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and isinstance(exc.errno, int):
            found.add(exc.errno)
        exc = exc.__cause__ or exc.__context__
    return found


def free_bytes(folder: str | os.PathLike[str]) -> int | None:
    """Bytes this process may still write on ``folder``'s file system (``shutil.disk_usage``:
    what is free for unprivileged users), ``None`` where it cannot be asked."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def file_size_limit() -> int | None:
    """This process's file size limit in bytes (``ulimit -f``, ``RLIMIT_FSIZE``), ``None`` without one."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def megabytes(n: int) -> str:
    """``n`` bytes in MB (10^6 bytes), with a decimal under 100 MB; in GB from 10 GB."""
    if n >= 10e9:
        return f"{n / 1e9:.0f} GB"
    return f"{n / 1e6:.1f} MB" if n < 100e6 else f"{n / 1e6:.0f} MB"


def _size(path: str | os.PathLike[str]) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def write_failure(path: str | os.PathLike[str], detail: str, exc: BaseException | None = None, *,
                  needed: int = 0, written: Iterable[str | os.PathLike[str]] = (),
                  what: str = "cannot write") -> OutputError:
    """The error to raise when writing ``path`` (the final path, not the temporary) failed.

    Call it before the partial files are removed (their space counts as used). ``detail`` is
    what the library said, or what the read-back check found; ``exc`` the exception, if any
    (its errno and those of its causes are looked at); ``needed`` the size of the file still to
    be written, where known (a COG about as large as its source); ``written`` the partial files
    (to compare with a file size limit).

    - :class:`~pipeline.core.errors.DiskFull` when the errno or the message says the device is full
      (``ENOSPC``, ``EDQUOT``, SQLite's ``database or disk is full``), or when nothing says so
      but less than :data:`LOW_SPACE_MARGIN` plus ``needed`` is free (GDAL's COG driver with
      several threads, for one, writes a truncated file and reports nothing);
    - :class:`~pipeline.core.errors.FileSizeLimit` when the errno or the message says ``EFBIG``
      (the process's ``ulimit -f``), or when the process has such a limit and a partial file has
      reached it; "probably" when it has one and nothing else explains the failure (no errno, or
      ``EIO``: SQLite says "disk I/O error" and shrinks its file back);
    - else an :class:`~pipeline.core.errors.OutputError` with ``what``, the path and the detail.

    The first two name the folder, the file and the free space, and say what to do; the
    library's own words go to the debug log.
    """
    path = Path(path)
    folder = path.parent
    text = f"{detail} {exc if exc is not None else ''}".lower()
    codes = _errnos(exc)
    free = free_bytes(folder)
    limit = file_size_limit()
    no_space = bool(codes & NO_SPACE_ERRNOS) or any(t in text for t in _NO_SPACE_TEXT)
    too_large = errno.EFBIG in codes or any(t in text for t in _TOO_LARGE_TEXT)
    maybe_too_large = False
    if not (no_space or too_large):
        if free is not None and free < LOW_SPACE_MARGIN + needed:
            no_space = True
        elif limit is not None and any(_size(p) >= limit for p in (path, *written)):
            too_large = True
        elif limit is not None and codes <= {errno.EIO}:
            # SQLite says "disk I/O error" for EFBIG and truncates its file back on rollback
            maybe_too_large = True
    if no_space or too_large:
        log.debug("writing %s failed: %s", path, detail)
    where = f"{megabytes(free)} free" if free is not None else "free space unknown"
    if no_space:
        return DiskFull(
            f"{folder}: no space left on the device while writing {path.name} ({where}); free space "
            "there or choose another output folder (output.dir, or --out for stack)",
            folder=str(folder), file=path.name, free_bytes=free)
    if too_large or maybe_too_large:
        cap = f" of {megabytes(limit)}" if limit is not None else ""
        how, said = ("stopped", "") if too_large else ("probably stopped", f"{detail}; ")
        return FileSizeLimit(
            f"{folder}: the file size limit{cap} of this process (ulimit -f) {how} the writing of "
            f"{path.name} ({said}{where} on the device); raise the limit (ulimit -f unlimited) or choose "
            "smaller outputs",
            folder=str(folder), file=path.name, free_bytes=free)
    return OutputError(f"{path}: {what} ({detail})")


def _sync_folder(folder: Path) -> None:
    """Flush a rename in ``folder`` to the disk (best effort: not every file system can)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def folder_failure(exc: OSError, path: str | os.PathLike[str], message: str) -> OutputError:
    """The error for ``exc``, raised while preparing to write ``path`` (creating its folder or a
    temporary file): :func:`write_failure`'s when the device is full, else ``message``."""
    if exc.errno in NO_SPACE_ERRNOS:
        return write_failure(path, exc.strerror or str(exc), exc)
    return OutputError(message)


def write_atomic(path: str | os.PathLike[str], data: bytes, *, prefix: str | None = None,
                 suffix: str = ".tmp") -> None:
    """Write ``data`` to a temporary file beside ``path``, check that the file holds all of it,
    flush it to the disk (``fsync``: after a power cut ``path`` holds the old or the new bytes, not
    an empty file), and rename it into place. Raises :class:`~pipeline.core.errors.DiskFull`,
    :class:`~pipeline.core.errors.FileSizeLimit` or :class:`~pipeline.core.errors.OutputError` (see
    :func:`write_failure`); then the temporary file is gone and ``path`` untouched."""
    path = Path(path)
    try:
        fd, tmp = mkstemp(prefix=prefix if prefix is not None else f".{path.name}.", suffix=suffix,
                          dir=path.parent)
    except OSError as exc:
        raise write_failure(path, exc.strerror or str(exc), exc, needed=len(data),
                            what="cannot create a temporary file beside it") from None
    failure: OutputError | None = None
    try:
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
                size = os.fstat(fh.fileno()).st_size
            if size != len(data):
                raise WriteCheckFailed(f"the file holds {size} of the {len(data)} bytes written")
            os.replace(tmp, path)
            _sync_folder(path.parent)
        except (OSError, WriteCheckFailed) as exc:
            failure = write_failure(path, str(exc), exc, needed=len(data), written=[tmp])
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if failure is not None:
        Path(tmp).unlink(missing_ok=True)
        raise failure

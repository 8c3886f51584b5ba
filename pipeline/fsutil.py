"""Temporary files for atomic writes, with the permissions of a normal file.

``tempfile.mkstemp`` creates files readable by their owner only (0600). An
output renamed into place from such a file would keep that mode, and a
colleague opening the GeoPackage from a shared disk would be refused. The
temporary files here get ``0666`` minus the process umask, like any file
the user creates.
"""

from __future__ import annotations

import contextlib
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

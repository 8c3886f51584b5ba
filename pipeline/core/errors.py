"""Errors raised by the pipeline.

One root class, :class:`PipelineError`, and specific classes that also inherit
the matching built-in so callers can catch either (``except ValueError`` keeps
working). Every message should say what to do: which file, which field, what
was expected.
"""

from __future__ import annotations

import errno as _errno


class PipelineError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(PipelineError, ValueError):
    """A configuration file is malformed or holds an invalid value."""


class InputError(PipelineError, OSError):
    """An input file is missing, unreadable, corrupt or lacks georeferencing."""


class GridError(PipelineError, ValueError):
    """Two layers do not overlap, or a grid cannot be built as asked."""


class ChannelError(PipelineError, ValueError):
    """The inputs cannot supply a channel that a model needs."""


class ModelError(PipelineError, ValueError):
    """A model artefact is malformed, incompatible or cannot be built."""


class OutputError(PipelineError, OSError):
    """An output cannot be written (permissions, disk, existing files)."""


class DiskFull(OutputError):
    """An output could not be written because its file system ran out of room.

    Raised instead of whatever the writing library said (a GDAL "Write failed", SQLite's
    "database or disk is full", pyogrio's "Failed to commit transaction", ``[Errno 28]``), with
    one message that names the output folder, the file and the free space. ``errno`` is
    ``ENOSPC``; ``folder``, ``file`` and ``free_bytes`` (``None`` where unknown) say where. The
    partial file has been removed; files already at their final paths are untouched.
    """

    def __init__(self, message: str, *, folder: str | None = None, file: str | None = None,
                 free_bytes: int | None = None) -> None:
        super().__init__(message)
        self.errno = _errno.ENOSPC
        self.folder = folder
        self.file = file
        self.free_bytes = free_bytes

    def __str__(self) -> str:  # OSError's own would show "[Errno 28] ..." once errno is set
        return str(self.args[0]) if self.args else ""


class FileSizeLimit(DiskFull):
    """Like :class:`DiskFull`, but what ran out is the process's file size limit
    (``ulimit -f``, ``RLIMIT_FSIZE``: writes beyond it fail with ``EFBIG``), not the disk.
    ``errno`` is ``EFBIG``."""

    def __init__(self, message: str, *, folder: str | None = None, file: str | None = None,
                 free_bytes: int | None = None) -> None:
        super().__init__(message, folder=folder, file=file, free_bytes=free_bytes)
        self.errno = _errno.EFBIG

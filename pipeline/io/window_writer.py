"""Storing dask blocks into a tiled GeoTIFF: the ``da.store`` target, its lock and the tile size."""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.windows import Window

from pipeline.core import fsutil
from pipeline.core.errors import DiskFull, OutputError
from pipeline.io.gdal import error_detail


class WindowWriter:
    """``da.store`` target: ``target[region] = block`` writes a window of a GeoTIFF.

    Holds only the path, so it can be sent to distributed workers on the same
    file system; each write reopens the file in update mode under the lock.
    ``final`` is the path the file becomes, named in errors.
    """

    def __init__(self, path: Path, ndim: int, final: Path | None = None) -> None:
        self.path = str(path)
        self.ndim = ndim
        self.final = str(final or path)

    def __setitem__(self, key: tuple[slice, ...], value: np.ndarray) -> None:
        rows, cols = key[-2], key[-1]
        window = Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start)
        failure: OutputError | None = None
        try:
            with rasterio.open(self.path, "r+") as dst:
                if self.ndim == 2:
                    dst.write(value, 1, window=window)
                else:
                    bands = key[0]
                    indexes = list(range(bands.start + 1, bands.stop + 1))
                    dst.write(value, indexes, window=window)
        except (RasterioError, OSError) as exc:
            failure = fsutil.write_failure(self.final, error_detail(exc), exc, written=[self.path],
                                           what=f"cannot write block {window} of {self.path}")
        if failure is not None:  # raised outside the except block so it pickles from workers
            if isinstance(failure, DiskFull):
                _quiet_worker_report()
            raise failure


_QUIET = False


class _DropDiskFullReports:
    """Logging filter for a Dask worker's ``Compute Failed`` report (with the task's traceback)
    of a :class:`DiskFull`: the error itself reaches the client, which says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (str(record.msg).startswith("Compute Failed")
                    and any(isinstance(a, str) and a.startswith(("DiskFull(", "FileSizeLimit(")) for a in args))


def _quiet_worker_report() -> None:
    global _QUIET  # noqa: PLW0603 - once per process
    if not _QUIET:
        _QUIET = True
        logging.getLogger("distributed.worker").addFilter(_DropDiskFullReports())


def tile_for(chunks: tuple[tuple[int, ...], ...]) -> int:
    """Tile edge of a temporary GeoTIFF stored from blocks of these ``chunks``: every chunk border
    falls on a tile border, so no tile is written twice. The chunk size itself when all chunks
    share one that is a multiple of 16 (one tile per block: small tiles are slow to write), else
    the largest such edge <= 512."""
    inner = [c for axis in chunks for c in axis[:-1]]
    sizes = set(inner)
    if len(sizes) == 1 and (size := sizes.pop()) % 16 == 0 and size <= 4096:
        return size
    for size in (512, 256, 128, 64, 32, 16):
        if all(c % size == 0 for c in inner):
            return size
    return 16


def store_lock() -> Any:
    """A lock valid for the active scheduler (distributed lock when a client is running)."""
    try:
        from distributed import Lock, get_client

        get_client()
        return Lock(f"cog-writer-{uuid.uuid4().hex}")
    except (ImportError, ValueError):
        return threading.Lock()

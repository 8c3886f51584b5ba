"""Read-back check of a GeoTIFF (or COG) just written: its size, bands, type and every block.

GDAL's COG driver with more than one thread does not report a failed write (a
full disk gives a truncated file and no error), so every raster is read back
before it moves into place.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rasterio
from rasterio.enums import Interleaving
from rasterio.errors import RasterioError
from rasterio.windows import Window

from pipeline.core import fsutil
from pipeline.core.fsutil import WriteCheckFailed
from pipeline.io.gdal import error_detail


@dataclass(frozen=True)
class RasterLayout:
    """What a raster written should be: its size, band count and data type."""

    width: int
    height: int
    count: int
    dtype: str


def verify_raster(path: str | os.PathLike[str], *, width: int, height: int, count: int, dtype: str,
                  sparse: bool = False) -> None:
    """Read back the structure of a GeoTIFF (or COG) just written, before it moves into place.

    Checks that it opens with the expected size, band count and data type; that every block of
    the full resolution and of each overview lies within the file (offset plus size at most the
    file's size; ``sparse=False``: every block present); and reads the last block in the file of
    each level and band (decompressing it), the one a truncated file loses first. Costs one
    metadata lookup per block and one block read per level. Raises
    :class:`~pipeline.core.fsutil.WriteCheckFailed`.
    """
    path = os.fspath(path)
    try:
        file_size = os.stat(path).st_size
        with rasterio.open(path) as src:
            found = (src.width, src.height, src.count, tuple(src.dtypes))
            if found != (width, height, count, (str(dtype),) * count):
                raise WriteCheckFailed(f"{src.width} x {src.height}, {src.count} band(s) of "
                                       f"{'/'.join(sorted(set(src.dtypes)))} read back, expected {width} x "
                                       f"{height}, {count} of {dtype}")
            levels = len(src.overviews(1))
            _verify_level(src, file_size, sparse, "full resolution")
        for level in range(levels):
            with rasterio.open(path, overview_level=level) as ovr:
                _verify_level(ovr, file_size, sparse, f"overview {level + 1}")
    except (RasterioError, OSError) as exc:
        raise WriteCheckFailed(f"cannot read it back ({error_detail(exc)})") from None


def verify_written(tmp: Path, path: Path, layout: RasterLayout, *, sparse: bool = False, needed: int = 0,
                   written: Sequence[Path] = ()) -> None:
    """:func:`verify_raster` of the temporary ``tmp`` that becomes ``path``; a failure raises the
    error :func:`pipeline.core.fsutil.write_failure` gives (a full disk, else a damaged file)."""
    try:
        verify_raster(tmp, width=layout.width, height=layout.height, count=layout.count, dtype=layout.dtype,
                      sparse=sparse)
    except WriteCheckFailed as exc:
        failure = fsutil.write_failure(path, f"{tmp.name} read back: {exc}", needed=needed, written=written,
                                       what="the file written is incomplete")
    else:
        return
    raise failure


def _verify_level(src: Any, file_size: int, sparse: bool, label: str) -> None:
    separate = src.count > 1 and src.interleaving != Interleaving.pixel  # one tile per band and block
    for band in (range(1, src.count + 1) if separate else [1]):
        last: tuple[int, Window] | None = None
        for (row, col), window in src.block_windows(band):
            offset = src.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=band)
            size = src.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=band)
            if offset is None or size is None:
                if sparse:
                    continue  # never written: all no-data (SPARSE_OK), or a write that failed
                raise WriteCheckFailed(f"{label}: block ({row}, {col}) of band {band} is missing")
            end = int(offset) + int(size)
            if end > file_size:
                raise WriteCheckFailed(f"{label}: block ({row}, {col}) of band {band} ends at byte {end}, "
                                       f"after the end of the file ({file_size} bytes)")
            if last is None or int(offset) > last[0]:
                last = (int(offset), window)
        if last is not None:
            src.read(band if separate else None, window=last[1])

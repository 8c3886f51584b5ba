"""Resampling through GDAL's warper: what the exact upsampling paths leave (downsampling, other methods).

The coordinate transformer is practically exact (:data:`WARP_TOLERANCE`) and
the kernel width is fixed for the whole source, so a destination pixel gets the
same value whichever block it is computed in.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.io import MemoryFile
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from pipeline.core.grid import Grid

if TYPE_CHECKING:
    from pipeline.io.raster_source import RasterSource

#: Maximum error of GDAL's approximate coordinate transformer, in source pixels.
#: GDAL's default (0.125) shifts pixels by up to 1/8 source pixel depending on
#: where a block starts, which would leave seams between blocks; 1e-4 is exact
#: for practical purposes (0 is not accepted by rasterio's WarpedVRT).
WARP_TOLERANCE = 1e-4


def warp_array(src: np.ndarray, src_transform: Affine, src_crs: CRS, grid: Grid,
               resampling: Resampling = Resampling.bilinear,
               scale: tuple[float, float] | None = None) -> np.ndarray:
    """Resample a float32 array (NaN = no data) onto ``grid`` with GDAL's warper.

    The array goes into an in-memory GeoTIFF and is read through a
    :class:`~rasterio.vrt.WarpedVRT` for ``grid``. The coordinate transformer
    is practically exact (:data:`WARP_TOLERANCE`), so a destination pixel gets
    the same value whichever block it is computed in; so does ``scale``
    (destination pixels per source pixel, see
    :meth:`~pipeline.io.raster_source.RasterSource.warp_scale`), which fixes
    the kernel width GDAL uses when downsampling.
    """
    extras = {} if scale is None else {"XSCALE": f"{scale[0]:.12g}", "YSCALE": f"{scale[1]:.12g}"}
    rows, cols = src.shape
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=cols, height=rows, count=1, dtype="float32",
                      crs=src_crs, transform=src_transform, nodata=np.nan) as tmp:
            tmp.write(src.astype(np.float32, copy=False), 1)
        with mem.open() as tmp, WarpedVRT(
            tmp, crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
            resampling=resampling, src_nodata=np.nan, nodata=np.nan, dtype="float32",
            tolerance=WARP_TOLERANCE, **extras,
        ) as vrt:
            return vrt.read(1)


def warp_onto(source: RasterSource, ds: rasterio.io.DatasetReader, grid: Grid, resampling: Resampling,
              out: np.ndarray, scale: tuple[float, float]) -> None:
    """Read the window of ``source`` (open as ``ds``) that ``grid`` needs and warp it into ``out``
    (float32, NaN-filled) with :func:`warp_array`."""
    window = _source_window(source, grid)
    if window is None:
        return
    src = source.to_physical(ds.read(source.band, window=window))
    if np.isnan(src).all():
        return
    out[:] = warp_array(src, ds.window_transform(window), source.crs, grid, resampling, scale)


def _source_window(source: RasterSource, grid: Grid) -> Window | None:
    """Window of ``source`` that covers ``grid``, with a resampling margin."""
    try:
        left, bottom, right, top = transform_bounds(grid.crs, source.crs, *grid.bounds, densify_pts=21)
    except RasterioError:
        return Window(0, 0, source.width, source.height)
    if not all(map(math.isfinite, (left, bottom, right, top))):
        return Window(0, 0, source.width, source.height)
    inv = ~source.transform
    c0, r0 = inv @ (left, top)
    c1, r1 = inv @ (right, bottom)
    c0, c1 = sorted((c0, c1))
    r0, r1 = sorted((r0, r1))
    # source pixels per destination pixel: kernels widen when downsampling
    ratio = max((c1 - c0) / grid.width, (r1 - r0) / grid.height, 1.0)
    margin = math.ceil(2 * ratio) + 2
    col0 = max(math.floor(c0) - margin, 0)
    row0 = max(math.floor(r0) - margin, 0)
    col1 = min(math.ceil(c1) + margin, source.width)
    row1 = min(math.ceil(r1) + margin, source.height)
    if col1 <= col0 or row1 <= row0:
        return None
    return Window(col0, row0, col1 - col0, row1 - row0)

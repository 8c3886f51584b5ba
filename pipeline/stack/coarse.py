"""Bands averaged straight onto a coarse grid, for overview products (the quicklook)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from affine import Affine
from rasterio.enums import Resampling
from rasterio.windows import Window

from pipeline.core.config import SceneConfig
from pipeline.core.errors import ChannelError
from pipeline.core.grid import Grid
from pipeline.io.sentinel2 import read_scene, verify_scene_files


def read_coarse(cfg: SceneConfig, names: Sequence[str], grid: Grid, factor: int, *,
                strip_rows: int = 256, threads: int = 2) -> np.ndarray:
    """Bands ``names`` averaged over ``factor`` x ``factor`` pixels of ``grid``, as (band, rows, cols) float32.

    For overview products (the quicklook): each band is resampled straight
    onto the coarse grid (``grid`` cropped to whole multiples of ``factor``,
    pixels ``factor`` times larger) with GDAL's average, which skips no-data
    pixels, in strips of ``strip_rows`` coarse rows, so memory stays at a
    strip whatever the scene size and nothing goes through the Dask graph.
    On a grid aligned with the band (the usual case) a coarse pixel is
    the mean of the valid pixels under it, read by GDAL's decimating reader
    (:meth:`pipeline.io.raster_source.RasterSource.read_decimated`: from the file's
    overviews or JPEG 2000 resolution levels when it has them, so the
    quicklook costs a fraction of a full read). Bands are read in
    ``threads`` threads (GDAL releases the GIL). Raises
    :class:`ChannelError` when the scene lacks a band.
    """
    scene = read_scene(cfg.scene)
    missing = [n for n in names if n not in scene.bands]
    if missing:
        raise ChannelError(f"{scene.describe()} has no band {', '.join(missing)}")
    # checked against manifest.safe like the stack's bands (files verified already are not hashed again)
    verify_scene_files(scene, cfg.scene, names)
    rows, cols = grid.height // factor, grid.width // factor
    coarse = Grid(grid.crs, grid.transform * Affine.scale(factor), cols, rows)
    sources = [scene.open_band(n) for n in names]
    out = np.full((len(names), rows, cols), np.nan, np.float32)
    if rows == 0 or cols == 0:
        return out

    def band(k: int) -> None:
        src = sources[k]
        if src.read_decimated(grid, factor, out[k]):
            return
        scale = src.warp_scale(coarse.crs, coarse.res)
        for r0 in range(0, rows, strip_rows):
            n = min(strip_rows, rows - r0)
            strip = coarse.window(Window(0, r0, cols, n))
            out[k, r0:r0 + n] = src.read_onto(strip, Resampling.average, scale)

    with ThreadPoolExecutor(max(1, min(threads, len(names)))) as pool:
        list(pool.map(band, range(len(names))))
    return out

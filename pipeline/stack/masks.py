"""The scene's mask: DEM footprint, excluded SCL classes and detected clouds (grown by a buffer), area of interest.

The stack combines it with the channels' own no-data into its ``valid``. Clouds
of L1C scenes, which have no SCL, come from :mod:`pipeline.stack.clouds`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize

from pipeline.core.config import SceneConfig
from pipeline.core.grid import Grid
from pipeline.io.raster_source import RasterSource
from pipeline.stack.lazy_arrays import CLASS_RESAMPLING, CONTINUOUS_RESAMPLING, GeometryLayer, lazy_layer
from postprocess.morphology import disk

log = logging.getLogger(__name__)


def scene_mask(cfg: SceneConfig, grid: Grid, dem: RasterSource | None, scl: RasterSource | None,
               aoi_geoms: Sequence[Any] | None, clouds: da.Array | None = None) -> da.Array | None:
    """Lazy boolean mask of what the inputs other than the channels exclude, in blocks of
    ``cfg.grid.block_size``; None when nothing does.

    ``dem``: the DEM whose footprint bounds the scene (None when a channel from the DEM carries
    its no-data already). ``scl``: the scene classification, whose excluded classes and buffered
    (cloud) classes come from ``cfg.mask``. ``aoi_geoms``: the area of interest's geometries.
    ``clouds``: detected clouds with their buffer (:func:`pipeline.stack.clouds.cloud_layer`), excluded.
    """
    block = cfg.grid.block_size
    masks = []
    if dem is not None:
        masks.append(~da.isnan(lazy_layer(dem, grid, block, CONTINUOUS_RESAMPLING, "dem")))
    if scl is not None:
        excluded = cfg.mask.excluded_scl_classes()
        scl_arr = lazy_layer(scl, grid, block, CLASS_RESAMPLING, "scl")
        masks.append(~scl_exclusion(scl_arr, excluded, cfg.mask.buffered_scl_classes(),
                                    cfg.mask.cloud_buffer_m / grid.res[0]))
        log.info("valid mask excludes SCL classes %s (clouds grown by %g m)", excluded, cfg.mask.cloud_buffer_m)
    if clouds is not None:
        masks.append(~clouds)
    if aoi_geoms is not None:
        inside = GeometryLayer(aoi_geoms, grid)
        masks.append(da.from_array(inside, chunks=(block, block), asarray=False, lock=False,
                                   name=f"aoi-{tokenize(grid.to_dict(), block, [g.wkb for g in aoi_geoms])}",
                                   meta=np.empty((0, 0), bool)))
    mask = None
    for m in masks:
        mask = m if mask is None else mask & m
    return mask


def _dilate(block: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    return binary_dilation(block, structure=footprint)


def scl_exclusion(scl: da.Array, excluded: Sequence[int], buffered: Sequence[int], buffer_px: float) -> da.Array:
    """Pixels the SCL excludes: no SCL value, an excluded class, or within ``buffer_px`` of a buffered class.

    The buffer is a disk dilation computed per block with a halo of its radius,
    so it is the same as on the whole array.
    """
    unbuffered = [c for c in excluded if c not in buffered]
    out = da.isnan(scl) | da.isin(scl, np.asarray(unbuffered, np.float32))
    cloud = da.isin(scl, np.asarray(list(buffered), np.float32))
    radius = int(np.floor(buffer_px))
    if buffered and radius >= 1:
        # a halo wider than the array (an area of interest a few pixels across) reaches nothing more:
        # clipped to the array's size, which dask requires and which gives the same result
        depth = {axis: min(radius, size) for axis, size in enumerate(cloud.shape)}
        cloud = cloud.map_overlap(_dilate, depth=depth, boundary=False, footprint=disk(buffer_px, slack=0.0),
                                  dtype=bool, meta=np.empty((0, 0), bool))
    return out | cloud

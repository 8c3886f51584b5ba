"""One call from a probability raster to attributed landslide polygons and the cleaned mask.

:func:`polygons_from_probability` chains :mod:`~postprocess.objects` (the
cleaning, with each object's statistics and polygon pieces),
:mod:`~postprocess.vectorize` (pieces merged into one polygon per object) and
:mod:`~postprocess.attributes`. It runs three or four block-wise dask passes
(object sizes, holes, final objects with their statistics and polygon
pieces); memory depends on the block size, on the number of objects and on
two bit-packed masks (one bit per pixel).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import geopandas as gpd
import numpy as np
import xarray as xr

from pipeline.core.config import PostprocessSection
from pipeline.core.errors import ConfigError
from pipeline.core.georeference import georeference, grid_coords
from pipeline.core.grid import Grid
from postprocess.attributes import build_attributes, empty_frame
from postprocess.objects import CleanedObjects, ObjectLayers, OpenedMask, clean_objects
from postprocess.vectorize import merge_pieces

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunHandover:
    """What a run that computes the probability itself hands to :func:`polygons_from_probability`;
    neither changes the result.

    ``opened``: the thresholded, opened and closed mask and its summaries, when the run computed
    them already (in the same computation as the probability itself). ``on_mask``: called with
    the (lazy) cleaned mask as soon as its objects are known, before the polygons are built and
    merged in this process, so the run can start computing a raster of the mask on the workers
    meanwhile; its return value is ignored.
    """

    opened: OpenedMask | None = None
    on_mask: Callable[[xr.DataArray], Any] | None = None


def effective_threshold(params: PostprocessSection, threshold: float | None) -> float:
    """``postprocess.threshold`` when the config sets it, else the caller's (model) threshold."""
    value = params.threshold if params.threshold is not None else threshold
    if value is None:
        raise ConfigError("postprocess.threshold: not set in the config and no model threshold was given")
    if not 0.0 < float(value) < 1.0:
        raise ConfigError(f"postprocess.threshold: expected a value in (0, 1), got {value}")
    return float(value)


def _coords(probability: Any, grid: Grid) -> dict[str, np.ndarray]:
    if isinstance(probability, xr.DataArray) and "y" in probability.coords and "x" in probability.coords:
        return {"y": probability["y"].values, "x": probability["x"].values}
    return grid_coords(grid)


def mask_dataarray(objects: CleanedObjects, coords: Mapping[str, np.ndarray]) -> xr.DataArray:
    """The cleaned mask as a lazy boolean DataArray (y, x) with CRS and transform."""
    arr = xr.DataArray(objects.mask, dims=("y", "x"), coords=dict(coords), name="landslide_mask")
    return georeference(arr, objects.grid)


def polygons_from_probability(
    probability: Any,
    valid: Any,
    grid: Grid,
    params: PostprocessSection,
    *,
    threshold: float | None = None,
    context: Mapping[str, Any] | None = None,
    layers: ObjectLayers | None = None,
    handover: RunHandover | None = None,
) -> tuple[gpd.GeoDataFrame, xr.DataArray]:
    """Landslide polygons with attributes, and the cleaned mask, from a probability raster.

    Parameters
    ----------
    probability, valid:
        (y, x) arrays (dask-backed DataArrays, or numpy) on ``grid``:
        probability in [0, 1] (NaN without data) and the valid-data mask;
        processed in the probability's chunks.
    params:
        The ``postprocess`` config section (radii in metres, areas in m²).
    threshold:
        The model's threshold; ``params.threshold`` overrides it when set.
    context:
        ``scene_id``, ``acq_date``, ``model_name``, ``model_sha256``, ``run_id``
        copied into every feature.
    layers:
        Optional layers on the same grid for the terrain rules and the
        attributes (:class:`~postprocess.objects.ObjectLayers`).
    handover:
        What a run that computed the first steps itself hands over
        (:class:`RunHandover`).

    Returns
    -------
    (GeoDataFrame in the grid's CRS with :data:`postprocess.attributes.COLUMNS`,
    lazy boolean mask DataArray of the kept objects).
    """
    thr = effective_threshold(params, threshold)
    handover = handover or RunHandover()
    objects = clean_objects(probability, valid, grid, params, threshold=thr, layers=layers, with_pieces=True,
                            opened=handover.opened)
    mask = mask_dataarray(objects, _coords(probability, grid))
    if handover.on_mask is not None:
        handover.on_mask(mask)
    if objects.count == 0:
        log.info("no landslide objects above threshold %.3f", thr)
        return empty_frame(grid.crs), mask
    keys, geoms = merge_pieces(objects.pieces or {}, grid.transform, simplify_px=params.simplify_m / grid.res[0])
    expected = np.arange(1, objects.count + 1)
    if not np.array_equal(keys, expected):  # every object has pixels, hence pieces
        raise RuntimeError(f"vectorization lost objects: {objects.count} labelled, {keys.size} polygons")
    gdf = build_attributes(keys, geoms, objects.stats, grid, context or {})
    log.info("%d landslide polygons, %.0f m² in total", len(gdf), float(gdf["area_m2"].sum()))
    return gdf, mask

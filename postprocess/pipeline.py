"""One call from a probability raster to attributed landslide polygons.

:func:`polygons_from_probability` chains :mod:`~postprocess.morphology`,
:mod:`~postprocess.vectorize` and :mod:`~postprocess.attributes`. It runs
three or four block-wise dask passes (object sizes, holes, final objects with
their statistics and polygon pieces); memory depends on the block size, on
the number of objects and on two bit-packed masks (one bit per pixel).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import geopandas as gpd
import numpy as np
import xarray as xr

from pipeline.core.config import PostprocessSection
from pipeline.core.errors import ConfigError
from pipeline.core.grid import Grid

from .attributes import build_attributes, empty_frame
from .morphology import CleanedObjects, clean_objects
from .vectorize import merge_pieces

log = logging.getLogger(__name__)


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
    t = grid.transform
    return {
        "y": t.f + (np.arange(grid.height) + 0.5) * t.e,
        "x": t.c + (np.arange(grid.width) + 0.5) * t.a,
    }


def mask_dataarray(objects: CleanedObjects, coords: Mapping[str, np.ndarray]) -> xr.DataArray:
    """The cleaned mask as a lazy boolean DataArray (y, x) with CRS and transform."""
    arr = xr.DataArray(objects.mask, dims=("y", "x"), coords=dict(coords), name="landslide_mask")
    try:
        import rioxarray  # noqa: F401

        arr = arr.rio.write_crs(objects.grid.crs).rio.write_transform(objects.grid.transform)
    except ImportError:  # pragma: no cover - rioxarray is a dependency
        arr.attrs["crs"] = objects.grid.crs.to_string()
    return arr


def polygons_from_probability(
    probability: Any,
    valid: Any,
    grid: Grid,
    params: PostprocessSection,
    *,
    threshold: float | None = None,
    context: Mapping[str, Any] | None = None,
    slope: Any = None,
    dem: Any = None,
    red: Any = None,
    nir: Any = None,
    green: Any = None,
    uncertainty: Any = None,
    block_size: int | None = None,
    on_mask: Callable[[xr.DataArray], Any] | None = None,
    opened: Any = None,
    summaries: Any = None,
) -> tuple[gpd.GeoDataFrame, xr.DataArray]:
    """Landslide polygons with attributes, and the cleaned mask, from a probability raster.

    Parameters
    ----------
    probability, valid:
        (y, x) DataArrays (dask-backed) on ``grid``: probability in [0, 1]
        (NaN without data) and the valid-data mask.
    params:
        The ``postprocess`` config section (radii in metres, areas in m²).
    threshold:
        The model's threshold; ``params.threshold`` overrides it when set.
    context:
        ``scene_id``, ``acq_date``, ``model_name``, ``model_sha256``, ``run_id``
        copied into every feature.
    slope, dem, red, nir, green, uncertainty:
        Optional (y, x) layers on the same grid: slope (degrees) for the
        slope rule and slope attributes, elevation (m), B04 and B08
        reflectance for the NDVI rule, B03 (with B08) for the NDWI rule,
        and the inference uncertainty.
    block_size:
        Rechunk every layer to square blocks of this edge (default: keep the
        probability's chunks).
    on_mask:
        Called with the (lazy) cleaned mask as soon as its objects are known,
        before the polygons are built and merged in this process: a caller
        can start computing the mask (a raster of it) on the workers
        meanwhile. Its return value is ignored.
    opened:
        The thresholded, opened and closed mask when the caller computed it
        already (:func:`postprocess.morphology.opened_mask`, for example in
        the same computation as the probability itself).
    summaries:
        :func:`postprocess.morphology.opened_summaries` of ``opened``, when
        the caller computed those too: the size and hole steps then make no
        pass over the mask unless they change it.

    Returns
    -------
    (GeoDataFrame in the grid's CRS with :data:`postprocess.attributes.COLUMNS`,
    lazy boolean mask DataArray of the kept objects).
    """
    thr = effective_threshold(params, threshold)
    objects = clean_objects(
        probability,
        valid,
        grid,
        params,
        threshold=thr,
        values={"elev": dem, "uncertainty": uncertainty},
        slope=slope,
        red=red,
        nir=nir,
        green=green,
        with_pieces=True,
        block_size=block_size,
        opened=opened,
        summaries=summaries,
    )
    mask = mask_dataarray(objects, _coords(probability, grid))
    if on_mask is not None:
        on_mask(mask)
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

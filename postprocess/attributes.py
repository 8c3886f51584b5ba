"""Attributes of landslide polygons.

Per-object pixel statistics are block-wise reductions keyed by label (see
:mod:`postprocess.label_stats`); this module turns them, with the polygons and the
run context, into the fixed attribute schema :data:`COLUMNS`. The schema does
not depend on which layers were available: missing ones give nulls, so every
GeoPackage of a region has the same columns.

``area_m2`` is the object's pixel count times the pixel area (the area the
min-area rule used; equal to the polygon's area unless ``simplify_m`` > 0);
``perimeter_m`` is the length of the written polygon's rings, holes included;
the centroid is the polygon's, transformed to EPSG:4326; means ignore
non-finite pixels (DEM voids) and are null when an object has none.

The id of a landslide is stable across reruns: a hash of the scene id, the
grid CRS and the map coordinates of the object's first pixel in row-major
order. It does not depend on block size, on the order of processing, nor on
the extent of the processed area (grids are aligned to the 10 m pixel grid).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import dask
import dask.array as da
import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from pyproj import Transformer
from rasterio.crs import CRS

from pipeline.core.arrays import as_dask
from pipeline.core.grid import Grid
from postprocess.label_stats import pixel_stats, reduce_by, stat_max, stat_mean
from postprocess.labels import BlockLayout

#: Attribute columns and their pandas dtypes, in output order.
COLUMNS: dict[str, str] = {
    "landslide_id": "object",
    "label": "int32",
    "area_m2": "float64",
    "perimeter_m": "float64",
    "n_pixels": "int64",
    "mean_prob": "float64",
    "max_prob": "float64",
    "mean_slope": "float64",
    "max_slope": "float64",
    "mean_elev": "float64",
    "mean_uncertainty": "float64",
    "centroid_lon": "float64",
    "centroid_lat": "float64",
    "scene_id": "object",
    "acq_date": "object",
    "model_name": "object",
    "model_sha256": "object",
    "run_id": "object",
}

#: Keys of the run context copied into every feature.
CONTEXT_KEYS: tuple[str, ...] = ("scene_id", "acq_date", "model_name", "model_sha256", "run_id")


def stable_id(scene_id: str, crs: CRS, x: float, y: float) -> str:
    """16 hex digits identifying an object by scene and first-pixel centre (map units)."""
    return stable_ids(scene_id, crs, [x], [y])[0]


def stable_ids(scene_id: str, crs: CRS, xs: Any, ys: Any) -> list[str]:
    """:func:`stable_id` of many objects (the CRS is formatted once, not per object)."""
    prefix = f"{scene_id}|{crs.to_string()}|"
    return [hashlib.sha256(f"{prefix}{x:.2f}|{y:.2f}".encode()).hexdigest()[:16]
            for x, y in zip(xs, ys, strict=True)]


def first_pixel_centres(first: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Map coordinates of pixel centres given row-major indices on ``grid``."""
    rows, cols = np.divmod(np.asarray(first, dtype=np.int64), grid.width)
    t = grid.transform
    xs = t.c + (cols + 0.5) * t.a
    ys = t.f + (rows + 0.5) * t.e
    return xs, ys


def _context_value(context: Mapping[str, Any], key: str) -> str | None:
    value = context.get(key)
    if value is None:
        return None
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return str(value)


def empty_frame(crs: Any) -> gpd.GeoDataFrame:
    """A GeoDataFrame with the attribute schema and no rows."""
    data = {name: pd.Series([], dtype=dtype) for name, dtype in COLUMNS.items()}
    return gpd.GeoDataFrame(data, geometry=gpd.GeoSeries([], crs=crs), crs=crs)


def _mean(stats: Mapping[str, np.ndarray], name: str, n: int) -> np.ndarray:
    return stat_mean(stats, name) if f"{name}_sum" in stats else np.full(n, np.nan)


def _max(stats: Mapping[str, np.ndarray], name: str, n: int) -> np.ndarray:
    return stat_max(stats, name) if f"{name}_max" in stats else np.full(n, np.nan)


def build_attributes(
    labels: np.ndarray,
    geometries: Sequence[shapely.Geometry] | np.ndarray,
    stats: Mapping[str, np.ndarray],
    grid: Grid,
    context: Mapping[str, Any],
    *,
    names: Mapping[str, str] | None = None,
) -> gpd.GeoDataFrame:
    """The attribute table of the polygons, in the grid's CRS.

    ``labels[k]`` and ``geometries[k]`` (grid CRS) describe object ``k``;
    ``stats`` holds per-object arrays in the same order (``count``, ``first``
    and ``<layer>_sum/_n/_max`` for value layers). ``names`` maps the roles
    ``prob``, ``slope``, ``elev``, ``uncertainty`` to layer names in ``stats``
    (default: the same names). ``context`` gives ``scene_id``, ``acq_date``,
    ``model_name``, ``model_sha256`` and ``run_id``.
    """
    n = len(labels)
    if n == 0:
        return empty_frame(grid.crs)
    roles = {"prob": "prob", "slope": "slope", "elev": "elev", "uncertainty": "uncertainty", **(names or {})}
    geoms = np.asarray(geometries, dtype=object)
    count = np.asarray(stats["count"], dtype=np.int64)
    xs, ys = first_pixel_centres(stats["first"], grid)
    scene_id = _context_value(context, "scene_id") or ""
    ids = stable_ids(scene_id, grid.crs, xs, ys)
    centroids = shapely.centroid(geoms)
    to_lonlat = Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True)
    lon, lat = to_lonlat.transform(shapely.get_x(centroids), shapely.get_y(centroids))
    data: dict[str, Any] = {
        "landslide_id": ids,
        "label": np.asarray(labels, dtype=np.int32),
        "area_m2": count * grid.pixel_area,
        "perimeter_m": shapely.length(geoms),
        "n_pixels": count,
        "mean_prob": _mean(stats, roles["prob"], n),
        "max_prob": _max(stats, roles["prob"], n),
        "mean_slope": _mean(stats, roles["slope"], n),
        "max_slope": _max(stats, roles["slope"], n),
        "mean_elev": _mean(stats, roles["elev"], n),
        "mean_uncertainty": _mean(stats, roles["uncertainty"], n),
        "centroid_lon": np.asarray(lon, dtype=np.float64),
        "centroid_lat": np.asarray(lat, dtype=np.float64),
    }
    for key in CONTEXT_KEYS:
        data[key] = [_context_value(context, key)] * n
    frame = pd.DataFrame(data).astype(COLUMNS)
    return gpd.GeoDataFrame(frame, geometry=list(geoms), crs=grid.crs)


# --------------------------------------------------------------------------
# statistics of an existing label raster
# --------------------------------------------------------------------------
def _label_block_stats(labels: np.ndarray, *values: np.ndarray, names: tuple[str, ...], origin: tuple[int, int],
                       width: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    present = np.unique(labels[labels > 0])
    compact = np.zeros(labels.shape, dtype=np.int64)
    fg = labels > 0
    compact[fg] = np.searchsorted(present, labels[fg]) + 1
    stats = pixel_stats(compact, present.size, dict(zip(names, values, strict=True)), origin=origin, width=width,
                        first=True)
    return present.astype(np.int64), stats


def object_statistics(labels: Any, values: Mapping[str, Any] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-label pixel statistics of a global label raster, reduced block by block.

    ``labels`` (int, 0 = background) and ``values`` are 2-D arrays (dask,
    xarray or numpy) with the same shape; values are processed in the labels'
    chunks. Returns the sorted labels present and per-label ``count``,
    ``first`` and ``<name>_sum/_n/_max``.
    """
    lab = getattr(labels, "data", labels)
    if not isinstance(lab, da.Array):
        lab = da.from_array(np.asarray(lab), chunks=-1)
    names = tuple(values or {})
    arrays = [as_dask(values[name], lab.chunks) for name in names]  # type: ignore[index]
    layout = BlockLayout.of(lab)
    lab_blocks = lab.to_delayed()
    value_blocks = [a.to_delayed() for a in arrays]
    tasks = [
        dask.delayed(_label_block_stats, pure=True)(
            lab_blocks[ix], *[vb[ix] for vb in value_blocks], names=names, origin=layout.origin(ix),
            width=layout.shape[1],
        )
        for ix in layout.indices()
    ]
    results = dask.compute(*tasks)
    keys = np.concatenate([r[0] for r in results]) if results else np.zeros(0, np.int64)
    present, inverse = np.unique(keys, return_inverse=True)
    out: dict[str, np.ndarray] = {}
    for name in results[0][1] if results else ():
        out[name] = reduce_by(inverse, present.size, np.concatenate([r[1][name] for r in results]), name)
    return present, out

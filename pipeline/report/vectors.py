"""Polygons for the page: read from the GeoPackage without leaving anything beside it, simplified
at about one pixel, coordinates rounded, attributes stored column-wise, and capped in number and
size so that a scene with very many polygons still gives a page a browser opens quickly.

The page's polygons are a view; the GeoPackage is the reference (the page says so).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io.gdal import no_sidecars

#: At most this many polygons in a page (the largest are kept) ...
MAX_FEATURES = 10_000
#: ... and at most about this many bytes of polygon geometry: the tolerance grows (up to
#: :data:`MAX_TOLERANCE_STEPS` doublings), then the smallest polygons are left out.
MAX_GEOMETRY_BYTES = 6_000_000
MAX_TOLERANCE_STEPS = 3

#: Attributes shown first in a popup, in this order; the others follow in the file's order.
FIRST_COLUMNS = ("landslide_id", "first_seen", "last_seen", "n_detections", "area_m2", "perimeter_m",
                 "mean_prob", "max_prob", "mean_slope", "scene_id", "scene_ids", "acq_date")


def read_polygons(path: Path, layer: str | None = "landslides") -> Any:
    """The polygon layer of a GeoPackage (``layer``, else its first layer with geometry) as a
    GeoDataFrame; nothing is written beside the file."""
    import pyogrio

    with no_sidecars():
        layers = pyogrio.list_layers(path)
        names = [str(n) for n, _ in layers]
        if layer is None or layer not in names:
            with_geometry = [str(n) for n, g in layers if g is not None]
            if not with_geometry:
                raise ValueError(f"{path}: no layer with geometries")
            layer = with_geometry[0]
        return pyogrio.read_dataframe(path, layer=layer)


def _jsonable(value: Any) -> Any:
    """A cell value as JSON: numbers (NaN -> null), text, ISO dates; others as text."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        if not math.isfinite(f):
            return None
        return round(f, 6) if abs(f) < 1e9 else f
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    if hasattr(value, "isoformat"):  # pandas Timestamp
        try:
            return value.isoformat()
        except ValueError:  # NaT
            return None
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


def column_order(columns: Sequence[str]) -> list[str]:
    first = [c for c in FIRST_COLUMNS if c in columns]
    return first + [c for c in columns if c not in first]


def coordinate_decimals(unit_size: float) -> int:
    """Decimals that keep coordinates to about a hundredth of ``unit_size`` (a pixel)."""
    if not unit_size > 0:
        return 6
    return max(0, math.ceil(-math.log10(unit_size / 100.0)))


@dataclass(frozen=True)
class PolygonPayload:
    """Polygons as the page's script takes them, and what was done to fit them in the page."""

    data: dict[str, Any]  # {"columns", "rows", "constants", "geometries", "n_total"}
    n_total: int
    n_shown: int
    tolerance: float  # simplification tolerance in map units (0: none)
    geometry_bytes: int

    @property
    def capped(self) -> bool:
        return self.n_shown < self.n_total


def _geometries_json(geoms: np.ndarray, tolerance: float, decimals: int) -> list[str]:
    import shapely

    if tolerance > 0:
        geoms = shapely.simplify(geoms, tolerance, preserve_topology=True)
    geoms = shapely.transform(geoms, lambda xy: np.round(xy, decimals))
    return [str(s) for s in shapely.to_geojson(geoms)]


def polygon_payload(gdf: Any, *, tolerance: float, decimals: int, max_features: int = MAX_FEATURES,
                    max_bytes: int = MAX_GEOMETRY_BYTES, keep_by: str = "area_m2") -> PolygonPayload:
    """``gdf`` (already in the map's coordinates) as the page's polygon data: geometries simplified
    with ``tolerance`` (shapely, topology preserved) and rounded to ``decimals``; at most
    ``max_features`` polygons (the largest by ``keep_by``) and about ``max_bytes`` of geometry."""
    n_total = len(gdf)
    geom_name = gdf.geometry.name
    valid = ~(gdf.geometry.isna() | gdf.geometry.is_empty).to_numpy() if n_total else np.zeros(0, bool)
    gdf = gdf[valid]
    if keep_by in gdf.columns and len(gdf):
        order = np.argsort(-np.nan_to_num(gdf[keep_by].to_numpy(dtype=np.float64), nan=-np.inf), kind="stable")
    else:
        order = np.arange(len(gdf))
    order = order[:max_features]
    geoms_all = np.asarray(gdf.geometry.values, dtype=object)
    tol = tolerance
    geometries: list[str] = []
    for step in range(MAX_TOLERANCE_STEPS + 1):
        geometries = _geometries_json(geoms_all[order], tol, decimals)
        size = sum(len(g) for g in geometries)
        if size <= max_bytes or step == MAX_TOLERANCE_STEPS:
            break
        tol = tol * 2 if tol > 0 else 1.0
    size = 0
    for k, g in enumerate(geometries):
        size += len(g) + 1
        if size > max_bytes:
            order, geometries = order[:k], geometries[:k]
            break
    # shown in the file's order (the largest first only decided which are shown)
    keep = np.sort(order)
    rank = {int(i): j for j, i in enumerate(order)}
    geometries = [geometries[rank[int(i)]] for i in keep]
    table = gdf.drop(columns=[geom_name]).iloc[keep]
    columns = column_order([str(c) for c in table.columns])
    constants: dict[str, Any] = {}
    if len(table) >= 2:
        for c in list(columns):
            values = table[c]
            if values.nunique(dropna=False) == 1:
                constants[c] = _jsonable(values.iloc[0])
                columns.remove(c)
    rows = [[_jsonable(v) for v in row] for row in table[columns].itertuples(index=False, name=None)]
    data = {
        "columns": columns,
        "constants": constants,
        "rows": rows,
        "geometries": [json.loads(g) for g in geometries],
        "n_total": n_total,
    }
    return PolygonPayload(data, n_total, len(keep), tol, sum(len(g) for g in geometries))

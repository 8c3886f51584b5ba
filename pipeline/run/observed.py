"""Footprints and observed areas of a region's scenes, and the per-night ``not_observed`` layer.

Per night, ``not_observed`` is the part of the region's footprint that no valid pixel covered.

A scene's *footprint* is its grid (``report.json``'s ``grid``: crs, transform, width, height); its
*observed area* is where its ``probability.tif`` holds a value (uint8 codes, 255 = no data: clouds,
cloud shadows, no input, outside the swath or the DEM), read decimated to about
:data:`RESOLUTION_M` metres (nearest neighbour, through the COG's overviews where it has them) and
polygonized. Both are built in the scene's own CRS, densified at the decimated pixel size and
reprojected to EPSG:4326 (split at the antimeridian), so that the edges of two scenes on one grid
meet exactly. Overlays run on a fixed precision grid (:data:`GRID_DEG`, about 1 cm), which removes
the slivers that reprojected, nearly coincident edges would leave.

A run folder without ``probability.tif`` (``output.probability_cog: false``) falls back to
``mask.tif`` (also 255 = no data), then to the run's count of valid pixels when it says "all" or
"none"; otherwise its observed area is unknown and counted as not observed (with a warning): the
layer never claims that a place was seen when that cannot be shown.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import shapely
from pyproj import CRS, Geod

from postprocess.gpkg import to_lonlat

log = logging.getLogger(__name__)

_GEOD = Geod(ellps="WGS84")

#: The resolution (metres) at which a scene's valid pixels are read for its observed area.
RESOLUTION_M = 100.0
#: The precision grid of the overlays in EPSG:4326 (degrees): about 1 cm.
GRID_DEG = 1e-7
#: Parts of a not-observed area smaller than this share of a decimated pixel are numerical
#: leftovers of the overlays, not places.
MIN_PART_SHARE = 0.01
#: Metres per degree of latitude (mean Earth radius), for grids in geographic coordinates.
_METRES_PER_DEGREE = 6_371_008.8 * math.pi / 180
#: The rasters that say which pixels were valid, in order of preference (255 = no data in both).
VALIDITY_RASTERS = ("probability.tif", "mask.tif")
NODATA = 255


@dataclass(frozen=True)
class Coverage:
    """A scene's footprint and observed area in EPSG:4326 (shapely geometries, possibly empty),
    and the edge of its decimated pixels in metres."""

    scene_id: str
    night: str | None
    footprint: Any
    observed: Any
    step_m: float


def geodesic_area_perimeter(geom: Any) -> tuple[float, float]:
    """The area (square metres, holes subtracted) and perimeter (metres) of a lon/lat
    (Multi)Polygon on the WGS84 ellipsoid."""
    if geom is None or geom.is_empty:
        return 0.0, 0.0
    area, perimeter = _GEOD.geometry_area_perimeter(shapely.orient_polygons(geom))
    return abs(float(area)), float(perimeter)


def geodesic_area(geom: Any) -> float:
    """The area of a lon/lat (Multi)Polygon on the WGS84 ellipsoid, square metres."""
    return geodesic_area_perimeter(geom)[0]


def _pixel_metres(crs: CRS, transform: Sequence[float]) -> float:
    """The grid's pixel edge in metres (in degrees times the length of a degree of latitude)."""
    size = abs(float(transform[0]))
    if crs.is_geographic:
        return size * _METRES_PER_DEGREE
    return size * float(crs.axis_info[0].unit_conversion_factor)


def decimation(grid: Mapping[str, Any]) -> tuple[int, int, int]:
    """The decimation factor and the decimated shape (height, width) of ``grid``."""
    crs = CRS.from_user_input(grid["crs"])
    factor = max(1, round(RESOLUTION_M / _pixel_metres(crs, list(grid["transform"]))))
    return factor, math.ceil(int(grid["height"]) / factor), math.ceil(int(grid["width"]) / factor)


def _lonlat(geom: Any, crs: Any, step: float) -> Any:
    """``geom`` in the grid's CRS, densified every ``step`` (map units), in EPSG:4326."""
    if geom.is_empty:
        return shapely.MultiPolygon()
    dense = shapely.segmentize(geom, step)
    return to_lonlat(gpd.GeoDataFrame(geometry=[dense], crs=crs)).geometry.iloc[0]


def _read_valid(path: Path, shape: tuple[int, int]) -> tuple[np.ndarray, Any, Any]:
    """Which decimated pixels of the raster at ``path`` hold a value, its decimated transform and CRS."""
    import rasterio
    from affine import Affine
    from rasterio.enums import Resampling

    from pipeline.io.gdal import no_sidecars

    with no_sidecars(), rasterio.open(path) as src:
        codes = src.read(1, out_shape=shape, resampling=Resampling.nearest)
        nodata = NODATA if src.nodata is None else int(src.nodata)
        transform = src.transform * Affine.scale(src.width / shape[1], src.height / shape[0])
        return codes != nodata, transform, src.crs


def _polygons(valid: np.ndarray, transform: Any) -> Any:
    """The union of the ``True`` pixels as a shapely geometry in the raster's CRS."""
    from rasterio.features import shapes

    if not valid.any():
        return shapely.MultiPolygon()
    parts = [shapely.geometry.shape(g) for g, _ in shapes(valid.astype(np.uint8), mask=valid,
                                                          transform=transform, connectivity=4)]
    return shapely.union_all(parts)


def _grid_box(grid: Mapping[str, Any]) -> Any:
    """The grid's outline in its own CRS."""
    a, b, c, d, e, f = (float(v) for v in list(grid["transform"])[:6])
    w, h = int(grid["width"]), int(grid["height"])
    corners = [(0, 0), (w, 0), (w, h), (0, h)]
    return shapely.Polygon([(c + col * a + row * b, f + col * d + row * e) for col, row in corners])


def _observed_native(run_dir: Path, report: Mapping[str, Any], shape: tuple[int, int]) -> Any:
    """The observed area of the run in its grid's CRS; None when it cannot be told."""
    for name in VALIDITY_RASTERS:
        path = run_dir / name
        if path.is_file():
            valid, transform, _ = _read_valid(path, shape)
            return _polygons(valid, transform)
    counts, grid = report.get("counts") or {}, report["grid"]
    valid_pixels = counts.get("valid_pixels")
    if valid_pixels == int(grid["width"]) * int(grid["height"]):
        return _grid_box(grid)
    if valid_pixels == 0:
        return shapely.MultiPolygon()
    log.warning("%s: neither %s holds the valid pixels (output.probability_cog: false?); the scene's "
                "area is counted as not observed", run_dir, " nor ".join(VALIDITY_RASTERS))
    return None


def scene_coverage(run_dir: Path, report: Mapping[str, Any], scene_id: str, night: str | None) -> Coverage:
    """The footprint and observed area of the completed run in ``run_dir`` (its ``report``)."""
    grid = report["grid"]
    crs = CRS.from_user_input(grid["crs"])
    factor, height, width = decimation(grid)
    t = list(grid["transform"])
    step = max(abs(float(t[0])) * int(grid["width"]) / width, abs(float(t[4])) * int(grid["height"]) / height)
    observed = _observed_native(run_dir, report, (height, width))
    footprint = _lonlat(_grid_box(grid), crs, step)
    observed_ll = shapely.MultiPolygon() if observed is None else _lonlat(observed, crs, step)
    return Coverage(scene_id, night, footprint, observed_ll, _pixel_metres(crs, t) * factor)


def _without_specks(geom: Any, min_m2: float) -> Any:
    """``geom`` without the polygon parts smaller than ``min_m2``, as a MultiPolygon (None when empty)."""
    parts = [p for p in shapely.get_parts(geom) if p.geom_type == "Polygon" and geodesic_area(p) >= min_m2]
    return shapely.MultiPolygon(parts) if parts else None


def not_observed_frame(coverages: Sequence[Coverage]) -> gpd.GeoDataFrame:
    """Per night: the part of the region's footprint (the union of every scene's) that no valid pixel
    of that night's scenes covered. Columns ``date``, ``scene_ids``, ``area_m2``; a night that saw all
    of it has a row with no geometry and area 0. Scenes without a date are left out (warned)."""
    undated = sorted({c.scene_id for c in coverages if c.night is None})
    if undated:
        log.warning("scene(s) %s have no acquisition date: their footprints count in the region's, but "
                    "they belong to no night of the not_observed layer", ", ".join(undated))
    rows: dict[str, list[Any]] = {"date": [], "scene_ids": [], "area_m2": [], "geometry": []}
    region = shapely.union_all([c.footprint for c in coverages], grid_size=GRID_DEG) if coverages else None
    nights = sorted({c.night for c in coverages if c.night is not None})
    for night in nights:
        seen = [c for c in coverages if c.night == night]
        observed = shapely.union_all([c.observed for c in seen], grid_size=GRID_DEG)
        gap = shapely.difference(region, observed, grid_size=GRID_DEG)
        gap = _without_specks(gap, MIN_PART_SHARE * min(c.step_m for c in seen) ** 2)
        rows["date"].append(night)
        rows["scene_ids"].append(",".join(sorted({c.scene_id for c in seen})))
        rows["area_m2"].append(geodesic_area(gap))
        rows["geometry"].append(gap)
    frame = gpd.GeoDataFrame(rows, geometry="geometry", crs="EPSG:4326")
    return frame.astype({"date": "object", "scene_ids": "object", "area_m2": "float64"})

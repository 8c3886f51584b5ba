"""What the page of a scene run reads from its run folder: the grid (``report.json``'s ``grid``,
else ``probability.tif``'s, else one over the polygons), the GeoPackage and its polygons, the
decision threshold and the scene id."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.report import vectors


class ReportGrid:
    """The bits of a grid the page needs, from ``report["grid"]`` or ``probability.tif``."""

    def __init__(self, crs: str, transform: list[float], width: int, height: int) -> None:
        self.crs, self.width, self.height = crs, int(width), int(height)
        self.a, self.b, self.c, self.d, self.e, self.f = (float(v) for v in transform[:6])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def pixel(self) -> float:
        return math.sqrt(abs(self.a * self.e)) or 1.0

    def xy(self, col: float, row: float) -> tuple[float, float]:
        return self.c + col * self.a + row * self.b, self.f + col * self.d + row * self.e

    def latlng_bounds(self, cols: float | None = None, rows: float | None = None) -> list[list[float]]:
        """[[south, west], [north, east]] of the first ``cols`` x ``rows`` pixels (the whole grid)."""
        cols = self.width if cols is None else cols
        rows = self.height if rows is None else rows
        x0, y0 = self.xy(0, 0)
        x1, y1 = self.xy(cols, rows)
        return [[min(y0, y1), min(x0, x1)], [max(y0, y1), max(x0, x1)]]


def _grid(run_dir: Path, report: dict[str, Any]) -> ReportGrid | None:
    g = report.get("grid")
    if isinstance(g, dict) and {"crs", "transform", "width", "height"} <= g.keys():
        return ReportGrid(str(g["crs"]), list(g["transform"]), int(g["width"]), int(g["height"]))
    prob = run_dir / "probability.tif"
    if prob.is_file():
        import rasterio

        with rasterio.Env(GDAL_PAM_ENABLED="NO"), rasterio.open(prob) as src:
            return ReportGrid(src.crs.to_string(), list(src.transform)[:6], src.width, src.height)
    return None


def metres_per_unit(crs: str) -> float | None:
    """Metres per unit of a projected CRS's x axis; None for a geographic or unknown one."""
    try:
        from pyproj import CRS

        c = CRS.from_user_input(crs)
        if c.is_geographic:
            return None
        unit = c.axis_info[0]
        return float(unit.unit_conversion_factor) if unit.unit_name in ("metre", "meter", "m", "US survey foot",
                                                                         "foot") else None
    except Exception:  # noqa: BLE001 - a CRS pyproj cannot read: no scale bar
        return None


def _geopackage(run_dir: Path, report: dict[str, Any]) -> Path | None:
    names = report.get("output_files") or report.get("outputs") or []
    for name in names:
        if str(name).endswith(".gpkg") and (run_dir / str(name)).is_file():
            return run_dir / str(name)
    found = sorted(run_dir.glob("*_landslides.gpkg")) or sorted(run_dir.glob("*.gpkg"))
    return found[0] if found else None


def _threshold(run_dir: Path, report: dict[str, Any], gpkg_meta: dict[str, Any]) -> float | None:
    """The run's decision threshold: ``postprocess.threshold``, else what the run recorded in the
    probability raster or the GeoPackage, else the one model's."""
    cfg = report.get("config_resolved") or {}
    value = (cfg.get("postprocess") or {}).get("threshold") if isinstance(cfg, dict) else None
    if value is None:
        prob = run_dir / "probability.tif"
        if prob.is_file():
            try:
                import rasterio

                with rasterio.Env(GDAL_PAM_ENABLED="NO"), rasterio.open(prob) as src:
                    value = src.tags(1).get("threshold")
            except Exception:  # noqa: BLE001 - the threshold is a nicety here
                value = None
    if value is None:
        value = gpkg_meta.get("threshold")
    models = report.get("models") or []
    if value is None and len(models) == 1:
        value = models[0].get("threshold")
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _gpkg_metadata(path: Path) -> dict[str, Any]:
    import pyogrio

    try:
        with vectors.no_sidecars():
            info = pyogrio.read_info(path, layer="landslides")
        blob = (info.get("layer_metadata") or {}).get("landslide_run") or \
            (info.get("dataset_metadata") or {}).get("landslide_run")
        return json.loads(blob) if blob else {}
    except Exception:  # noqa: BLE001 - metadata are optional
        return {}


@dataclass(frozen=True)
class SceneRun:
    """What a scene page shows of a run: its folder, ``report.json`` dict, grid, GeoPackage, polygons
    (a GeoDataFrame or None), decision threshold and scene id."""

    run_dir: Path
    report: dict[str, Any]
    grid: ReportGrid | None
    gpkg: Path | None
    gdf: Any
    threshold: float | None
    scene_id: str

    @property
    def has_polygons(self) -> bool:
        return self.gdf is not None and bool(len(self.gdf))

    @property
    def n_polygons(self) -> int | None:
        counts = self.report.get("counts") or {}
        return counts.get("polygons", len(self.gdf) if self.gdf is not None else None)

    @property
    def total_area(self) -> float | None:
        counts = self.report.get("counts") or {}
        gdf = self.gdf
        return counts.get("total_area_m2",
                          float(gdf["area_m2"].sum()) if gdf is not None and "area_m2" in gdf.columns else None)


def load_scene_run(run_dir: Path, report: dict[str, Any]) -> SceneRun:
    """Read what the page needs from the run in ``run_dir`` that ``report`` describes."""
    gpkg = _geopackage(run_dir, report)
    gdf = vectors.read_polygons(gpkg) if gpkg is not None else None
    gpkg_meta = _gpkg_metadata(gpkg) if gpkg is not None else {}
    grid = _grid(run_dir, report) or _polygons_grid(gdf)
    scene_id = str(report.get("scene_id") or gpkg_meta.get("scene_id") or run_dir.parent.name)
    return SceneRun(run_dir, report, grid, gpkg, gdf, _threshold(run_dir, report, gpkg_meta), scene_id)


def _polygons_grid(gdf: Any) -> ReportGrid | None:
    """A grid of 1-unit pixels over the polygons, for a run that knows no grid; None without any."""
    if gdf is None or not len(gdf) or gdf.crs is None:
        return None
    x0, y0, x1, y1 = gdf.total_bounds
    return ReportGrid(gdf.crs.to_string(), [1.0, 0.0, x0, 0.0, -1.0, y1],
                      max(1, int(x1 - x0)), max(1, int(y1 - y0)))

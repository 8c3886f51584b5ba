"""What the page of a region job reads: each scene's outcome, ``report.json`` and footprint in
EPSG:4326 (its grid's, else the AOI of its config), and the merged regional polygons."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.report import charts, vectors

#: Metres per degree of latitude (mean Earth radius): the region map's unit.
METRES_PER_DEGREE = 6_371_008.8 * math.pi / 180


@dataclass(frozen=True)
class Region:
    """What a region page shows: its name, output folder, one entry per scene (see
    :func:`scene_entry`), the merged GeoPackage and its polygons in EPSG:4326 (or None), the
    start and end times."""

    name: str
    out_dir: Path
    entries: list[dict[str, Any]]
    merged: Path | None
    gdf: Any
    started: str | None
    finished: str | None

    @property
    def has_polygons(self) -> bool:
        return self.gdf is not None and bool(len(self.gdf))

    @property
    def n_merged(self) -> int | None:
        return len(self.gdf) if self.gdf is not None else None

    @property
    def status_counts(self) -> dict[str, int]:
        return charts.status_counts([str(e["outcome"].get("status")) for e in self.entries])


def load_region(out_dir: Path, name: str, outcomes: Iterable[Any], merged: Path | None,
                started: str | None, finished: str | None) -> Region:
    """Read the scenes' reports and footprints and the merged polygons (arguments as
    :func:`pipeline.report.region.render_region_report`)."""
    out_dir = Path(out_dir)
    entries = [scene_entry(outcome_dict(o), out_dir) for o in outcomes]
    merged = Path(merged) if merged else None
    gdf = vectors.read_polygons(merged) if merged is not None and merged.is_file() else None
    if gdf is not None and gdf.crs is not None and gdf.crs.to_epsg() != 4326:
        gdf = gdf.to_crs("EPSG:4326")
    return Region(name, out_dir, entries, merged, gdf, started, finished)


def outcome_dict(outcome: Any) -> dict[str, Any]:
    if is_dataclass(outcome) and not isinstance(outcome, type):
        return asdict(outcome)
    if isinstance(outcome, Mapping):
        return dict(outcome)
    return dict(vars(outcome))


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def link_inside(path: Path, folder: Path) -> str | None:
    """``path`` relative to ``folder`` (a link in the page) when it lies inside it."""
    try:
        rel = os.path.relpath(os.path.realpath(path), os.path.realpath(folder))
    except ValueError:  # another drive
        return None
    return None if rel.startswith("..") else rel.replace(os.sep, "/")


def _grid_footprint(grid: Mapping[str, Any]) -> Any:
    """The grid's outline (densified edges) in EPSG:4326, a shapely polygon; None if unreadable."""
    import shapely
    from pyproj import Transformer

    try:
        a, b, c, d, e, f = (float(v) for v in list(grid["transform"])[:6])
        w, h = int(grid["width"]), int(grid["height"])
        corners = np.array([[0, 0], [w, 0], [w, h], [0, h], [0, 0]], dtype=np.float64)
        xy = np.column_stack([c + corners[:, 0] * a + corners[:, 1] * b, f + corners[:, 0] * d + corners[:, 1] * e])
        ring = shapely.segmentize(shapely.Polygon(xy), max(abs(a) * w, abs(e) * h) / 32)
        to_ll = Transformer.from_crs(str(grid["crs"]), "EPSG:4326", always_xy=True)
        pts = shapely.get_coordinates(ring)
        lon, lat = to_ll.transform(pts[:, 0], pts[:, 1])
        if not (np.all(np.isfinite(lon)) and np.all(np.isfinite(lat))):
            return None
        return shapely.Polygon(np.column_stack([lon, lat]))
    except Exception:  # noqa: BLE001 - a footprint is a nicety
        return None


def _aoi_footprint(config: Path) -> Any:
    """The AOI bounding box of a scene config in EPSG:4326, or None."""
    import shapely

    try:
        from pipeline.core.config import load_scene_config

        cfg = load_scene_config(config)
        if cfg.aoi is None or cfg.aoi.bbox is None:
            return None
        x0, y0, x1, y1 = cfg.aoi.bbox
        box = shapely.segmentize(shapely.box(x0, y0, x1, y1), max(x1 - x0, y1 - y0) / 32)
        if cfg.aoi.crs.upper() in ("EPSG:4326", "WGS84", "OGC:CRS84"):
            return box
        from pyproj import Transformer

        to_ll = Transformer.from_crs(cfg.aoi.crs, "EPSG:4326", always_xy=True)
        pts = shapely.get_coordinates(box)
        lon, lat = to_ll.transform(pts[:, 0], pts[:, 1])
        return shapely.Polygon(np.column_stack([lon, lat]))
    except Exception:  # noqa: BLE001 - the config may be what failed
        return None


def scene_entry(outcome: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """What the page shows of one scene: its outcome, its run's report, its footprint (EPSG:4326)."""
    from pipeline.run.folder import LATEST, REPORT, safe_name

    entry: dict[str, Any] = {"outcome": dict(outcome), "report": None, "run_dir": None, "footprint": None,
                             "footprint_source": None, "link": None}
    run_dir = None
    if outcome.get("geopackage"):
        run_dir = Path(str(outcome["geopackage"])).parent
    elif outcome.get("scene_id"):
        latest = out_dir / safe_name(str(outcome["scene_id"])) / LATEST
        try:
            candidate = latest.parent / latest.read_text(encoding="utf-8").strip()
            if (candidate / REPORT).is_file():
                run_dir = candidate
        except OSError:
            pass
    if run_dir is not None:
        report = read_json(run_dir / REPORT)
        entry["run_dir"] = run_dir
        entry["report"] = report
        if report and isinstance(report.get("grid"), dict):
            entry["footprint"] = _grid_footprint(report["grid"])
            entry["footprint_source"] = ("the scene's grid" if outcome.get("status") != "failed"
                                         else "the grid of the scene's last completed run")
        from pipeline.report.scene import REPORT_HTML

        if (run_dir / REPORT_HTML).is_file():
            entry["link"] = link_inside(run_dir / REPORT_HTML, out_dir)
    if entry["footprint"] is None and isinstance(outcome.get("footprint"), dict):  # a product found
        with suppress(Exception):
            import shapely

            entry["footprint"] = shapely.geometry.shape(outcome["footprint"])
            entry["footprint_source"] = "the product's metadata"
    if entry["footprint"] is None and outcome.get("config") and outcome.get("status") != "excluded":
        aoi = _aoi_footprint(Path(str(outcome["config"])))
        if aoi is not None:
            entry["footprint"], entry["footprint_source"] = aoi, "the AOI of the scene config"
    return entry


def pixel_metres(report: Mapping[str, Any] | None) -> float | None:
    """A scene's pixel size in metres when its grid is projected in metres."""
    try:
        grid = (report or {}).get("grid") or {}
        t = list(grid["transform"])
        from pyproj import CRS

        crs = CRS.from_user_input(grid["crs"])
        if crs.is_geographic:
            return abs(float(t[0])) * METRES_PER_DEGREE
        return abs(float(t[0])) * float(crs.axis_info[0].unit_conversion_factor)
    except Exception:  # noqa: BLE001
        return None

"""The HTML report of a region job: ``<output.dir>/<region name>.report.html``.

One map of the region in plain equirectangular degrees (x = longitude x cos(mid latitude),
y = latitude, in Leaflet's ``L.CRS.Simple``): the merged regional polygons coloured by mean
probability, and each scene's footprint coloured by its outcome (completed, skipped, failed with
its reason). A scene's footprint is its grid (``report.json``'s ``grid``) reprojected to
EPSG:4326; a failed scene shows the footprint of its last completed run in the folder when there
is one, else the AOI of its config when that has a bounding box, else none (it is listed all the
same). Below: the scenes table, with a link to each scene's own report.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, is_dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core import fsutil
from pipeline.report import charts, rasters, vectors
from pipeline.report.page import card, definitions, fmt_area, fmt_bytes, fmt_time, html_document
from pipeline.report.scene import MAX_ZOOM_PIXELS

log = logging.getLogger(__name__)

#: A region report is ``<safe region name><REGION_REPORT_SUFFIX>`` in the region's output folder.
REGION_REPORT_SUFFIX = ".report.html"
#: The colours of the scenes' footprints by outcome.
STATUS_COLOURS = {"completed": "#2e7d32", "skipped": "#1565c0", "failed": "#c62828"}
#: Metres per degree of latitude (mean Earth radius): the region map's unit.
METRES_PER_DEGREE = 6_371_008.8 * math.pi / 180
DASH = "\u2014"


def region_report_path(out_dir: Path, name: str) -> Path:
    """Where the report of region ``name`` goes in its output folder ``out_dir``."""
    from pipeline.run.folder import safe_name

    return Path(out_dir) / f"{safe_name(name)}{REGION_REPORT_SUFFIX}"


def _outcome_dict(outcome: Any) -> dict[str, Any]:
    if is_dataclass(outcome) and not isinstance(outcome, type):
        return asdict(outcome)
    if isinstance(outcome, Mapping):
        return dict(outcome)
    return dict(vars(outcome))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _inside(path: Path, folder: Path) -> str | None:
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


def _scene_entry(outcome: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
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
        report = _read_json(run_dir / REPORT)
        entry["run_dir"] = run_dir
        entry["report"] = report
        if report and isinstance(report.get("grid"), dict):
            entry["footprint"] = _grid_footprint(report["grid"])
            entry["footprint_source"] = ("the scene's grid" if outcome.get("status") != "failed"
                                         else "the grid of the scene's last completed run")
        from pipeline.report.scene import REPORT_HTML

        if (run_dir / REPORT_HTML).is_file():
            entry["link"] = _inside(run_dir / REPORT_HTML, out_dir)
    if entry["footprint"] is None and outcome.get("config"):
        aoi = _aoi_footprint(Path(str(outcome["config"])))
        if aoi is not None:
            entry["footprint"], entry["footprint_source"] = aoi, "the AOI of the scene config"
    return entry


def _scene_pairs(entry: dict[str, Any]) -> list[list[Any]]:
    o, r = entry["outcome"], entry["report"] or {}
    pairs = [["config", o.get("config")], ["scene id", o.get("scene_id") or r.get("scene_id")],
             ["status", o.get("status")]]
    if o.get("error"):
        pairs.append(["reason", o.get("error")])
    pairs += [["acquisition date", r.get("acquisition_date")], ["polygons", o.get("n_polygons")],
              ["seconds", o.get("seconds")], ["attempts", o.get("attempts")],
              ["footprint", entry["footprint_source"]]]
    return [p for p in pairs if p[1] is not None]


def render_region_report(out_dir: Path, name: str, outcomes: Iterable[Any], merged: Path | None = None, *,
                         started: str | None = None, finished: str | None = None) -> bytes:
    """The report page of region ``name`` whose output folder is ``out_dir``, as bytes.

    ``outcomes``: one per scene, :class:`pipeline.run.region.SceneOutcome` objects or the dicts
    the region's state file holds (config, status, scene_id, geopackage, n_polygons, seconds,
    error, attempts); ``merged``: the regional GeoPackage, if any. Reads the scenes'
    ``report.json`` and the merged GeoPackage; writes nothing."""
    import shapely

    out_dir = Path(out_dir)
    entries = [_scene_entry(_outcome_dict(o), out_dir) for o in outcomes]
    merged = Path(merged) if merged else None
    gdf = vectors.read_polygons(merged) if merged is not None and merged.is_file() else None
    if gdf is not None and gdf.crs is not None and gdf.crs.to_epsg() != 4326:
        gdf = gdf.to_crs("EPSG:4326")

    # the map's extent, and its x scale: cos(mid latitude)
    boxes = [shapely.bounds(e["footprint"]) for e in entries if e["footprint"] is not None]
    if gdf is not None and len(gdf):
        boxes.append(np.asarray(gdf.total_bounds, dtype=np.float64))
    notes: list[str] = []
    map_data: dict[str, Any] | None = None
    if boxes:
        b = np.array(boxes, dtype=np.float64)
        west, south, east, north = b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()
        coslat = max(math.cos(math.radians((south + north) / 2)), 0.01)

        def project(geom: Any) -> Any:
            return shapely.transform(geom, lambda xy: xy * np.array([coslat, 1.0]))

        pixels = [_pixel_m(e["report"]) for e in entries if e["report"]]
        pixel_m = min([p for p in pixels if p], default=10.0)
        tol = pixel_m / METRES_PER_DEGREE
        legend: list[dict[str, Any]] = []
        polygons = None
        if gdf is not None and len(gdf):
            frame = gdf.set_geometry(project(np.asarray(gdf.geometry.values, dtype=object)), crs=None)
            payload = vectors.polygon_payload(frame, tolerance=tol, decimals=vectors.coordinate_decimals(tol * 10))
            probs = frame["mean_prob"].to_numpy(dtype=np.float64) if "mean_prob" in frame.columns else np.array([])
            finite = probs[np.isfinite(probs)]
            lo = min(math.floor(float(finite.min()) * 20) / 20, 0.95) if finite.size else 0.5
            polygons = {**payload.data, "label": "merged landslide polygons", "colour_by": "mean_prob",
                        "domain": [lo, 1.0], "ramp": rasters.POLYGON_RAMP}
            legend.append({"kind": "gradient", "label": f"polygon mean probability {lo:.2f} \u2192 1",
                           "css": rasters.css_gradient(rasters.POLYGON_RAMP)})
            notes.append(f"Polygon outlines are simplified for display (about {pixel_m:g} m); areas and all "
                         "attributes are the regional GeoPackage's.")
            if payload.capped:
                notes.append(f"The map shows {payload.n_shown:,} of the {payload.n_total:,} polygons (the "
                             "largest); all of them are in the GeoPackage.")
        features = []
        for e in entries:
            if e["footprint"] is None:
                continue
            o = e["outcome"]
            geom = project(e["footprint"])
            geom = shapely.transform(geom, lambda xy: np.round(xy, 6))
            features.append({"geometry": json.loads(shapely.to_geojson(geom)), "status": str(o.get("status")),
                             "title": str(o.get("scene_id") or Path(str(o.get("config") or "scene")).stem),
                             "pairs": _scene_pairs(e), "link": e["link"]})
        present = sorted({f["status"] for f in features}, key=lambda s: list(STATUS_COLOURS).index(s)
                         if s in STATUS_COLOURS else 99)
        for status in present:
            colour = STATUS_COLOURS.get(status, "#888888")
            legend.append({"kind": "swatch", "label": f"footprint: {status}", "colour": colour,
                           "fill": colour + "22", "dashed": status == "failed"})
        map_data = {
            "bounds": [[south, west * coslat], [north, east * coslat]],
            "unit_m": METRES_PER_DEGREE,
            "max_zoom": math.log2(MAX_ZOOM_PIXELS / tol),
            "coords": {"kind": "lonlat", "label": "lon/lat (EPSG:4326)", "coslat": coslat},
            "images": [],
            "polygons": polygons,
            "footprints": {"label": "scene footprints", "features": features, "colours": STATUS_COLOURS},
            "legend": legend,
        }
        notes.append("The map is in plain equirectangular degrees (longitude scaled by the cosine of the "
                     f"mid latitude, {(south + north) / 2:.3f}\u00b0); there is no basemap.")
    else:
        notes.append("Nothing to map: no scene footprint is known and there are no merged polygons.")

    # -- summary
    statuses = [str(e["outcome"].get("status")) for e in entries]
    counts = charts.status_counts(statuses)
    n_merged = len(gdf) if gdf is not None else None
    total_area = float(gdf["area_m2"].sum()) if gdf is not None and "area_m2" in gdf.columns else None
    merged_link = DASH
    if merged is not None:
        rel = _inside(merged, out_dir)
        merged_link = (f'<a href="{escape(rel)}" download>{escape(merged.name)}</a>' if rel
                       else escape(str(merged)))
        if not merged.is_file():
            merged_link += ' <span class="error">(missing)</span>'
    scenes_text = ", ".join(f'<span class="status {escape(s)}">{n} {escape(s)}</span>' for s, n in counts.items())
    summary = definitions([
        ("region", escape(name)),
        ("scenes", f"{len(entries)}: {scenes_text}" if entries else "none"),
        ("merged polygons", f'<span class="big">{n_merged:,}</span>' if n_merged is not None else DASH),
        ("total area", fmt_area(total_area) if total_area is not None else DASH),
        ("regional layer", merged_link),
        ("started", escape(fmt_time(started))),
        ("finished", escape(fmt_time(finished))),
    ])
    reference = ('<p class="note">This page is a light view. The regional GeoPackage (EPSG:4326, overlaps '
                 'between scenes merged) and each scene\'s GeoPackage are the reference.</p>')
    failed = [e for e in entries if e["outcome"].get("status") == "failed"]
    failed_html = "".join(
        f'<p><b>{escape(str(e["outcome"].get("scene_id") or Path(str(e["outcome"].get("config"))).name))}</b>: '
        f'<span class="error">{escape(str(e["outcome"].get("error") or "no reason recorded"))}</span></p>'
        for e in failed)
    aside = card("Region", summary + reference)
    if failed:
        aside += card(f"Failed scenes ({len(failed)})", failed_html)

    rows = []
    for e in entries:
        o, r = e["outcome"], e["report"] or {}
        status = str(o.get("status"))
        scene = escape(str(o.get("scene_id") or r.get("scene_id") or DASH))
        if e["link"]:
            scene = f'<a href="{escape(e["link"])}">{scene}</a>'
        reason = f'<div class="error">{escape(str(o["error"]))}</div>' if o.get("error") else ""
        footprint = "" if e["footprint"] is not None else '<div class="muted">footprint unknown</div>'
        seconds = o.get("seconds")
        rows.append(
            f'<tr><td>{scene}{reason}{footprint}</td><td><span class="status {escape(status)}">{escape(status)}'
            f'</span></td><td class="num">{escape(str(o.get("n_polygons") if o.get("n_polygons") is not None else DASH))}</td>'
            f'<td class="num">{f"{float(seconds):.1f}" if isinstance(seconds, (int, float)) else DASH}</td>'
            f'<td class="num">{escape(str(o.get("attempts", DASH)))}</td>'
            f'<td class="hash">{escape(str(o.get("config") or DASH))}</td></tr>')
    cards = [card("Scenes", '<table class="scenes"><thead><tr><th>scene</th><th>status</th><th class="num">polygons'
                            '</th><th class="num">seconds</th><th class="num">attempts</th><th>config</th></tr>'
                            f'</thead><tbody>{"".join(rows)}</tbody></table>')]
    hist = []
    if gdf is not None and len(gdf):
        if "area_m2" in gdf.columns:
            hist.append(charts.area_histogram(gdf["area_m2"].to_numpy(dtype=np.float64)))
        if "mean_prob" in gdf.columns:
            hist.append(charts.probability_histogram(gdf["mean_prob"].to_numpy(dtype=np.float64), None))
    hist_html = "".join(h for h in hist if h) or '<p class="muted">no merged polygons</p>'
    cards.append(card("Merged polygons", f'<div class="hists">{hist_html}</div>'))
    notes.append("Made for offline use: everything is inside this one file; it makes no network request.")
    cards.append(card("About this page", "".join(f'<p class="note">{escape(n)}</p>' for n in notes)))
    subtitle = " \u00b7 ".join(x for x in (
        f"{len(entries)} scene(s)", ", ".join(f"{n} {s}" for s, n in counts.items()),
        f"{n_merged:,} merged polygons" if n_merged is not None else None, finished and f"finished {fmt_time(finished)}") if x)
    return html_document(title=f"Region {name}", subtitle=subtitle, aside=aside, cards="\n".join(cards),
                         data={"kind": "region", "map": map_data})


def _pixel_m(report: Mapping[str, Any] | None) -> float | None:
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


def write_region_report(out_dir: Path, name: str, outcomes: Iterable[Any], merged: Path | None = None, *,
                        started: str | None = None, finished: str | None = None) -> Path:
    """Write the report of region ``name`` to ``<out_dir>/<safe name>.report.html`` (atomically);
    returns its path. Arguments as :func:`render_region_report`."""
    path = region_report_path(out_dir, name)
    page = render_region_report(out_dir, name, outcomes, merged, started=started, finished=finished)
    fsutil.write_atomic(path, page)
    log.info("region HTML report %s (%s)", path, fmt_bytes(len(page)))
    return path


def region_state_arguments(state_file: Path) -> dict[str, Any]:
    """The arguments of :func:`render_region_report` / :func:`write_region_report` from a region's
    state file (``<name>.region_state.json``): ``out_dir`` is the file's folder."""
    state_file = Path(state_file)
    state = _read_json(state_file)
    if state is None:
        raise ValueError(f"{state_file}: not a region state file (not a JSON object)")
    scenes = state.get("scenes") or {}
    outcomes = list(scenes.values()) if isinstance(scenes, dict) else list(scenes)
    merged = state.get("merged")
    return {"out_dir": state_file.parent, "name": str(state.get("region") or state_file.name.split(".")[0]),
            "outcomes": outcomes, "merged": Path(merged) if merged else None,
            "started": state.get("started"), "finished": state.get("finished")}

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
from collections.abc import Iterable
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core import fsutil
from pipeline.report import charts, rasters, vectors
from pipeline.report.page import about_card, card, definitions, fmt_area, fmt_bytes, fmt_time, html_document
from pipeline.report.region_data import (
    METRES_PER_DEGREE,
    Region,
    link_inside,
    load_region,
    pixel_metres,
    read_json,
)
from pipeline.report.scene import MAX_ZOOM_PIXELS, Legend

log = logging.getLogger(__name__)

#: A region report is ``<safe region name><REGION_REPORT_SUFFIX>`` in the region's output folder.
REGION_REPORT_SUFFIX = ".report.html"
#: The colours of the scenes' footprints by outcome.
STATUS_COLOURS = {"completed": "#2e7d32", "skipped": "#1565c0", "failed": "#c62828", "excluded": "#757575"}
DASH = "\u2014"


def region_report_path(out_dir: Path, name: str) -> Path:
    """Where the report of region ``name`` goes in its output folder ``out_dir``."""
    from pipeline.run.folder import safe_name

    return Path(out_dir) / f"{safe_name(name)}{REGION_REPORT_SUFFIX}"


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


# -- the map
def _equirect(geom: Any, coslat: float) -> Any:
    """``geom`` (lon/lat) with x = longitude x ``coslat``: the map's plain equirectangular degrees."""
    import shapely

    return shapely.transform(geom, lambda xy: xy * np.array([coslat, 1.0]))


def _map_extent(region: Region) -> tuple[float, float, float, float] | None:
    """West, south, east, north of the footprints and merged polygons; None when there is nothing."""
    import shapely

    boxes = [shapely.bounds(e["footprint"]) for e in region.entries if e["footprint"] is not None]
    if region.has_polygons:
        boxes.append(np.asarray(region.gdf.total_bounds, dtype=np.float64))
    if not boxes:
        return None
    b = np.array(boxes, dtype=np.float64)
    return b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()


def _region_map(region: Region, notes: list[str]) -> dict[str, Any] | None:
    """The map's data in equirectangular degrees (None when nothing is known to map); what the
    reader should know about it is appended to ``notes``."""
    extent = _map_extent(region)
    if extent is None:
        notes.append("Nothing to map: no scene footprint is known and there are no merged polygons.")
        return None
    west, south, east, north = extent
    coslat = max(math.cos(math.radians((south + north) / 2)), 0.01)
    pixels = [pixel_metres(e["report"]) for e in region.entries if e["report"]]
    pixel_m = min([p for p in pixels if p], default=10.0)
    tol = pixel_m / METRES_PER_DEGREE  # degrees: about a pixel
    legend: Legend = []
    polygons = _merged_layer(region.gdf, coslat, pixel_m, legend, notes) if region.has_polygons else None
    features = _footprint_features(region.entries, coslat)
    legend += _footprint_legend(features)
    notes.append("The map is in plain equirectangular degrees (longitude scaled by the cosine of the "
                 f"mid latitude, {(south + north) / 2:.3f}\u00b0); there is no basemap.")
    return {
        "bounds": [[south, west * coslat], [north, east * coslat]],
        "unit_m": METRES_PER_DEGREE,
        "max_zoom": math.log2(MAX_ZOOM_PIXELS / tol),
        "coords": {"kind": "lonlat", "label": "lon/lat (EPSG:4326)", "coslat": coslat},
        "images": [],
        "polygons": polygons,
        "footprints": {"label": "scene footprints", "features": features, "colours": STATUS_COLOURS},
        "legend": legend,
    }


def _merged_layer(gdf: Any, coslat: float, pixel_m: float, legend: Legend, notes: list[str]) -> dict[str, Any]:
    """The merged polygons on the map, simplified at about ``pixel_m`` metres and coloured by mean
    probability; their legend entry and notes are appended to ``legend`` and ``notes``."""
    tol = pixel_m / METRES_PER_DEGREE
    frame = gdf.set_geometry(_equirect(np.asarray(gdf.geometry.values, dtype=object), coslat), crs=None)
    payload = vectors.polygon_payload(frame, tolerance=tol, decimals=vectors.coordinate_decimals(tol * 10))
    probs = frame["mean_prob"].to_numpy(dtype=np.float64) if "mean_prob" in frame.columns else np.array([])
    finite = probs[np.isfinite(probs)]
    lo = min(math.floor(float(finite.min()) * 20) / 20, 0.95) if finite.size else 0.5
    legend.append({"kind": "gradient", "label": f"polygon mean probability {lo:.2f} \u2192 1",
                   "css": rasters.css_gradient(rasters.POLYGON_RAMP)})
    notes.append(f"Polygon outlines are simplified for display (about {pixel_m:g} m); areas and all "
                 "attributes are the regional GeoPackage's.")
    if payload.capped:
        notes.append(f"The map shows {payload.n_shown:,} of the {payload.n_total:,} polygons (the "
                     "largest); all of them are in the GeoPackage.")
    return {**payload.data, "label": "merged landslide polygons", "colour_by": "mean_prob",
            "domain": [lo, 1.0], "ramp": rasters.POLYGON_RAMP}


def _footprint_features(entries: list[dict[str, Any]], coslat: float) -> list[dict[str, Any]]:
    """The scenes' known footprints on the map, each with its status, title, popup pairs and link."""
    import shapely

    features = []
    for e in entries:
        if e["footprint"] is None:
            continue
        o = e["outcome"]
        geom = shapely.transform(_equirect(e["footprint"], coslat), lambda xy: np.round(xy, 6))
        features.append({"geometry": json.loads(shapely.to_geojson(geom)), "status": str(o.get("status")),
                         "title": str(o.get("scene_id") or Path(str(o.get("config") or "scene")).stem),
                         "pairs": _scene_pairs(e), "link": e["link"]})
    return features


def _footprint_legend(features: list[dict[str, Any]]) -> Legend:
    """A swatch per status present among ``features``, in :data:`STATUS_COLOURS` order."""
    order = list(STATUS_COLOURS)
    present = sorted({f["status"] for f in features}, key=lambda s: order.index(s) if s in order else 99)
    legend: Legend = []
    for status in present:
        colour = STATUS_COLOURS.get(status, "#888888")
        legend.append({"kind": "swatch", "label": f"footprint: {status}", "colour": colour,
                       "fill": colour + "22", "dashed": status == "failed"})
    return legend


# -- the summary beside the map
def _region_aside(region: Region) -> str:
    """The region's summary card, and a card of the failed scenes with their reasons if any."""
    reference = ('<p class="note">This page is a light view. The regional GeoPackage (EPSG:4326, overlaps '
                 'between scenes merged) and each scene\'s GeoPackage are the reference.</p>')
    aside = card("Region", _region_summary(region) + reference)
    failed = [e["outcome"] for e in region.entries if e["outcome"].get("status") == "failed"]
    if failed:
        aside += card(f"Failed scenes ({len(failed)})", "".join(map(_failure, failed)))
    return aside


def _failure(outcome: dict[str, Any]) -> str:
    """A failed scene (its id, else its config's file name) and its reason."""
    scene = outcome.get("scene_id") or Path(str(outcome.get("config"))).name
    reason = outcome.get("error") or "no reason recorded"
    return f'<p><b>{escape(str(scene))}</b>: <span class="error">{escape(str(reason))}</span></p>'


def _region_summary(region: Region) -> str:
    gdf, n_merged, entries = region.gdf, region.n_merged, region.entries
    total_area = float(gdf["area_m2"].sum()) if gdf is not None and "area_m2" in gdf.columns else None
    scenes_text = ", ".join(f'<span class="status {escape(s)}">{n} {escape(s)}</span>'
                            for s, n in region.status_counts.items())
    return definitions([
        ("region", escape(region.name)),
        ("scenes", f"{len(entries)}: {scenes_text}" if entries else "none"),
        ("merged polygons", f'<span class="big">{n_merged:,}</span>' if n_merged is not None else DASH),
        ("total area", fmt_area(total_area) if total_area is not None else DASH),
        ("regional layer", _merged_link(region.merged, region.out_dir)),
        ("started", escape(fmt_time(region.started))),
        ("finished", escape(fmt_time(region.finished))),
    ])


def _merged_link(merged: Path | None, out_dir: Path) -> str:
    """A download link to the regional GeoPackage (its path when outside ``out_dir``)."""
    if merged is None:
        return DASH
    rel = link_inside(merged, out_dir)
    link = f'<a href="{escape(rel)}" download>{escape(merged.name)}</a>' if rel else escape(str(merged))
    if not merged.is_file():
        link += ' <span class="error">(missing)</span>'
    return link


# -- the cards below, the header
def _region_cards(region: Region, notes: list[str]) -> list[str]:
    """The scenes table, the merged polygons' histograms and ``notes``."""
    hists = charts.polygon_histograms(region.gdf, None) or '<p class="muted">no merged polygons</p>'
    rows = "".join(_scene_row(e) for e in region.entries)
    scenes = ('<table class="scenes"><thead><tr><th>scene</th><th>status</th><th class="num">polygons'
              '</th><th class="num">seconds</th><th class="num">attempts</th><th>config</th></tr>'
              f'</thead><tbody>{rows}</tbody></table>')
    return [card("Scenes", scenes), card("Merged polygons", f'<div class="hists">{hists}</div>'),
            about_card(notes)]


def _scene_row(entry: dict[str, Any]) -> str:
    """A scene's row in the scenes table: linked id, reason, status, polygons, seconds, attempts, config."""
    o, r = entry["outcome"], entry["report"] or {}
    status = str(o.get("status"))
    scene = escape(str(o.get("scene_id") or r.get("scene_id") or DASH))
    if entry["link"]:
        scene = f'<a href="{escape(entry["link"])}">{scene}</a>'
    reason = f'<div class="error">{escape(str(o["error"]))}</div>' if o.get("error") else \
        f'<div class="muted">not used: {escape(str(o["reason"]))}</div>' if o.get("reason") else ""
    footprint = "" if entry["footprint"] is not None else '<div class="muted">footprint unknown</div>'
    n_polygons = o.get("n_polygons") if o.get("n_polygons") is not None else DASH
    seconds = o.get("seconds")
    return (f'<tr><td>{scene}{reason}{footprint}</td><td><span class="status {escape(status)}">{escape(status)}'
            f'</span></td><td class="num">{escape(str(n_polygons))}</td>'
            f'<td class="num">{f"{float(seconds):.1f}" if isinstance(seconds, (int, float)) else DASH}</td>'
            f'<td class="num">{escape(str(o.get("attempts", DASH)))}</td>'
            f'<td class="hash">{escape(str(o.get("config") or DASH))}</td></tr>')


def _region_subtitle(region: Region) -> str:
    n_merged, finished = region.n_merged, region.finished
    return " \u00b7 ".join(x for x in (
        f"{len(region.entries)} scene(s)", ", ".join(f"{n} {s}" for s, n in region.status_counts.items()),
        f"{n_merged:,} merged polygons" if n_merged is not None else None,
        finished and f"finished {fmt_time(finished)}") if x)


def render_region_report(out_dir: Path, name: str, outcomes: Iterable[Any], merged: Path | None = None, *,
                         started: str | None = None, finished: str | None = None) -> bytes:
    """The report page of region ``name`` whose output folder is ``out_dir``, as bytes.

    ``outcomes``: one per scene, :class:`pipeline.run.region.SceneOutcome` objects or the dicts
    the region's state file holds (config, status, scene_id, geopackage, n_polygons, seconds,
    error, attempts); ``merged``: the regional GeoPackage, if any. Reads the scenes'
    ``report.json`` and the merged GeoPackage; writes nothing."""
    region = load_region(out_dir, name, outcomes, merged, started, finished)
    notes: list[str] = []
    map_data = _region_map(region, notes)
    return html_document(title=f"Region {name}", subtitle=_region_subtitle(region),
                         aside=_region_aside(region), cards="\n".join(_region_cards(region, notes)),
                         data={"kind": "region", "map": map_data})


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
    state = read_json(state_file)
    if state is None:
        raise ValueError(f"{state_file}: not a region state file (not a JSON object)")
    scenes = state.get("scenes") or {}
    outcomes = list(scenes.values()) if isinstance(scenes, dict) else list(scenes)
    merged = state.get("merged")
    return {"out_dir": state_file.parent, "name": str(state.get("region") or state_file.name.split(".")[0]),
            "outcomes": outcomes, "merged": Path(merged) if merged else None,
            "started": state.get("started"), "finished": state.get("finished")}

"""The HTML report of one scene run: ``<run folder>/report.html``.

A map in the grid's own projected coordinates (Leaflet's ``L.CRS.Simple``: no basemap, no
warping; a raster layer is placed exactly on the grid's footprint) with the true-colour
quicklook, the probability (toggle and opacity slider), the uncertainty when the run wrote it, the
pixels without valid input shaded, and the polygons coloured by mean probability (click one
for its attributes); beside it the run's summary, below the stage timings and histograms of
polygon area and mean probability.
"""

from __future__ import annotations

import logging
import math
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core import fsutil
from pipeline.report import assets, charts, rasters, vectors
from pipeline.report.page import about_card, card, definitions, fmt_area, fmt_bytes, fmt_time, html_document
from pipeline.report.scene_data import ReportGrid, SceneRun, load_scene_run, metres_per_unit

log = logging.getLogger(__name__)

#: The page's file name in a run folder.
REPORT_HTML = "report.html"
#: How polygons are simplified for the page: this many grid pixels.
SIMPLIFY_PIXELS = 1.0
DASH = "\u2014"
#: Zooming in stops when a grid pixel is this many screen pixels wide.
MAX_ZOOM_PIXELS = 16

#: A map legend: its entries (gradients and swatches) in order.
Legend = list[dict[str, Any]]


def _processing_level(level: Any) -> str:
    if not isinstance(level, dict):
        return escape(str(level)) if level else "\u2014"
    text = escape(str(level.get("scene") or "unknown"))
    if level.get("source"):
        text += f' <span class="muted">(from {escape(str(level["source"]))})</span>'
    unserved = level.get("unserved") or []
    if unserved:
        text += f'<br><span class="error">not a level the model(s) {escape(", ".join(map(str, unserved)))} were trained on</span>'
    return text


def _models(models: list[dict[str, Any]]) -> str:
    if not models:
        return "\u2014"
    parts = []
    for m in models:
        thr = m.get("threshold")
        thr_text = f' <span class="muted">threshold {float(thr):.3f}</span>' if isinstance(thr, (int, float)) else ""
        parts.append(f'{escape(str(m.get("name", "?")))}{thr_text}<br>'
                     f'<span class="hash">sha256 {escape(str(m.get("sha256", "?")))}</span>')
    return "<br>".join(parts)


# -- the map
def _image(label: str, src: str, bounds: list[list[float]], opacity: float, *, shown: bool, pixelated: bool,
           slider: bool) -> dict[str, Any]:
    """An image layer of the map (``src`` a ``data:`` URI placed on ``bounds``)."""
    return {"label": label, "src": src, "bounds": bounds, "opacity": opacity, "shown": shown,
            "pixelated": pixelated, "slider": slider}


def _scene_map(run: SceneRun, notes: list[str]) -> dict[str, Any] | None:
    """The map's data in the grid's coordinates (None without a grid); what the reader should know
    about it is appended to ``notes``."""
    grid = run.grid
    if grid is None:
        notes.append("No grid is known for this run (no grid in the report, no probability raster): no map.")
        return None
    legend: Legend = []
    images = _raster_images(run.run_dir, grid, legend, notes)
    polygons = _polygon_layer(run, grid, legend, notes)
    decimals = max(0, vectors.coordinate_decimals(grid.pixel) - 1)
    return {
        "bounds": grid.latlng_bounds(),
        "unit_m": metres_per_unit(grid.crs),
        "max_zoom": math.log2(MAX_ZOOM_PIXELS / grid.pixel),
        "coords": {"kind": "xy", "label": grid.crs, "decimals": decimals},
        "images": images,
        "polygons": polygons,
        "footprints": None,
        "legend": legend,
    }


def _raster_images(run_dir: Path, grid: ReportGrid, legend: Legend, notes: list[str]) -> list[dict[str, Any]]:
    """The quicklook, then the probability layers where the run wrote them; their legend entries and
    notes are appended to ``legend`` and ``notes``."""
    images: list[dict[str, Any]] = []
    quick = run_dir / "quicklook.png"
    if quick.is_file():
        ql = rasters.quicklook_image(quick, grid.shape)
        images.append(_image("true colour (quicklook)", assets.data_uri(ql.data, ql.mime),
                             grid.latlng_bounds(ql.cols_covered, ql.rows_covered), 1.0,
                             shown=True, pixelated=False, slider=False))
    if (run_dir / "probability.tif").is_file():
        images += _probability_images(run_dir, grid, not quick.is_file(), legend, notes)
    else:
        notes.append("The run wrote no probability raster (output.probability_cog is off).")
    return images


def _probability_images(run_dir: Path, grid: ReportGrid, shown: bool, legend: Legend,
                        notes: list[str]) -> list[dict[str, Any]]:
    """The probability (``shown`` at first or not), the uncertainty if any and the shading of pixels
    without valid input, from ``probability.tif`` and ``uncertainty.tif``."""
    pl = rasters.probability_layers(run_dir / "probability.tif")
    images = [_image("probability", assets.data_uri(pl.probability_png, "image/png"), grid.latlng_bounds(),
                     0.6, shown=shown, pixelated=True, slider=True)]
    legend.append({"kind": "gradient", "label": "probability 0 \u2192 1",
                   "css": rasters.css_gradient(rasters.PROBABILITY_RAMP)})
    if pl.factor > 1:
        notes.append(f"Rasters are shown at 1/{pl.factor:.3g} of their resolution "
                     f"({pl.shape[1]} x {pl.shape[0]} pixels for a {grid.width} x {grid.height} grid).")
    uncertainty = _uncertainty_image(run_dir / "uncertainty.tif", grid, legend)
    if uncertainty is not None:
        images.append(uncertainty)
    if pl.no_data_png is not None:
        images.append(_image("no valid input", assets.data_uri(pl.no_data_png, "image/png"),
                             grid.latlng_bounds(), 1.0, shown=True, pixelated=True, slider=False))
        r, g, b, a = rasters.NO_DATA_RGBA
        legend.append({"kind": "swatch", "label": "no valid input (cloud, no data, outside the DEM)",
                       "colour": "#999999", "fill": f"rgba({r},{g},{b},{a / 255:.2f})"})
    return images


def _uncertainty_image(path: Path, grid: ReportGrid, legend: Legend) -> dict[str, Any] | None:
    """The uncertainty layer from ``path`` (its legend entry appended to ``legend``); None when the
    run wrote none or it holds no value."""
    ul = rasters.uncertainty_layer(path) if path.is_file() else None
    if ul is None:
        return None
    legend.append({"kind": "gradient", "label": f"uncertainty 0 \u2192 {ul.vmax:.3g}",
                   "css": rasters.css_gradient(rasters.UNCERTAINTY_RAMP)})
    return _image("uncertainty", assets.data_uri(ul.png, "image/png"), grid.latlng_bounds(), 0.7,
                  shown=False, pixelated=True, slider=True)


def _polygon_layer(run: SceneRun, grid: ReportGrid, legend: Legend, notes: list[str]) -> dict[str, Any] | None:
    """The polygons in the grid's CRS, simplified at about a pixel and coloured by mean probability
    from the threshold up; None without polygons."""
    if not run.has_polygons:
        return None
    frame = run.gdf
    if frame.crs is not None and frame.crs.to_string() != grid.crs:
        frame = frame.to_crs(grid.crs)
    payload = vectors.polygon_payload(frame, tolerance=SIMPLIFY_PIXELS * grid.pixel,
                                      decimals=vectors.coordinate_decimals(grid.pixel))
    if run.threshold is not None:
        lo = run.threshold
    else:
        lo = float(np.nanmin(frame["mean_prob"])) if "mean_prob" in frame.columns else 0.0
    lo = min(lo, 0.99)
    legend.append({"kind": "gradient", "label": f"polygon mean probability {lo:.2f} \u2192 1",
                   "css": rasters.css_gradient(rasters.POLYGON_RAMP)})
    notes.append(f"Polygon outlines are simplified for display (tolerance {payload.tolerance:g} "
                 f"{'m' if metres_per_unit(grid.crs) else 'units'}, about "
                 f"{payload.tolerance / grid.pixel:.3g} pixel); areas and all attributes are the GeoPackage's.")
    if payload.capped:
        notes.append(f"The map shows {payload.n_shown:,} of the {payload.n_total:,} polygons (the "
                     "largest); all of them are in the GeoPackage.")
    return {**payload.data, "label": "landslide polygons", "colour_by": "mean_prob",
            "domain": [lo, 1.0], "ramp": rasters.POLYGON_RAMP}


# -- the summary beside the map
def _aside(run: SceneRun) -> str:
    """The cards beside the map: the scene, the detections, the run."""
    gpkg = run.gpkg
    gpkg_link = (f'<a href="{escape(gpkg.name)}" download>{escape(gpkg.name)}</a>' if gpkg is not None
                 else "no GeoPackage found")
    reference = (f'<p class="note">This page is a light view for a first look. The GeoPackage '
                 f'{gpkg_link} is the reference: exact polygons and all attributes.</p>')
    return (card("Scene", _scene_summary(run)) + card("Detections", _detections(run) + reference)
            + card("Run", _run_info(run.report)))


def _scene_summary(run: SceneRun) -> str:
    report = run.report
    models = report.get("models") or []
    return definitions([
        ("scene", escape(run.scene_id)),
        ("acquisition date", escape(str(report.get("acquisition_date") or "unknown"))),
        ("processing level", _processing_level(report.get("processing_level"))),
        ("model" if len(models) <= 1 else "models", _models(models)),
        ("threshold", f"{run.threshold:.3f}" if run.threshold is not None else DASH),
        ("status", escape(str(report.get("status") or DASH))),
    ])


def _detections(run: SceneRun) -> str:
    """The polygon count, total and valid areas, and the grid."""
    grid, n_polygons = run.grid, run.n_polygons
    valid_area = (run.report.get("counts") or {}).get("valid_area_m2")
    grid_area = grid.width * grid.height * abs(grid.a * grid.e) if grid is not None else None
    valid_share = (f' <span class="muted">({100.0 * valid_area / grid_area:.1f}% of the grid)</span>'
                   if valid_area is not None and grid_area else "")
    grid_text = DASH if grid is None else escape(
        f"{grid.width} x {grid.height} px, {grid.pixel:g} {'m' if metres_per_unit(grid.crs) else 'units'}, {grid.crs}")
    return definitions([
        ("polygons", f'<span class="big">{n_polygons:,}</span>' if isinstance(n_polygons, int) else DASH),
        ("total area", fmt_area(run.total_area)),
        ("valid area", fmt_area(valid_area) + valid_share),
        ("grid", grid_text),
    ])


def _run_info(report: dict[str, Any]) -> str:
    return definitions([
        ("run id", f'<span class="hash">{escape(str(report.get("run_id") or DASH))}</span>'),
        ("run key", f'<span class="hash">{escape(str(report.get("run_key") or DASH))}</span>'),
        ("config", f'<span class="hash">{escape(str(report.get("config") or DASH))}</span>'),
        ("finished", escape(fmt_time(report.get("finished")))),
    ])


# -- the cards below, the header
def _cards(run: SceneRun, notes: list[str]) -> list[str]:
    """Histograms, stage timings, output files, inference settings and ``notes``."""
    hists = charts.polygon_histograms(run.gdf, run.threshold) or '<p class="muted">no polygons</p>'
    cards = [card("Polygons", f'<div class="hists">{hists}</div>'),
             card("Stage timings", charts.timings_table(run.report.get("timings_s") or {}))]
    files = run.report.get("output_files") or {}
    if isinstance(files, dict) and files:
        cards.append(_output_files_card(files))
    inference = run.report.get("inference")
    if isinstance(inference, dict) and inference:
        cards.append(card("Inference", definitions([(str(k), escape(str(v))) for k, v in inference.items()])))
    cards.append(about_card(notes))
    return cards


def _output_files_card(files: dict[str, Any]) -> str:
    rows = "".join(
        f'<tr><td>{escape(str(name))}</td><td class="num">{fmt_bytes((rec or {}).get("bytes"))}</td>'
        f'<td class="hash">{escape(str((rec or {}).get("sha256", ""))[:16])}\u2026</td></tr>'
        for name, rec in files.items())
    return card("Output files", f'<table><thead><tr><th>file</th><th class="num">size</th>'
                                f'<th>sha256</th></tr></thead><tbody>{rows}</tbody></table>')


def _subtitle(run: SceneRun) -> str:
    report, n_polygons, total_area = run.report, run.n_polygons, run.total_area
    date = report.get("acquisition_date")
    return " \u00b7 ".join(x for x in (
        f"acquired {date}" if date else None,
        f"{n_polygons:,} polygons" if isinstance(n_polygons, int) else None,
        fmt_area(total_area) if total_area is not None else None,
        f"run {report.get('run_id')}" if report.get("run_id") else None) if x)


def render_html_report(run_dir: Path, report: dict[str, Any]) -> bytes:
    """The report page of the run in ``run_dir`` described by ``report`` (the dict written to
    ``report.json``), as bytes; reads the run's GeoPackage, ``probability.tif``, ``uncertainty.tif``
    and ``quicklook.png`` where present, writes nothing."""
    run = load_scene_run(Path(run_dir), report)
    notes: list[str] = []
    map_data = _scene_map(run, notes)
    return html_document(title=f"Landslides \u2014 {run.scene_id}", subtitle=_subtitle(run),
                         aside=_aside(run), cards="\n".join(_cards(run, notes)),
                         data={"kind": "scene", "map": map_data})


def write_html_report(run_dir: Path, report: dict[str, Any]) -> Path:
    """Write ``run_dir/report.html`` (atomically) for the run that ``report`` (the ``report.json``
    dict) describes; returns its path. One self-contained file: it works offline."""
    run_dir = Path(run_dir)
    path = run_dir / REPORT_HTML
    page = render_html_report(run_dir, report)
    fsutil.write_atomic(path, page)
    log.info("HTML report %s (%s)", path, fmt_bytes(len(page)))
    return path

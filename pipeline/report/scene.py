"""The HTML report of one scene run: ``<run folder>/report.html``.

A map in the grid's own projected coordinates (Leaflet's ``L.CRS.Simple``: no basemap, no
warping; a raster layer is placed exactly on the grid's footprint) with the true-colour
quicklook, the probability (toggle and opacity slider), the uncertainty when the run wrote it, the
pixels without valid input shaded, and the polygons coloured by mean probability (click one
for its attributes); beside it the run's summary, below the stage timings and histograms of
polygon area and mean probability.
"""

from __future__ import annotations

import json
import logging
import math
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core import fsutil
from pipeline.report import assets, charts, rasters, vectors
from pipeline.report.page import card, definitions, fmt_area, fmt_bytes, fmt_time, html_document

log = logging.getLogger(__name__)

#: The page's file name in a run folder.
REPORT_HTML = "report.html"
#: How polygons are simplified for the page: this many grid pixels.
SIMPLIFY_PIXELS = 1.0
DASH = "\u2014"
#: Zooming in stops when a grid pixel is this many screen pixels wide.
MAX_ZOOM_PIXELS = 16


class _Grid:
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


def _grid(run_dir: Path, report: dict[str, Any]) -> _Grid | None:
    g = report.get("grid")
    if isinstance(g, dict) and {"crs", "transform", "width", "height"} <= g.keys():
        return _Grid(str(g["crs"]), list(g["transform"]), int(g["width"]), int(g["height"]))
    prob = run_dir / "probability.tif"
    if prob.is_file():
        import rasterio

        with rasterio.Env(GDAL_PAM_ENABLED="NO"), rasterio.open(prob) as src:
            return _Grid(src.crs.to_string(), list(src.transform)[:6], src.width, src.height)
    return None


def _metres_per_unit(crs: str) -> float | None:
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


def render_html_report(run_dir: Path, report: dict[str, Any]) -> bytes:
    """The report page of the run in ``run_dir`` described by ``report`` (the dict written to
    ``report.json``), as bytes; reads the run's GeoPackage, ``probability.tif``, ``uncertainty.tif``
    and ``quicklook.png`` where present, writes nothing."""
    run_dir = Path(run_dir)
    grid = _grid(run_dir, report)
    gpkg = _geopackage(run_dir, report)
    gdf = vectors.read_polygons(gpkg) if gpkg is not None else None
    gpkg_meta = _gpkg_metadata(gpkg) if gpkg is not None else {}
    threshold = _threshold(run_dir, report, gpkg_meta)
    scene_id = str(report.get("scene_id") or gpkg_meta.get("scene_id") or run_dir.parent.name)
    counts = report.get("counts") or {}

    notes: list[str] = []
    map_data: dict[str, Any] | None = None
    legend: list[dict[str, Any]] = []
    if grid is None and gdf is not None and len(gdf) and gdf.crs is not None:
        x0, y0, x1, y1 = gdf.total_bounds
        grid = _Grid(gdf.crs.to_string(), [1.0, 0.0, x0, 0.0, -1.0, y1], max(1, int(x1 - x0)), max(1, int(y1 - y0)))
    if grid is not None:
        images: list[dict[str, Any]] = []
        quick = run_dir / "quicklook.png"
        if quick.is_file():
            ql = rasters.quicklook_image(quick, grid.shape)
            images.append({"label": "true colour (quicklook)", "src": assets.data_uri(ql.data, ql.mime),
                           "bounds": grid.latlng_bounds(ql.cols_covered, ql.rows_covered), "opacity": 1.0,
                           "shown": True, "pixelated": False, "slider": False})
        prob_path = run_dir / "probability.tif"
        shown_prob = not quick.is_file()
        if prob_path.is_file():
            pl = rasters.probability_layers(prob_path)
            images.append({"label": "probability", "src": assets.data_uri(pl.probability_png, "image/png"),
                           "bounds": grid.latlng_bounds(), "opacity": 0.6, "shown": shown_prob,
                           "pixelated": True, "slider": True})
            legend.append({"kind": "gradient", "label": "probability 0 \u2192 1",
                           "css": rasters.css_gradient(rasters.PROBABILITY_RAMP)})
            if pl.factor > 1:
                notes.append(f"Rasters are shown at 1/{pl.factor:.3g} of their resolution "
                             f"({pl.shape[1]} x {pl.shape[0]} pixels for a {grid.width} x {grid.height} grid).")
            unc_path = run_dir / "uncertainty.tif"
            if unc_path.is_file():
                ul = rasters.uncertainty_layer(unc_path)
                if ul is not None:
                    images.append({"label": "uncertainty", "src": assets.data_uri(ul.png, "image/png"),
                                   "bounds": grid.latlng_bounds(), "opacity": 0.7, "shown": False,
                                   "pixelated": True, "slider": True})
                    legend.append({"kind": "gradient", "label": f"uncertainty 0 \u2192 {ul.vmax:.3g}",
                                   "css": rasters.css_gradient(rasters.UNCERTAINTY_RAMP)})
            if pl.no_data_png is not None:
                images.append({"label": "no valid input", "src": assets.data_uri(pl.no_data_png, "image/png"),
                               "bounds": grid.latlng_bounds(), "opacity": 1.0, "shown": True,
                               "pixelated": True, "slider": False})
                r, g_, b, a = rasters.NO_DATA_RGBA
                legend.append({"kind": "swatch", "label": "no valid input (cloud, no data, outside the DEM)",
                               "colour": "#999999", "fill": f"rgba({r},{g_},{b},{a / 255:.2f})"})
        else:
            notes.append("The run wrote no probability raster (output.probability_cog is off).")

        polygons = None
        if gdf is not None and len(gdf):
            frame = gdf
            if gdf.crs is not None and gdf.crs.to_string() != grid.crs:
                frame = gdf.to_crs(grid.crs)
            tol = SIMPLIFY_PIXELS * grid.pixel
            payload = vectors.polygon_payload(frame, tolerance=tol, decimals=vectors.coordinate_decimals(grid.pixel))
            probs = frame["mean_prob"] if "mean_prob" in frame.columns else None
            lo = threshold if threshold is not None else (float(np.nanmin(probs)) if probs is not None else 0.0)
            lo = min(lo, 0.99)
            polygons = {**payload.data, "label": "landslide polygons", "colour_by": "mean_prob",
                        "domain": [lo, 1.0], "ramp": rasters.POLYGON_RAMP}
            legend.append({"kind": "gradient", "label": f"polygon mean probability {lo:.2f} \u2192 1",
                           "css": rasters.css_gradient(rasters.POLYGON_RAMP)})
            notes.append(f"Polygon outlines are simplified for display (tolerance {payload.tolerance:g} "
                         f"{'m' if _metres_per_unit(grid.crs) else 'units'}, about "
                         f"{payload.tolerance / grid.pixel:.3g} pixel); areas and all attributes are the "
                         "GeoPackage's.")
            if payload.capped:
                notes.append(f"The map shows {payload.n_shown:,} of the {payload.n_total:,} polygons (the "
                             "largest); all of them are in the GeoPackage.")
        decimals = max(0, vectors.coordinate_decimals(grid.pixel) - 1)
        map_data = {
            "bounds": grid.latlng_bounds(),
            "unit_m": _metres_per_unit(grid.crs),
            "max_zoom": math.log2(MAX_ZOOM_PIXELS / grid.pixel),
            "coords": {"kind": "xy", "label": grid.crs, "decimals": decimals},
            "images": images,
            "polygons": polygons,
            "footprints": None,
            "legend": legend,
        }
    else:
        notes.append("No grid is known for this run (no grid in the report, no probability raster): no map.")

    # -- the summary beside the map
    valid_area = counts.get("valid_area_m2")
    grid_area = grid.width * grid.height * abs(grid.a * grid.e) if grid is not None else None
    valid_share = (f' <span class="muted">({100.0 * valid_area / grid_area:.1f}% of the grid)</span>'
                   if valid_area is not None and grid_area else "")
    n_polygons = counts.get("polygons", len(gdf) if gdf is not None else None)
    total_area = counts.get("total_area_m2",
                            float(gdf["area_m2"].sum()) if gdf is not None and "area_m2" in gdf.columns else None)
    summary = definitions([
        ("scene", escape(scene_id)),
        ("acquisition date", escape(str(report.get("acquisition_date") or "unknown"))),
        ("processing level", _processing_level(report.get("processing_level"))),
        ("model" if len(report.get("models") or []) <= 1 else "models", _models(report.get("models") or [])),
        ("threshold", f"{threshold:.3f}" if threshold is not None else "\u2014"),
        ("status", escape(str(report.get("status") or "\u2014"))),
    ])
    figures = definitions([
        ("polygons", f'<span class="big">{n_polygons:,}</span>' if isinstance(n_polygons, int) else "\u2014"),
        ("total area", fmt_area(total_area)),
        ("valid area", fmt_area(valid_area) + valid_share),
        ("grid", escape(f"{grid.width} x {grid.height} px, {grid.pixel:g} {'m' if _metres_per_unit(grid.crs) else 'units'}, {grid.crs}")
         if grid is not None else "\u2014"),
    ])
    run_info = definitions([
        ("run id", f'<span class="hash">{escape(str(report.get("run_id") or DASH))}</span>'),
        ("run key", f'<span class="hash">{escape(str(report.get("run_key") or DASH))}</span>'),
        ("config", f'<span class="hash">{escape(str(report.get("config") or DASH))}</span>'),
        ("finished", escape(fmt_time(report.get("finished")))),
    ])
    gpkg_link = (f'<a href="{escape(gpkg.name)}" download>{escape(gpkg.name)}</a>' if gpkg is not None
                 else "no GeoPackage found")
    reference = (f'<p class="note">This page is a light view for a first look. The GeoPackage '
                 f'{gpkg_link} is the reference: exact polygons and all attributes.</p>')
    aside = (card("Scene", summary) + card("Detections", figures + reference) + card("Run", run_info))

    # -- the cards below
    cards = []
    hist = []
    if gdf is not None and len(gdf):
        if "area_m2" in gdf.columns:
            hist.append(charts.area_histogram(gdf["area_m2"].to_numpy(dtype=np.float64)))
        if "mean_prob" in gdf.columns:
            hist.append(charts.probability_histogram(gdf["mean_prob"].to_numpy(dtype=np.float64), threshold))
    hist_html = "".join(h for h in hist if h) or '<p class="muted">no polygons</p>'
    cards.append(card("Polygons", f'<div class="hists">{hist_html}</div>'))
    cards.append(card("Stage timings", charts.timings_table(report.get("timings_s") or {})))
    files = report.get("output_files") or {}
    if isinstance(files, dict) and files:
        rows = "".join(
            f'<tr><td>{escape(str(name))}</td><td class="num">{fmt_bytes((rec or {}).get("bytes"))}</td>'
            f'<td class="hash">{escape(str((rec or {}).get("sha256", ""))[:16])}\u2026</td></tr>'
            for name, rec in files.items())
        cards.append(card("Output files", f'<table><thead><tr><th>file</th><th class="num">size</th>'
                                          f'<th>sha256</th></tr></thead><tbody>{rows}</tbody></table>'))
    inference = report.get("inference")
    if isinstance(inference, dict) and inference:
        cards.append(card("Inference", definitions([(str(k), escape(str(v))) for k, v in inference.items()])))
    notes.append("Made for offline use: everything is inside this one file; it makes no network request.")
    cards.append(card("About this page", "".join(f'<p class="note">{escape(n)}</p>' for n in notes)))

    date = report.get("acquisition_date")
    subtitle = " \u00b7 ".join(x for x in (
        f"acquired {date}" if date else None,
        f"{n_polygons:,} polygons" if isinstance(n_polygons, int) else None,
        fmt_area(total_area) if total_area is not None else None,
        f"run {report.get('run_id')}" if report.get("run_id") else None) if x)
    return html_document(title=f"Landslides \u2014 {scene_id}", subtitle=subtitle, aside=aside,
                         cards="\n".join(cards), data={"kind": "scene", "map": map_data})


def write_html_report(run_dir: Path, report: dict[str, Any]) -> Path:
    """Write ``run_dir/report.html`` (atomically) for the run that ``report`` (the ``report.json``
    dict) describes; returns its path. One self-contained file: it works offline."""
    run_dir = Path(run_dir)
    path = run_dir / REPORT_HTML
    page = render_html_report(run_dir, report)
    fsutil.write_atomic(path, page)
    log.info("HTML report %s (%s)", path, fmt_bytes(len(page)))
    return path

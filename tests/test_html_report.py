"""The HTML map reports (pipeline.report): one self-contained, offline page per run and per region.

Synthetic run folders are built here (a probability COG-like GeoTIFF, a quicklook, a GeoPackage
with run metadata, a report dict); the browser tests open the written pages in headless Chromium
(skipped where it is not installed) and check what the map shows and that no request leaves.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import socket
import subprocess
import threading
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

GRID_CRS = "EPSG:32633"
TRANSFORM = [10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0]
WIDTH, HEIGHT = 120, 100
NODATA_COLS = 10  # the leftmost columns have no valid input
SHA = "ab" * 32
THRESHOLD = 0.5


# -- building synthetic run folders (also used by test_view.py) ------------------------------
def _boxes() -> list[tuple[float, float, float, float]]:
    x0, y0 = TRANSFORM[2], TRANSFORM[5]
    # (col0, row0, col1, row1) in pixels -> metres
    px = [(20, 10, 30, 25), (50, 40, 70, 55), (90, 70, 95, 90)]
    return [(x0 + c0 * 10, y0 - r1 * 10, x0 + c1 * 10, y0 - r0 * 10) for c0, r0, c1, r1 in px]


def write_polygons(path: Path, *, crs: str = GRID_CRS, n: int | None = None, scene_id: str = "S2_TEST",
                   extra: dict[str, Any] | None = None) -> Any:
    """A ``landslides`` layer with the run's attributes and run metadata (the kind that GDAL would
    write to a ``.aux.xml`` sidecar if it were read with PAM on)."""
    import geopandas as gpd
    import pyogrio
    from shapely.geometry import box

    boxes = _boxes() if n is None else [
        (500100 + 60 * (i % 15), 4999100 + 60 * (i // 15), 500140 + 60 * (i % 15), 4999100 + 60 * (i // 15) + 20 + i % 3 * 10)
        for i in range(n)]
    geoms = [box(*b) for b in boxes]
    k = len(geoms)
    gdf = gpd.GeoDataFrame({
        "landslide_id": [f"id{i:04d}" for i in range(k)],
        "area_m2": [g.area for g in geoms],
        "perimeter_m": [g.length for g in geoms],
        "mean_prob": np.linspace(0.55, 0.95, k) if k else [],
        "max_prob": np.linspace(0.7, 1.0, k) if k else [],
        "mean_slope": np.linspace(20, 35, k) if k else [],
        "centroid_lon": np.full(k, 15.0),
        "centroid_lat": np.full(k, 45.1),
        "scene_id": [scene_id] * k,
        "acq_date": ["2024-05-01"] * k,
        "model_name": ["test-model"] * k,
        "model_sha256": [SHA] * k,
        "run_id": ["run-1"] * k,
        **(extra or {}),
    }, geometry=geoms, crs=GRID_CRS)
    if crs != GRID_CRS:
        gdf = gdf.to_crs(crs)
    meta = {"landslide_run": json.dumps({"threshold": THRESHOLD, "scene_id": scene_id})}
    pyogrio.write_dataframe(gdf, path, layer="landslides", driver="GPKG", dataset_metadata=meta,
                            layer_metadata=meta)
    for side in path.parent.glob("*.aux.xml"):
        side.unlink()
    return gdf


def write_probability(path: Path, *, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    import rasterio
    from rasterio.transform import Affine

    codes = np.tile(np.linspace(0, 254, width).round().astype(np.uint8), (height, 1))
    codes[:, :NODATA_COLS] = 255
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=1, dtype="uint8",
                       crs=GRID_CRS, transform=Affine(*TRANSFORM), nodata=255, tiled=True,
                       blockxsize=64, blockysize=64) as dst:
        dst.write(codes, 1)
        dst.update_tags(1, threshold=str(THRESHOLD))
    return codes


def write_quicklook(path: Path, *, width: int = WIDTH, height: int = HEIGHT) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(40, 200, (height, width, 3), dtype=np.uint8)
    rgb[:, :NODATA_COLS] = 0
    Image.fromarray(rgb, "RGB").save(path)


def make_report(scene_id: str = "S2_TEST", n_polygons: int = 3, total_area: float = 4500.0,
                grid: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "status": "completed",
        "run_id": "run-1",
        "run_key": "f" * 64,
        "scene_id": scene_id,
        "acquisition_date": "2024-05-01",
        "config": "/data/scene.yaml",
        "config_resolved": {"postprocess": {"threshold": None}},
        "models": [{"name": "test-model", "path": "/m.safetensors", "sha256": SHA, "threshold": 0.61}],
        "grid": grid or {"crs": GRID_CRS, "transform": TRANSFORM, "width": WIDTH, "height": HEIGHT},
        "processing_level": {"scene": "L2A", "source": "product", "models": {"test-model": ["L2A"]},
                             "served": True, "unserved": []},
        "timings_s": {"stack-graph": 0.5, "infer": 12.0, "postprocess": 1.5, "write": 2.0, "total": 16.0},
        "inference": {"windows": 4, "worker_threads": 2},
        "counts": {"polygons": n_polygons, "total_area_m2": total_area,
                   "valid_pixels": (WIDTH - NODATA_COLS) * HEIGHT,
                   "valid_area_m2": (WIDTH - NODATA_COLS) * HEIGHT * 100.0},
        "outputs": [f"{scene_id}_landslides.gpkg", "probability.tif", "quicklook.png", "report.json"],
        "output_files": {f"{scene_id}_landslides.gpkg": {"bytes": 1, "sha256": "0" * 64}},
        "finished": "2024-05-02T10:00:00+00:00",
    }


def make_run_folder(root: Path, *, scene_id: str = "S2_TEST", key: str = "run-0123456789ab",
                    quicklook: bool = True, probability: bool = True, n: int | None = None,
                    crs: str = GRID_CRS, write_json: bool = True) -> tuple[Path, dict[str, Any]]:
    """``root/<scene_id>/<key>/`` with a GeoPackage, probability.tif, quicklook.png, report.json and
    ``LATEST`` in the scene folder; returns the run folder and its report dict."""
    run_dir = root / scene_id / key
    run_dir.mkdir(parents=True)
    gdf = write_polygons(run_dir / f"{scene_id}_landslides.gpkg", crs=crs, n=n, scene_id=scene_id)
    if probability:
        write_probability(run_dir / "probability.tif")
    if quicklook:
        write_quicklook(run_dir / "quicklook.png")
    report = make_report(scene_id, len(gdf), float(gdf.to_crs(GRID_CRS).area.sum()))
    if write_json:
        (run_dir / "report.json").write_text(json.dumps(report))
    (run_dir.parent / "LATEST").write_text(key + "\n")
    return run_dir, report


def report_data(html: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.DOTALL)
    assert match, "no report data"
    return json.loads(match.group(1))


def decode_data_uri(uri: str) -> tuple[str, bytes]:
    head, _, payload = uri.partition(",")
    assert head.startswith("data:") and head.endswith(";base64"), head
    return head[5:-7], base64.b64decode(payload)


URL = re.compile(r"https?://[^\s'\"<>)]+", re.IGNORECASE)
#: The only http(s) strings a page holds, all inside the inlined Leaflet: the SVG namespace name
#: (an identifier, never fetched) and Leaflet's home page (in its licence header, and in the
#: attribution prefix, which the report's map does not show).
ALLOWED_IN_LEAFLET = {"http://www.w3.org/2000/svg", "https://leafletjs.com"}


def assert_offline_html(html: str) -> None:
    """No URL that the page could fetch: nothing in src/href/url()/@import/srcset/fetch points
    outside, and the only http(s) strings are Leaflet's own, inside its script."""
    from pipeline.report import assets

    leaflet = assets.leaflet_js()
    assert html.count(leaflet) == 1
    rest = html.replace(leaflet, "")
    assert URL.findall(rest) == [], URL.findall(rest)[:5]
    assert set(URL.findall(leaflet)) <= ALLOWED_IN_LEAFLET
    assert not re.search(r"""(src|href|srcset|action)\s*=\s*["']?\s*(https?:)?//""", rest, re.IGNORECASE)
    assert not re.search(r"url\(\s*['\"]?\s*(https?:)?//", html, re.IGNORECASE)
    assert "@import" not in html
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', html)
    assert csp and "default-src 'none'" in unescape(csp.group(1))  # the browser refuses any request


# -- the scene page -------------------------------------------------------------------------------
@pytest.fixture()
def run_folder(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    return make_run_folder(tmp_path)


def test_scene_report_is_one_offline_file(run_folder: tuple[Path, dict[str, Any]]) -> None:
    from pipeline.report import write_html_report

    run_dir, report = run_folder
    before = sorted(p.name for p in run_dir.iterdir())
    path = write_html_report(run_dir, report)
    assert path == run_dir / "report.html"
    # nothing else appeared: no temporary file, no .gpkg.aux.xml / .tif.aux.xml sidecar
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([*before, "report.html"])
    html = path.read_text(encoding="utf-8")
    assert_offline_html(html)
    assert html.count("</script>") == 3  # Leaflet, the data, the page's script: nothing injected
    for img in re.findall(r"<img[^>]*>", html):
        assert 'src="data:' in img


def test_scene_report_map_layers(run_folder: tuple[Path, dict[str, Any]]) -> None:
    from PIL import Image

    from pipeline.report import render_html_report

    run_dir, report = run_folder
    data = report_data(render_html_report(run_dir, report).decode())
    m = data["map"]
    west, north = TRANSFORM[2], TRANSFORM[5]
    east, south = west + WIDTH * 10, north - HEIGHT * 10
    assert m["bounds"] == [[south, west], [north, east]]
    assert m["unit_m"] == 1.0
    images = {im["label"]: im for im in m["images"]}
    assert list(images) == ["true colour (quicklook)", "probability", "no valid input"]
    for im in images.values():
        assert im["bounds"] == [[south, west], [north, east]]  # exact: the grid's footprint
    assert images["probability"]["slider"] and images["probability"]["pixelated"]
    # the probability: palette PNG on the grid, transparent where there is no data
    mime, png = decode_data_uri(images["probability"]["src"])
    assert mime == "image/png"
    with Image.open(io.BytesIO(png)) as im:
        assert im.size == (WIDTH, HEIGHT)
        rgba = np.asarray(im.convert("RGBA"))
    assert (rgba[:, :NODATA_COLS, 3] == 0).all()
    assert (rgba[:, NODATA_COLS:, 3] == 255).all()
    # the ramp: low codes dark purple, high codes yellow
    assert tuple(rgba[0, NODATA_COLS, :3]) != tuple(rgba[0, -1, :3])
    assert rgba[0, -1, 0] > 200 and rgba[0, -1, 1] > 200  # yellow at p = 1
    # the shading of pixels without valid input: exactly there
    _, shade = decode_data_uri(images["no valid input"]["src"])
    with Image.open(io.BytesIO(shade)) as im:
        alpha = np.asarray(im.convert("RGBA"))[..., 3]
    assert (alpha[:, :NODATA_COLS] > 0).all() and (alpha[:, NODATA_COLS:] == 0).all()
    # the polygons: all three, attributes column-wise, constant columns once
    pg = m["polygons"]
    assert len(pg["geometries"]) == len(pg["rows"]) == 3
    assert pg["columns"][:4] == ["landslide_id", "area_m2", "perimeter_m", "mean_prob"]
    assert pg["constants"]["model_sha256"] == SHA and pg["constants"]["scene_id"] == "S2_TEST"
    assert pg["colour_by"] == "mean_prob" and pg["domain"] == [THRESHOLD, 1.0]
    ring = np.array(pg["geometries"][0]["coordinates"][0])
    assert ring[:, 0].min() == west + 200 and ring[:, 1].max() == north - 100  # in the grid's metres


def test_scene_report_summary(run_folder: tuple[Path, dict[str, Any]]) -> None:
    from pipeline.report import render_html_report

    run_dir, report = run_folder
    html = render_html_report(run_dir, report).decode()
    body = html.split("<body>", 1)[1].split("<script>", 1)[0]
    for text in ("S2_TEST", "2024-05-01", "L2A", "test-model", SHA, "0.500", "5.50 ha",
                 "1.10 km²", "91.7% of the grid", "S2_TEST_landslides.gpkg", "is the reference",
                 "2024-05-02 10:00:00 UTC"):
        assert text in body, text
    assert re.search(r'<span class="big">3</span>', body)
    # the threshold from the probability raster's tag, not the model's own 0.61
    assert "threshold 0.610" in body  # shown as the model's own
    # stage timings: a row per stage, total last
    assert re.findall(r'<table class="timings">.*?</table>', body, re.DOTALL)
    for stage in ("stack-graph", "infer", "postprocess", "write", "total"):
        assert f"<th scope=\"row\">{stage}</th>" in body
    # histograms of area and mean probability, inline SVG
    svgs = re.findall(r'<svg class="hist (area|prob)"', body)
    assert svgs == ["area", "prob"]
    assert "threshold 0.50" in body


def test_polygons_in_lon_lat_are_drawn_in_the_grid_crs(tmp_path: Path) -> None:
    from pipeline.report import render_html_report

    run_dir, report = make_run_folder(tmp_path, crs="EPSG:4326")
    pg = report_data(render_html_report(run_dir, report).decode())["map"]["polygons"]
    xy = np.concatenate([np.array(g["coordinates"][0]) for g in pg["geometries"]])
    assert xy[:, 0].min() > TRANSFORM[2] and xy[:, 0].max() < TRANSFORM[2] + WIDTH * 10
    assert abs(xy[:, 0].min() - (TRANSFORM[2] + 200)) < 1.0


def test_report_without_rasters_or_polygons(tmp_path: Path) -> None:
    """A run with the probability COG and the quicklook switched off, and no polygons: a page all the
    same (the map from the report's grid)."""
    from pipeline.report import write_html_report

    run_dir, report = make_run_folder(tmp_path, quicklook=False, probability=False, n=0)
    html = write_html_report(run_dir, report).read_text(encoding="utf-8")
    data = report_data(html)
    assert data["map"]["images"] == [] and data["map"]["polygons"] is None
    assert "no polygons" in html and "output.probability_cog is off" in html
    assert not list(run_dir.glob("*.aux.xml"))


def test_hostile_attribute_values_stay_text(tmp_path: Path) -> None:
    from pipeline.report import render_html_report

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    evil = "</script><script>alert(1)</script><b>"
    write_polygons(run_dir / "x_landslides.gpkg", scene_id=evil, extra={"note": [evil, "a", "b"]})
    report = make_report(scene_id=evil)
    html = render_html_report(run_dir, report).decode()
    assert html.count("</script>") == 3
    assert "<b>" not in html.split("<body>", 1)[1]
    polygons = report_data(html)["map"]["polygons"]
    assert polygons["constants"]["scene_id"] == evil and [r[-1] for r in polygons["rows"]] == [evil, "a", "b"]


def test_polygon_payload_simplifies_and_caps(tmp_path: Path) -> None:
    import geopandas as gpd
    import shapely

    from pipeline.report.vectors import polygon_payload

    # a staircase (pixel edges) of 10 m steps: simplified at one pixel it keeps few vertices
    steps = [(i * 10.0, i * 10.0) for i in range(40)]
    ring = [(0.0, 0.0)]
    for x, y in steps[1:]:
        ring += [(x, ring[-1][1]), (x, y)]
    ring += [(ring[-1][0], 0.0)]
    stair = shapely.Polygon(ring)
    gdf = gpd.GeoDataFrame({"area_m2": [stair.area], "mean_prob": [0.9]}, geometry=[stair])
    full = polygon_payload(gdf, tolerance=0, decimals=1)
    simple = polygon_payload(gdf, tolerance=10.0, decimals=1)
    n_full = len(full.data["geometries"][0]["coordinates"][0])
    n_simple = len(simple.data["geometries"][0]["coordinates"][0])
    assert n_simple < n_full / 5
    # capped by count: the largest are kept, in the file's order
    boxes = [shapely.box(0, 0, 10 + i, 10) for i in range(50)]
    many = gpd.GeoDataFrame({"area_m2": [b.area for b in boxes]}, geometry=boxes)
    capped = polygon_payload(many, tolerance=0, decimals=0, max_features=10)
    assert capped.capped and capped.n_shown == 10 and capped.n_total == 50
    areas = [r[0] for r in capped.data["rows"]]
    assert areas == sorted(areas) and min(areas) == boxes[40].area
    # capped by size: the tolerance grows, then the smallest are left out
    small = polygon_payload(many, tolerance=0.1, decimals=0, max_bytes=2000)
    assert small.geometry_bytes <= 2000 and 0 < small.n_shown < 50 and small.tolerance > 0.1


def test_rasters_are_downsampled(tmp_path: Path) -> None:
    from PIL import Image

    from pipeline.report import rasters

    path = tmp_path / "probability.tif"
    write_probability(path, width=300, height=90)
    layers = rasters.probability_layers(path, max_size=64)
    with Image.open(io.BytesIO(layers.probability_png)) as im:
        assert max(im.size) <= 64 and im.size == (60, 18)
    assert layers.factor == 5.0
    # the quicklook of a large grid: the part of the grid it was averaged from (whole blocks of 3)
    ql = tmp_path / "quicklook.png"
    write_quicklook(ql, width=100, height=33)
    q = rasters.quicklook_image(ql, (101, 302))
    assert (q.cols_covered, q.rows_covered) == (300, 99)


# -- the region page ---------------------------------------------------------------------------------
def make_region(out: Path) -> dict[str, Any]:
    """A region folder: two scenes completed/skipped, one failed with an earlier completed run, one
    failed with nothing; the merged layer in EPSG:4326."""
    import geopandas as gpd
    import pandas as pd
    import pyogrio

    from pipeline.report.vectors import read_polygons

    a_dir, _ = make_run_folder(out, scene_id="SCENE_A")
    b_dir, b_report = make_run_folder(out, scene_id="SCENE_B")
    b_report["grid"]["transform"] = [10.0, 0.0, 501000.0, 0.0, -10.0, 5000000.0]
    (b_dir / "report.json").write_text(json.dumps(b_report))
    c_dir, c_report = make_run_folder(out, scene_id="SCENE_C")
    c_report["grid"]["transform"] = [10.0, 0.0, 500000.0, 0.0, -10.0, 4999000.0]
    (c_dir / "report.json").write_text(json.dumps(c_report))
    (a_dir / "report.html").write_text("<html></html>")
    # the regional layer: both scenes' polygons in EPSG:4326 (B's lie 1 km east of A's)
    frames = [read_polygons(d / f"{d.parent.name}_landslides.gpkg") for d in (a_dir, b_dir)]
    frames[1] = frames[1].set_geometry(frames[1].geometry.translate(1000.0, 0.0))
    merged = gpd.GeoDataFrame(pd.concat([f.to_crs("EPSG:4326") for f in frames], ignore_index=True),
                              crs="EPSG:4326")
    pyogrio.write_dataframe(merged, out / "night.gpkg", layer="landslides", driver="GPKG")
    outcomes = [
        {"config": "/cfg/a.yaml", "status": "completed", "scene_id": "SCENE_A",
         "geopackage": str(a_dir / "SCENE_A_landslides.gpkg"), "n_polygons": 3, "seconds": 10.0, "error": None,
         "attempts": 1},
        {"config": "/cfg/b.yaml", "status": "skipped", "scene_id": "SCENE_B",
         "geopackage": str(b_dir / "SCENE_B_landslides.gpkg"), "n_polygons": 3, "seconds": 0.1, "error": None,
         "attempts": 1},
        {"config": "/cfg/c.yaml", "status": "failed", "scene_id": "SCENE_C", "geopackage": None,
         "n_polygons": None, "seconds": 3.0, "error": "InputError: band B04 <unreadable>", "attempts": 2},
        {"config": "/cfg/d.yaml", "status": "failed", "scene_id": None, "geopackage": None,
         "n_polygons": None, "seconds": 0.0, "error": "ConfigError: /cfg/d.yaml: no such file", "attempts": 1},
    ]
    return {"out_dir": out, "name": "night", "outcomes": outcomes, "merged": out / "night.gpkg",
            "started": "2024-05-02T01:00:00+00:00", "finished": "2024-05-02T02:00:00+00:00"}


def test_region_report(tmp_path: Path) -> None:
    from pipeline.report import write_region_report
    from pipeline.run.region import SceneOutcome

    args = make_region(tmp_path)
    # SceneOutcome objects (what run_region returns) work as the state's dicts do
    args["outcomes"] = [SceneOutcome(**o) for o in args["outcomes"]]
    path = write_region_report(**args)
    assert path == tmp_path / "night.report.html"
    html = path.read_text(encoding="utf-8")
    assert_offline_html(html)
    data = report_data(html)
    fp = data["map"]["footprints"]["features"]
    assert [f["status"] for f in fp] == ["completed", "skipped", "failed"]  # d.yaml: no footprint known
    assert fp[0]["link"] == "SCENE_A/run-0123456789ab/report.html" and fp[1]["link"] is None
    assert ["reason", "InputError: band B04 <unreadable>"] in fp[2]["pairs"]
    assert ["footprint", "the grid of the scene's last completed run"] in fp[2]["pairs"]
    # footprints in equirectangular degrees: x = lon * cos(mid latitude)
    coslat = data["map"]["coords"]["coslat"]
    xy = np.array(fp[0]["geometry"]["coordinates"][0])
    lon = xy[:, 0] / coslat
    assert 14.9 < lon.min() < lon.max() < 15.1 and 45.0 < xy[:, 1].min() < 45.2
    assert len(data["map"]["polygons"]["geometries"]) == 6  # two scenes' three, no overlap
    body = html.split("<body>", 1)[1].split("<script>", 1)[0]
    for text in ("night", "2 failed", "1 completed", "1 skipped", "ConfigError: /cfg/d.yaml: no such file",
                 "InputError: band B04 &lt;unreadable&gt;", "footprint unknown", 'href="night.gpkg"',
                 'href="SCENE_A/run-0123456789ab/report.html"', "2024-05-02 02:00:00 UTC"):
        assert text in body, text
    assert not list(tmp_path.rglob("*.aux.xml"))


def test_region_report_from_state_file(tmp_path: Path) -> None:
    from pipeline.report import region_state_arguments, render_region_report

    args = make_region(tmp_path)
    state = {"region": "night", "started": args["started"], "finished": args["finished"],
             "scenes": {o["config"]: o for o in args["outcomes"]}, "merged": str(args["merged"])}
    (tmp_path / "night.region_state.json").write_text(json.dumps(state))
    kwargs = region_state_arguments(tmp_path / "night.region_state.json")
    assert kwargs["name"] == "night" and kwargs["out_dir"] == tmp_path and len(kwargs["outcomes"]) == 4
    html = render_region_report(**kwargs).decode()
    assert len(report_data(html)["map"]["footprints"]["features"]) == 3


# -- in a real browser ------------------------------------------------------------------------------
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        exe = shutil.which(name)
        if exe:
            return exe
    pytest.skip("no headless browser: install Debian's chromium (apt-get install chromium) for this test")


class _RecordingProxy:
    """A proxy that records every request the browser sends it and answers 403: the browser is
    told to send all http(s) traffic here, so any request the page makes would be seen."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.requests: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    data = b""
                    while b"\r\n" not in data:  # the request line, however the bytes arrive
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    # a connection opened and closed without a byte (the browser connecting to its
                    # proxy ahead of need) carries no request: nothing was asked of any host
                    if data:
                        self.requests.append(data.split(b"\r\n", 1)[0].decode("latin-1"))
                        conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


#: Chromium's own background services (component updates, sign-in, network time): it contacts
#: them whatever page it shows, even with the flags below; requests to them are not the page's.
BROWSER_SERVICES = {"accounts.google.com", "update.googleapis.com", "clients2.google.com",
                    "clientservices.googleapis.com", "redirector.gvt1.com", "edgedl.me.gvt1.com"}
QUIET_FLAGS = ["--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-default-apps", "--disable-extensions", "--mute-audio", "--no-pings",
               "--disable-domain-reliability", "--disable-client-side-phishing-detection",
               "--safebrowsing-disable-auto-update", "--metrics-recording-only", "--disable-breakpad",
               "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,MediaRouter,Translate,"
               "AutofillServerCommunication,CertificateTransparencyComponentUpdater"]


def _host(request_line: str) -> str:
    """The host a proxied request line goes to: ``CONNECT host:443 ...`` or ``GET http://host/...``."""
    parts = request_line.split()
    target = parts[1] if len(parts) > 1 else ""
    if parts and parts[0] == "CONNECT":
        return target.rsplit(":", 1)[0]
    return urlsplit(target).hostname or target


def run_chromium(page: str, tmp: Path, *, screenshot: Path | None = None,
                 size: str = "1280,900") -> tuple[str, list[str]]:
    """Open ``page`` (a URL) in headless Chromium with all its http(s) traffic sent to a recording
    proxy; the DOM after the page's scripts ran, and the requests other than the browser's own."""
    exe = _chromium()
    proxy = _RecordingProxy()
    try:
        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *QUIET_FLAGS,
                f"--user-data-dir={tmp / 'chromium-profile'}",
                f"--proxy-server=http://127.0.0.1:{proxy.port}", "--proxy-bypass-list=<-loopback>",
                "--virtual-time-budget=5000", f"--window-size={size}"]
        if screenshot is not None:
            out = subprocess.run([*args, f"--screenshot={screenshot}", page], capture_output=True,
                                 text=True, timeout=120)
            assert screenshot.is_file(), out.stderr[-2000:]
        out = subprocess.run([*args, "--dump-dom", page], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout, [r for r in proxy.requests if _host(r) not in BROWSER_SERVICES]
    finally:
        proxy.close()


def test_the_browser_check_sees_a_page_request(tmp_path: Path) -> None:
    """The check below is not blind: a page that loads an image from a web server is caught."""
    page = tmp_path / "fetches.html"
    page.write_text('<html><body><img src="http://example.invalid/x.png"><p>x</p></body></html>')
    dom, requests = run_chromium(page.as_uri(), tmp_path)
    assert "<p>x</p>" in dom
    assert requests == ["GET http://example.invalid/x.png HTTP/1.1"]


def test_scene_report_in_a_browser(run_folder: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    from PIL import Image

    from pipeline.report import write_html_report

    run_dir, report = run_folder
    page = write_html_report(run_dir, report)
    shot = tmp_path / "scene.png"
    dom, requests = run_chromium(page.as_uri(), tmp_path, screenshot=shot)
    assert requests == [], f"the page made requests: {requests}"
    assert 'data-map-ready="1"' in dom, "the map script did not finish"
    # the three polygons as SVG paths, the layers control with its four layers
    assert len(re.findall(r'<path[^>]*class="leaflet-interactive"', dom)) == 3
    assert "leaflet-control-layers" in dom
    shown = re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.DOTALL)  # the elements, not the code
    assert "leaflet-control-attribution" not in shown and "leafletjs.com" not in shown  # no link shown
    labels = re.findall(r"<span> (.*?)</span>", dom)
    for name in ("true colour (quicklook)", "probability", "no valid input", "landslide polygons"):
        assert name in labels, labels
    # shown: the quicklook and the no-valid shading (the probability is off until ticked)
    assert len(re.findall(r'<img[^>]*leaflet-image-layer', dom)) == 2
    assert 'type="range"' in dom  # the probability's opacity slider
    with Image.open(shot) as im:
        assert im.size == (1280, 900)
        pixels = np.asarray(im.convert("RGB"))
    # the map area is not blank: the quicklook's noise and the polygons' colours are there
    map_area = pixels[80:800, 40:850]
    assert map_area.std() > 20
    orange_red = (map_area[..., 0] > 200) & (map_area[..., 1] < 140) & (map_area[..., 2] < 120)
    assert orange_red.sum() > 50, "no polygon colour on the map"


def test_region_report_in_a_browser(tmp_path: Path) -> None:
    from pipeline.report import write_region_report

    page = write_region_report(**make_region(tmp_path / "region"))
    dom, requests = run_chromium(page.as_uri(), tmp_path)
    assert requests == [], f"the page made requests: {requests}"
    assert 'data-map-ready="1"' in dom
    # three footprints and the six merged polygons
    assert len(re.findall(r'<path[^>]*class="leaflet-interactive"', dom)) == 3 + 6
    assert "leaflet-control-layers" in dom


def test_every_status_has_its_badge_style() -> None:
    """Each status a region page can show has a coloured badge (white text on nothing otherwise)."""
    from pipeline.report.region import STATUS_COLOURS

    css = (Path(__file__).resolve().parents[1] / "pipeline" / "report" / "static" / "report.css").read_text()
    for status, colour in STATUS_COLOURS.items():
        assert f".status.{status} {{ background: {colour}; }}" in css, status

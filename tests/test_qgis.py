"""The GeoPackage opens in QGIS itself (headless) as a valid, styled layer."""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path

import dask
import dask.array as da
import geopandas as gpd
import numpy as np
import pyogrio
import pytest
from affine import Affine
from rasterio.crs import CRS
from scipy import ndimage as ndi

from pipeline.core.config import PostprocessSection
from pipeline.core.grid import Grid
from postprocess.attributes import empty_frame
from postprocess.gpkg import write_geopackage
from postprocess.polygons import polygons_from_probability

pytestmark = pytest.mark.qgis

SYSTEM_PYTHON = "/usr/bin/python3"
CHECK = Path(__file__).with_name("qgis_check.py")
GRID = Grid(CRS.from_epsg(32633), Affine(10.0, 0, 500000.0, 0, -10.0, 4000000.0), 120, 100)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["QT_QPA_PLATFORM"] = "offscreen"
    return env


@functools.cache
def _qgis_missing() -> str | None:
    """Why QGIS cannot be used, or None when it can."""
    if not os.path.exists(SYSTEM_PYTHON):
        return f"{SYSTEM_PYTHON} not found (QGIS checks need the system python3-qgis)"
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import qgis.core"], capture_output=True, text=True, env=_env())
    if probe.returncode != 0:
        return f"{SYSTEM_PYTHON} cannot import qgis.core (install Debian python3-qgis): {probe.stderr.strip()[-200:]}"
    return None


def qgis_describe(*paths: Path) -> list[dict]:
    reason = _qgis_missing()
    if reason:
        pytest.skip(reason)
    result = subprocess.run(
        [SYSTEM_PYTHON, str(CHECK), *map(str, paths)], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def polygons() -> gpd.GeoDataFrame:
    rng = np.random.default_rng(11)
    prob = ndi.gaussian_filter(rng.random(GRID.shape), 3)
    prob = ((prob - prob.min()) / (prob.max() - prob.min())).astype(np.float32)
    with dask.config.set(scheduler="synchronous"):
        gdf, _ = polygons_from_probability(
            da.from_array(prob, chunks=64), da.ones(GRID.shape, dtype=bool, chunks=64), GRID,
            PostprocessSection(), threshold=0.6, context={"scene_id": "S2A_TEST", "run_id": "r"},
        )
    assert len(gdf) > 5
    return gdf


def test_geopackage_opens_in_qgis_with_crs_count_and_stored_style(polygons, tmp_path):
    grid_crs = write_geopackage(polygons, tmp_path / "grid.gpkg", metadata={"run_id": "r"})
    wgs84 = write_geopackage(polygons, tmp_path / "wgs84.gpkg", metadata={"run_id": "r"}, crs="EPSG:4326")
    empty = write_geopackage(empty_frame(GRID.crs), tmp_path / "empty.gpkg", metadata={"run_id": "r"})
    # the same features without the stored style: QGIS falls back to a single symbol
    plain = tmp_path / "plain.gpkg"
    pyogrio.write_dataframe(polygons, plain, layer="landslides", driver="GPKG")

    seen = {Path(d["path"]).name: d for d in qgis_describe(grid_crs, wgs84, empty, plain)}
    for name, crs, count in [("grid.gpkg", "EPSG:32633", len(polygons)), ("wgs84.gpkg", "EPSG:4326", len(polygons)),
                             ("empty.gpkg", "EPSG:32633", 0)]:
        layer = seen[name]
        assert layer["isValid"], name
        assert layer["crs"] == crs, name
        assert layer["featureCount"] == count, name
        assert layer["geometryType"] == 2, name  # polygons
        assert layer["renderer"] == "graduatedSymbol", name
        assert layer["classAttribute"] == "mean_prob", name
        assert [r[:2] for r in layer["ranges"]] == [[0.0, 0.7], [0.7, 0.85], [0.85, 1.0]], name
        assert len(layer["storedStyles"]) == 1, name
        assert "mean_prob" in layer["fields"] and "landslide_id" in layer["fields"]
    assert seen["plain.gpkg"]["isValid"]
    assert seen["plain.gpkg"]["renderer"] == "singleSymbol"


def test_run_rasters_open_in_qgis_with_a_colour_ramp_and_transparent_no_data(demo, client, tmp_path):
    """probability.tif (and uncertainty.tif) of a real run load with the .qml beside them: a
    pseudocolor ramp over the codes 0-254 with the threshold marked, 255 as no data; drawn by
    QGIS to PNGs under tmp_path (coloured, not grey)."""
    if reason := _qgis_missing():
        pytest.skip(reason)
    import rasterio
    from conftest import demo_config
    from PIL import Image

    from pipeline.run.scene import run_scene

    cfg = demo_config(demo, tmp_path, model={"tta": True, "uncertainty": True})
    res = run_scene(cfg, client=client)
    run_dir = res.run_dir
    report = json.loads((run_dir / "report.json").read_text())
    threshold = cfg.postprocess.threshold if cfg.postprocess.threshold is not None else report["models"][0]["threshold"]
    # the styles are outputs: checksummed with the rasters
    for name in ("probability.qml", "uncertainty.qml"):
        assert name in report["output_files"] and name in report["outputs"], name
    with rasterio.open(run_dir / "probability.tif") as src:
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert src.descriptions[0].startswith("landslide probability")
        assert float(src.tags(1)["threshold"]) == pytest.approx(threshold)
    with rasterio.open(run_dir / "uncertainty.tif") as src:
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert src.descriptions[0] == "landslide probability standard deviation"

    renders = tmp_path / "renders"
    renders.mkdir()
    result = subprocess.run(
        [SYSTEM_PYTHON, str(CHECK), "--raster", "--render", str(renders),
         str(run_dir / "probability.tif"), str(run_dir / "uncertainty.tif")],
        capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    seen = {Path(d["path"]).name: d for d in map(json.loads, (x for x in result.stdout.splitlines() if x.startswith("{")))}

    prob = seen["probability.tif"]
    assert prob["isValid"] and prob["crs"] == report["grid"]["crs"]
    assert prob["renderer"] == "singlebandpseudocolor" and prob["band"] == 1
    assert (prob["classificationMin"], prob["classificationMax"]) == (0.0, 254.0)
    assert (prob["shaderMin"], prob["shaderMax"]) == (0.0, 254.0)
    assert prob["sourceHasNoData"] and prob["sourceNoData"] == 255.0 and prob["useSourceNoData"]
    values = [item[0] for item in prob["items"]]
    assert values[0] == 0.0 and values[-1] == 254.0
    assert any(v == pytest.approx(threshold * 254, abs=0.011) for v in values)  # the threshold shows
    assert prob["items"][0][2] == 0  # probability 0 transparent
    unc = seen["uncertainty.tif"]
    assert unc["isValid"] and unc["renderer"] == "singlebandpseudocolor"
    assert unc["sourceHasNoData"]  # NaN

    # QGIS drew colour: pixels whose red, green and blue differ (a grey band has none)
    for name in ("probability", "uncertainty"):
        png = renders / f"{name}.png"
        pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
        spread = pixels.max(axis=2) - pixels.min(axis=2)
        assert (spread > 30).mean() > 0.01, name

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

from pipeline.config import PostprocessSection
from pipeline.grid import Grid
from postprocess.attributes import empty_frame
from postprocess.gpkg import write_geopackage
from postprocess.pipeline import polygons_from_probability

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

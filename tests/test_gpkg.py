"""GeoPackage output: readable by GDAL, styled as QGIS stores styles, atomic, clear errors."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sqlite3
import subprocess
import xml.etree.ElementTree as ET

import dask
import dask.array as da
import geopandas as gpd
import numpy as np
import pyogrio
import pytest
from affine import Affine
from rasterio.crs import CRS
from scipy import ndimage as ndi

import postprocess.gpkg as gpkg
from pipeline.core.config import PostprocessSection
from pipeline.core.errors import OutputError
from pipeline.core.grid import Grid
from postprocess.attributes import COLUMNS, empty_frame
from postprocess.gpkg import read_run_metadata, write_geopackage
from postprocess.polygons import polygons_from_probability

GRID = Grid(CRS.from_epsg(32633), Affine(10.0, 0, 500000.0, 0, -10.0, 4000000.0), 120, 100)
METADATA = {
    "scene_id": "S2A_TEST",
    "acq_date": dt.date(2021, 7, 4),
    "model_name": "unet-r34",
    "model_sha256": "ab" * 32,
    "run_id": "run-1",
    "threshold": 0.5,
    "config": {"postprocess": {"min_area_m2": 500.0}},
}
QGIS_STYLE_COLUMNS = [
    "id", "f_table_catalog", "f_table_schema", "f_table_name", "f_geometry_column", "styleName", "styleQML",
    "styleSLD", "useAsDefault", "description", "owner", "ui", "update_time",
]


@pytest.fixture(scope="module")
def polygons() -> gpd.GeoDataFrame:
    rng = np.random.default_rng(7)
    prob = ndi.gaussian_filter(rng.random(GRID.shape), 3)
    prob = ((prob - prob.min()) / (prob.max() - prob.min())).astype(np.float32)
    with dask.config.set(scheduler="synchronous"):
        gdf, _ = polygons_from_probability(
            da.from_array(prob, chunks=50), da.ones(GRID.shape, dtype=bool, chunks=50), GRID,
            PostprocessSection(), threshold=0.6, context=METADATA,
        )
    assert len(gdf) > 5
    return gdf


def ogrinfo(*args: str) -> str:
    exe = shutil.which("ogrinfo")
    if exe is None:
        pytest.skip("ogrinfo (Debian gdal-bin) is not installed")
    return subprocess.run([exe, *args], capture_output=True, text=True, check=True).stdout


def test_geopackage_opens_with_ogrinfo_with_crs_features_and_spatial_index(polygons, tmp_path):
    path = write_geopackage(polygons, tmp_path / "out.gpkg", metadata=METADATA)
    out = ogrinfo("-so", str(path), "landslides")
    assert f"Feature Count: {len(polygons)}" in out
    assert "Geometry: Polygon" in out
    assert 'ID["EPSG",32633]' in out
    for column in COLUMNS:
        assert f"\n{column}: " in out
    index = ogrinfo("-q", "-dialect", "SQLite", "-sql", "SELECT HasSpatialIndex('landslides', 'geom')", str(path))
    assert "HasSpatialIndex (Integer) = 1" in index
    back = gpd.read_file(path, layer="landslides")
    assert list(back["landslide_id"]) == list(polygons["landslide_id"])
    assert back.geometry.is_valid.all()


def test_qgis_style_is_stored_in_layer_styles_as_qgis_does(polygons, tmp_path):
    path = write_geopackage(polygons, tmp_path / "out.gpkg", metadata=METADATA)
    con = sqlite3.connect(path)
    try:
        columns = [row[1] for row in con.execute("PRAGMA table_info(layer_styles)")]
        rows = con.execute(
            "SELECT f_table_name, f_geometry_column, useAsDefault, styleQML, styleSLD, update_time FROM layer_styles"
        ).fetchall()
        contents = dict(con.execute("SELECT table_name, data_type FROM gpkg_contents").fetchall())
        counted = dict(con.execute("SELECT table_name, feature_count FROM gpkg_ogr_contents").fetchall())
    finally:
        con.close()
    assert columns == QGIS_STYLE_COLUMNS
    assert len(rows) == 1
    table, geometry_column, default, qml, sld, updated = rows[0]
    assert (table, geometry_column, default) == ("landslides", "geom", 1)
    assert updated  # filled by the column default, like QGIS
    renderer = ET.fromstring(qml.split("\n", 1)[1]).find("renderer-v2")
    assert renderer is not None and renderer.get("type") == "graduatedSymbol" and renderer.get("attr") == "mean_prob"
    assert len(renderer.findall("ranges/range")) == 3
    assert "PolygonSymbolizer" in sld
    assert contents == {"landslides": "features", "layer_styles": "attributes"}
    assert counted["layer_styles"] == 1


def test_run_metadata_is_stored_with_the_layer(polygons, tmp_path):
    path = write_geopackage(polygons, tmp_path / "out.gpkg", metadata=METADATA)
    assert read_run_metadata(path) == json.loads(json.dumps(METADATA, default=str))
    con = sqlite3.connect(path)
    try:
        (description,) = con.execute("SELECT description FROM gpkg_contents WHERE table_name = 'landslides'").fetchone()
    finally:
        con.close()
    assert "S2A_TEST" in description and "run-1" in description and str(len(polygons)) in description


def test_geographic_output_option(polygons, tmp_path):
    path = write_geopackage(polygons, tmp_path / "wgs84.gpkg", metadata=METADATA, crs="EPSG:4326")
    back = gpd.read_file(path, layer="landslides")
    assert back.crs.to_epsg() == 4326
    assert len(back) == len(polygons)
    assert back.geometry.geom_equals_exact(polygons.to_crs("EPSG:4326").geometry, tolerance=1e-9).all()
    assert back.total_bounds[0] > 14.0 and back.total_bounds[2] < 16.0  # UTM 33N, near its central meridian


def test_empty_result_gives_a_valid_layer_with_its_schema(tmp_path):
    path = write_geopackage(empty_frame(GRID.crs), tmp_path / "empty.gpkg", metadata={"scene_id": "cloudy"})
    info = pyogrio.read_info(path, layer="landslides")
    assert info["features"] == 0
    assert list(info["fields"]) == list(COLUMNS)
    assert info["geometry_type"] == "Polygon"
    assert CRS.from_user_input(info["crs"]) == GRID.crs
    assert "Feature Count: 0" in ogrinfo("-so", str(path), "landslides")


def test_failed_write_leaves_no_file_and_keeps_the_previous_version(polygons, tmp_path, monkeypatch):
    final = tmp_path / "out.gpkg"

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted while styling")

    monkeypatch.setattr(gpkg, "add_qgis_style", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_geopackage(polygons, final, metadata=METADATA)
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary left behind

    monkeypatch.undo()
    write_geopackage(polygons.iloc[:2], final, metadata=METADATA)
    before = final.read_bytes()
    monkeypatch.setattr(gpkg, "add_qgis_style", broken)
    with pytest.raises(RuntimeError):
        write_geopackage(polygons, final, metadata=METADATA)
    assert final.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gpkg"]


def test_rewrite_replaces_the_layer_instead_of_appending(polygons, tmp_path):
    path = tmp_path / "out.gpkg"
    write_geopackage(polygons, path, metadata=METADATA)
    write_geopackage(polygons, path, metadata=METADATA)
    assert pyogrio.read_info(path, layer="landslides")["features"] == len(polygons)


def test_output_directory_that_cannot_be_created_is_named_in_the_error(polygons, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="not_a_dir"):
        write_geopackage(polygons, blocker / "sub" / "out.gpkg", metadata=METADATA)


def test_read_only_output_directory_is_named_in_the_error(polygons, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running with privileges that ignore directory permissions")
        with pytest.raises(OutputError, match="locked.*not writable"):
            write_geopackage(polygons, locked / "out.gpkg", metadata=METADATA)
    finally:
        locked.chmod(0o700)


def test_unknown_crs_option_is_refused(polygons, tmp_path):
    with pytest.raises(OutputError, match="output.crs"):
        write_geopackage(polygons, tmp_path / "x.gpkg", crs="EPSG:3857")  # type: ignore[arg-type]

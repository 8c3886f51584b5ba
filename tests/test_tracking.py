"""Landslides tracked across nights, and "not observed" kept apart from "nothing found" (no cluster:
synthetic per-scene outputs built in code)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
from affine import Affine
from geopandas.testing import assert_geodataframe_equal
from shapely.geometry import box

from pipeline.run.region import SceneOutcome, completed_records, previous_completed, record_run
from pipeline.run.regional_gpkg import LAYERS, write_regional_geopackage
from pipeline.run.tracking import build_layers

CRS = "EPSG:32633"
X0, Y0, SIZE, PIXEL = 500_000.0, 4_702_000.0, 200, 10.0  # a 2 km tile of 10 m pixels, 100 m decimated
# night 1 sees L1 and L3; night 2 sees L1 grown (overlapping), L2 new, L4 touching L1 at a corner only,
# and a cloud over L3 (500 m x 500 m in the tile's north-east corner)
L1 = box(500_200, 4_701_000, 500_400, 4_701_200)
L1_GROWN = box(500_300, 4_701_000, 500_500, 4_701_200)
L2 = box(500_800, 4_700_500, 500_900, 4_700_600)
L3 = box(501_600, 4_701_600, 501_700, 4_701_700)
L4 = box(500_400, 4_701_200, 500_450, 4_701_250)
CLOUD = (slice(0, 50), slice(150, 200))  # rows, columns: 500 m x 500 m


def _scene_run(root: Path, scene_id: str, night: str, detections: list[tuple[str, object, float]],
               cloud: tuple[slice, slice] | None = None) -> dict[str, str]:
    """A completed run folder: the scene's landslides GeoPackage, probability.tif and report.json."""
    run_dir = root / scene_id / "run-0123456789ab"
    run_dir.mkdir(parents=True)
    transform = Affine(PIXEL, 0, X0, 0, -PIXEL, Y0)
    codes = np.full((SIZE, SIZE), 20, dtype=np.uint8)
    if cloud is not None:
        codes[cloud] = 255
    with rasterio.open(run_dir / "probability.tif", "w", driver="GTiff", width=SIZE, height=SIZE, count=1,
                       dtype="uint8", crs=CRS, transform=transform, nodata=255) as dst:
        dst.write(codes, 1)
    ids, geoms, probs = zip(*detections, strict=True) if detections else ((), (), ())
    gdf = gpd.GeoDataFrame({"landslide_id": list(ids), "scene_id": scene_id, "acq_date": night,
                            "mean_prob": list(probs), "area_m2": [g.area for g in geoms]},
                           geometry=list(geoms), crs=CRS)
    gpkg = run_dir / f"{scene_id}_landslides.gpkg"
    pyogrio.write_dataframe(gdf, gpkg, layer="landslides", driver="GPKG")
    report = {"scene_id": scene_id, "acquisition_date": night, "finished": f"{night}T22:00:00+00:00",
              "grid": {"crs": CRS, "transform": list(transform)[:6], "width": SIZE, "height": SIZE},
              "counts": {"valid_pixels": int((codes != 255).sum())}}
    (run_dir / "report.json").write_text(json.dumps(report))
    return {"config": str(root / f"{scene_id}.yaml"), "scene_id": scene_id, "run_dir": str(run_dir),
            "geopackage": str(gpkg)}


@pytest.fixture()
def nights(tmp_path: Path) -> list[dict[str, str]]:
    return [
        _scene_run(tmp_path, "T33_20240501", "2024-05-01", [("n1-L1", L1, 0.8), ("n1-L3", L3, 0.7)]),
        _scene_run(tmp_path, "T33_20240506", "2024-05-06",
                   [("n2-L1", L1_GROWN, 0.9), ("n2-L2", L2, 0.6), ("n2-L4", L4, 0.95)], cloud=CLOUD),
    ]


def _row(frame: gpd.GeoDataFrame, landslide_id: str) -> dict:
    rows = frame[frame["landslide_id"] == landslide_id]
    assert len(rows) == 1, f"{landslide_id}: {len(rows)} features"
    return rows.iloc[0].to_dict()


def test_a_landslide_seen_on_two_nights_keeps_its_first_id_and_its_history(nights) -> None:
    layers = build_layers(nights, {"T33_20240506"})
    ls = layers.landslides
    assert sorted(ls["landslide_id"]) == ["n1-L1", "n1-L3", "n2-L2", "n2-L4"]  # L4 only touches: its own
    l1 = _row(ls, "n1-L1")
    assert (l1["first_seen"], l1["last_seen"], l1["n_detections"], l1["n_nights"]) == ("2024-05-01", "2024-05-06", 2, 2)
    assert l1["scene_ids"] == "T33_20240501,T33_20240506" and l1["dates"] == "2024-05-01,2024-05-06"
    assert l1["landslide_ids"] == "n1-L1,n2-L1"
    assert l1["mean_prob"] == pytest.approx(0.9) and l1["scene_id"] == "T33_20240506"  # the latest detection's
    assert l1["area_m2"] == pytest.approx(300 * 200, rel=0.005)  # the union of what was seen
    assert l1["last_area_m2"] == pytest.approx(200 * 200, rel=0.005)
    l3 = _row(ls, "n1-L3")  # under the cloud on night 2: not seen again, and the layer below says why
    assert (l3["first_seen"], l3["last_seen"], l3["n_detections"]) == ("2024-05-01", "2024-05-01", 1)
    assert list(ls["first_seen"]) == sorted(ls["first_seen"])
    assert ls.crs.to_epsg() == 4326


def test_new_landslides_are_those_first_seen_on_the_newest_night(nights) -> None:
    layers = build_layers(nights, {"T33_20240506"})
    assert layers.newest_night == "2024-05-06"
    assert sorted(layers.new_landslides["landslide_id"]) == ["n2-L2", "n2-L4"]
    assert list(layers.new_landslides.columns) == list(layers.landslides.columns)
    # a job that only found night 1 up to date: its newest night is night 1
    assert sorted(build_layers(nights, {"T33_20240501"}).new_landslides["landslide_id"]) == ["n1-L1", "n1-L3"]


def test_a_cloud_is_not_observed_on_its_night_with_its_geodesic_area(nights) -> None:
    gaps = build_layers(nights, {"T33_20240506"}).not_observed
    assert list(gaps.columns) == ["date", "scene_ids", "area_m2", "geometry"]
    assert list(gaps["date"]) == ["2024-05-01", "2024-05-06"]
    night1, night2 = gaps.iloc[0], gaps.iloc[1]
    assert night1["area_m2"] == 0 and night1.geometry is None  # all of the footprint was seen
    assert night2["area_m2"] == pytest.approx(500 * 500, rel=0.01)  # 25 pixels of 100 m
    assert night2["scene_ids"] == "T33_20240506"
    l3 = gpd.GeoSeries([L3], crs=CRS).to_crs(4326).iloc[0]
    assert night2.geometry.contains(l3)  # L3 was not seen on night 2, not "gone"


def test_the_layers_do_not_depend_on_the_order_of_the_inputs(nights, tmp_path: Path) -> None:
    nights = [*nights, _scene_run(tmp_path, "T33_20240511", "2024-05-11", [("n3-L2", L2, 0.7)])]
    reference = build_layers(nights, {"T33_20240511"})
    assert _row(reference.landslides, "n2-L2")["n_detections"] == 2
    for order in itertools.permutations(nights):
        layers = build_layers(list(order), {"T33_20240511"})
        for name in LAYERS:
            assert_geodataframe_equal(getattr(layers, name), getattr(reference, name))


def test_the_state_keeps_every_completed_run_and_a_rerun_duplicates_nothing(nights, tmp_path: Path) -> None:
    """Night 1's job recorded its scene (in the state format written before completed runs were
    kept); night 2's job adds its own; a rerun of night 2 changes nothing."""
    out = tmp_path / "out"
    out.mkdir()
    state_file = out / "r.region_state.json"
    first = {**nights[0], "status": "completed"}
    state_file.write_text(json.dumps({"region": "r", "started": "2024-05-01T23:00:00", "scenes": {first["config"]: first}}))
    results = []
    for job in range(2):
        completed = previous_completed(state_file)
        outcome = SceneOutcome(config=nights[1]["config"], status="skipped" if job else "completed",
                               scene_id=nights[1]["scene_id"], geopackage=nights[1]["geopackage"])
        record_run(completed, outcome, f"2024-05-0{6 + job}T23:00:00")
        state_file.write_text(json.dumps({"region": "r", "scenes": {}, "completed": completed}))
        records = completed_records(completed)
        assert [r["run_dir"] for r in records] == [nights[0]["run_dir"], nights[1]["run_dir"]]
        layers = build_layers(records, {nights[1]["scene_id"]})
        write_regional_geopackage(layers, out / "r.gpkg", region="r")
        results.append({name: pyogrio.read_dataframe(out / "r.gpkg", layer=name) for name in LAYERS})
    assert set(LAYERS) <= {str(n) for n, _ in pyogrio.list_layers(out / "r.gpkg")}
    for name in LAYERS:
        assert_geodataframe_equal(results[1][name], results[0][name])
    assert len(results[1]["landslides"]) == 4 and len(results[1]["new_landslides"]) == 2
    assert not list(out.glob(".*tmp*"))  # no temporary left


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(nights, tmp_path: Path, monkeypatch) -> None:
    import postprocess.gpkg as gpkg
    from pipeline.core.errors import OutputError
    from pipeline.core.fsutil import WriteCheckFailed

    layers = build_layers(nights, {"T33_20240506"})
    path = tmp_path / "r.gpkg"
    write_regional_geopackage(layers, path, region="r")
    before = path.read_bytes()

    def broken(path, layer, features):  # noqa: ANN001, ANN202
        if layer == "not_observed":
            raise WriteCheckFailed("truncated")

    monkeypatch.setattr(gpkg, "verify_geopackage", broken)
    with pytest.raises(OutputError, match="regional GeoPackage"):
        write_regional_geopackage(layers, path, region="r")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["T33_20240501", "T33_20240506", "r.gpkg"]


def test_a_recorded_run_whose_geopackage_changed_is_left_out(nights, caplog) -> None:
    """The rebuild reads only what the runs wrote: a GeoPackage that is no longer the bytes its
    report.json records (edited, cut short) leaves its run out, with a warning, instead of
    failing the night or merging what someone changed."""
    from pipeline.core.fsutil import file_record

    for rec in nights:  # the reports record their outputs, as a real run's do
        run_dir, gpkg = Path(rec["run_dir"]), Path(rec["geopackage"])
        report = json.loads((run_dir / "report.json").read_text())
        report["output_files"] = {gpkg.name: file_record(gpkg), "probability.tif": file_record(run_dir / "probability.tif")}
        (run_dir / "report.json").write_text(json.dumps(report))
    both = build_layers(nights, [])
    assert set(both.landslides["scene_ids"].str.split(",").explode()) == {"T33_20240501", "T33_20240506"}
    with open(nights[1]["geopackage"], "ab") as fh:
        fh.write(b"\0" * 4096)
    with caplog.at_level("WARNING"):
        first_only = build_layers(nights, [])
    assert set(first_only.landslides["scene_ids"]) == {"T33_20240501"}
    assert "is not what its report.json records" in caplog.text

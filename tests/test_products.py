"""Products the regional job finds by itself: SAFE folders and zips, per-band folders and STAC
ItemCollections on disk, kept or skipped by date window, area of interest and cloud cover; and
a night that runs them (zips unpacked for their run only, left packed when their run is valid)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import json
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import rasterio

from pipeline.core.errors import ConfigError, InputError
from pipeline.core.region_config import load_region_config
from pipeline.demo.product_layers import scene_layers, scene_summary
from pipeline.demo.safe_writer import write_safe
from pipeline.demo.scene import make_scene
from pipeline.run.product_scenes import unpack_safe
from pipeline.run.products import Filters, describe_path, find_products

SIZE = 186


def _product(parent: Path, day: int, *, seed: int = 1, cloud: float = 5.0, shift_deg: float = 0.0,
             product: str = "L1C") -> Path:
    """A demo product sensed on 2018-09-<day> at 01:56 UTC with ``cloud`` % cloud cover stated, its
    footprint moved ``shift_deg`` degrees east in the metadata."""
    scene = make_scene(SIZE, seed)
    summary = scene_summary(scene)
    footprint = [(lon + shift_deg, lat) for lon, lat in summary.footprint_lonlat]
    summary = dataclasses.replace(summary, cloud_cover=cloud, footprint_lonlat=footprint)
    parent.mkdir(parents=True, exist_ok=True)
    return write_safe(parent, scene_layers(scene, product, "05.10"), product=product, baseline="05.10",
                      sensing_time=dt.datetime(2018, 9, day, 1, 56, 51, tzinfo=dt.UTC), summary=summary)


def _zip(safe: Path, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    out = into / (safe.name.removesuffix(".SAFE") + ".zip")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(safe.rglob("*")):
            zf.write(path, path.relative_to(safe.parent).as_posix())
    return out


def _stac(path: Path, items: list[dict]) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    return path


def _item(item_id: str, day: int, assets: dict[str, str], footprint: list[tuple[float, float]],
          cloud: float = 1.0) -> dict:
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": item_id, "collection": "sentinel-2-l1c",
        "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in footprint]]},
        "bbox": [min(p[0] for p in footprint), min(p[1] for p in footprint),
                 max(p[0] for p in footprint), max(p[1] for p in footprint)],
        "properties": {"datetime": f"2018-09-{day:02d}T01:56:51Z", "eo:cloud_cover": cloud,
                       "s2:processing_baseline": "05.10"},
        "links": [], "assets": {k: {"href": v, "type": "image/jp2"} for k, v in assets.items()},
    }


@pytest.fixture(scope="module")
def incoming(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An incoming folder of a night: products inside and outside the window, a cloudy one, one
    elsewhere, one zipped, a band folder, a broken zip, and a STAC ItemCollection."""
    root = tmp_path_factory.mktemp("incoming")
    inc = root / "incoming"
    _product(inc, 10)                                   # used
    zipped = _product(root / "to_zip", 12, seed=2)     # used, from its zip
    _zip(zipped, inc)
    _product(inc, 1)                                    # before the window
    _product(inc, 11, cloud=80.0)                       # too cloudy
    _product(inc, 13, shift_deg=20.0)                   # elsewhere
    (inc / "S2A_MSIL1C_20180914T015651_broken.zip").write_bytes(b"not a zip")
    bands = inc / "S2_20180915_L1C_bands"               # a per-band folder
    bands.mkdir()
    first = sorted((inc).glob("*20180910*.SAFE"))[0]
    for jp2 in sorted(first.rglob("*_B0[234].jp2")):
        shutil.copy(jp2, bands / jp2.name)
    footprint = scene_summary(make_scene(SIZE, 1)).footprint_lonlat
    # every band of the day-10 product, under Earth Search's keys (B8A and B10 under their own names)
    from pipeline.run.stac import EARTH_SEARCH_KEYS

    key_of = {band: key for key, band in EARTH_SEARCH_KEYS.items()} | {"B8A": "B8A", "B10": "B10"}
    b = {key_of[band]: str(next(first.rglob(f"*_{band}.jp2")))
         for band in ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")}
    _stac(root / "items.json", [
        _item("S2B_MSIL1C_20180916T015651_N0510_R060_T54TWN_20180916T045350", 16,
              b, footprint),
        _item("S2B_MSIL1C_20180917T015651_N0510_R060_T54TWN_20180917T045350", 17,
              {"B04": "https://example.invalid/B04.tif"}, footprint),
    ])
    return root


def _aoi() -> object:
    import shapely

    return shapely.Polygon(scene_summary(make_scene(SIZE, 1)).footprint_lonlat).buffer(-0.001)


def test_products_are_found_and_skipped_with_their_reasons(incoming: Path) -> None:
    inc = incoming / "incoming"
    filters = Filters(dt.date(2018, 9, 5), dt.date(2018, 9, 30), 50.0, _aoi())
    kept, skipped = find_products([inc / "S2*", inc / "*.zip"], [incoming / "items.json"], filters)
    assert [(p.kind, p.sensing.day) for p in kept] == [("safe", 10), ("safe_zip", 12), ("bands_dir", 15),
                                                       ("stac", 16)]
    assert kept[0].id.startswith("S2") and kept[0].level == "L1C" and kept[0].cloud_cover == 5.0
    assert len(kept[3].bands) == 13 and kept[3].bands["B8A"].name.endswith("_B8A.jp2")
    assert kept[3].bands["B04"].name.endswith("_B04.jp2") and kept[3].dn_offset == -1000.0
    assert kept[3].level == "L1C"
    reasons = {Path(s.source.split("#")[0]).name + ("#" + s.source.split("#")[1][-6:] if "#" in s.source else ""):
               s.reason for s in skipped}
    by_day = {s.product.sensing.day: s.reason for s in skipped if s.product is not None}
    assert by_day[1] == "sensed on 2018-09-01, before the window's start 2018-09-05"
    assert by_day[11] == "cloud cover 80.0 % above max_cloud_cover 50 %"
    assert by_day[13] == "its footprint does not intersect the area of interest"
    broken = [r for name, r in reasons.items() if "broken" in name]
    assert len(broken) == 1 and broken[0].startswith("unreadable:") and "zip" in broken[0]
    remote = [r for name, r in reasons.items() if name.endswith("045350") and "https" in r]
    assert len(remote) == 1 and "download the products first" in remote[0]
    # the same product found twice (a folder and its zip) is used once
    safe10 = next(inc.glob("*20180910*.SAFE"))
    twice, dup = find_products([safe10, _zip(safe10, incoming / "dup")], [], Filters())
    assert [p.kind for p in twice] == ["safe"] and dup[0].reason == f"the same product as {safe10}"


def test_a_window_of_the_last_days_ends_today_or_at_end(tmp_path: Path) -> None:
    from pipeline.core.region_config import ProductSearch

    search = ProductSearch(paths=[tmp_path], last_days=3)
    assert search.window(dt.date(2026, 12, 8)) == (dt.date(2026, 12, 6), dt.date(2026, 12, 8))
    search = ProductSearch(paths=[tmp_path], last_days=1, end=dt.date(2018, 9, 10))
    assert search.window(dt.date(2026, 12, 8)) == (dt.date(2018, 9, 10), dt.date(2018, 9, 10))


def test_zips_that_would_write_outside_their_folder_or_links_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "slip.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("X.SAFE/MTD_MSIL1C.xml", "<x/>")
        zf.writestr("X.SAFE/../../evil.txt", "x")
    with pytest.raises(InputError, match="outside the product folder"):
        unpack_safe(bad, tmp_path / "out")
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("X.SAFE/GRANULE")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc")
    with pytest.raises(InputError, match="is a link"):
        unpack_safe(link, tmp_path / "out")
    two = tmp_path / "two.zip"
    with zipfile.ZipFile(two, "w") as zf:
        zf.writestr("A.SAFE/x", "1")
        zf.writestr("B.SAFE/x", "1")
    with pytest.raises(InputError, match="one <name>.SAFE folder"):
        unpack_safe(two, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out").exists()


def test_an_unpacked_zip_keeps_its_times_and_replaces_a_leftover(incoming: Path, tmp_path: Path) -> None:
    zipped = next(p for p in (incoming / "incoming").glob("S2*.zip") if "broken" not in p.name)
    first = unpack_safe(zipped, tmp_path)
    stamps = {p.relative_to(first): p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    (first / "left_over_by_a_crash").write_text("x")
    second = unpack_safe(zipped, tmp_path)
    assert second == first and not (second / "left_over_by_a_crash").exists()
    assert {p.relative_to(second): p.stat().st_mtime_ns for p in second.rglob("*") if p.is_file()} == stamps
    assert describe_path(zipped).id == describe_path(second).id
    assert [p.name for p in tmp_path.iterdir()] == [second.name]  # no temporary left


def test_a_template_that_names_a_product_or_a_bad_field_is_refused(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text("scene:\n  safe: x.SAFE\ndem:\n  path: dem.tif\n")
    (tmp_path / "region.yaml").write_text("template: t.yaml\nproducts:\n  paths: [in/*.SAFE]\n")
    with pytest.raises(ConfigError, match=r"t.yaml:2 \(template of .*region.yaml\): scene.safe: a template"):
        load_region_config(tmp_path / "region.yaml")
    (tmp_path / "t.yaml").write_text("dem:\n  path: dem.tif\npostprocess:\n  min_area_m2: -1\n")
    with pytest.raises(ConfigError, match=r"t.yaml:4: postprocess.min_area_m2"):
        load_region_config(tmp_path / "region.yaml")
    (tmp_path / "region.yaml").write_text("products:\n  paths: [in/*.SAFE]\n")
    with pytest.raises(ConfigError, match="products need a template"):
        load_region_config(tmp_path / "region.yaml")
    (tmp_path / "region.yaml").write_text("name: x\n")
    with pytest.raises(ConfigError, match="give scenes .* or products"):
        load_region_config(tmp_path / "region.yaml")


# -- a night that runs what it found -------------------------------------------------------------
@pytest.fixture(scope="module")
def night(incoming: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_region import _bias_model

    from pipeline.demo.dem import write_dem

    root = tmp_path_factory.mktemp("night")
    model = _bias_model(root / "always.safetensors", bias=5.0)
    import numpy as np

    write_dem(make_scene(SIZE, 1), root / "dem.tif", np.random.default_rng([1, 2]))
    (root / "template.yaml").write_text(
        f"dem:\n  path: dem.tif\nmodel:\n  path: {model}\npostprocess:\n  min_area_m2: 0\n  max_hole_m2: 0\n"
        "output:\n  quicklook: false\n")
    inc = incoming / "incoming"
    (root / "region.yaml").write_text(
        "name: night\ntemplate: template.yaml\n"
        f"products:\n  paths: ['{inc}/S2*.SAFE', '{inc}/S2*.zip']\n  stac: ['{incoming}/items.json']\n"
        "  start: 2018-09-05\n  end: 2018-09-30\n  max_cloud_cover: 50\n"
        f"output:\n  dir: {root / 'out'}\n  quicklook: false\n")
    return root / "region.yaml"


@pytest.mark.slow
def test_a_night_runs_the_products_it_found_and_a_rerun_leaves_zips_packed(night: Path, client, monkeypatch) -> None:
    import pyogrio

    from pipeline.run import product_scenes
    from pipeline.run.region import run_region, state_path

    cfg = load_region_config(night)
    unpacked: list[Path] = []
    real = product_scenes.unpack_safe

    def spy(zip_path: Path, parent: Path) -> Path:
        unpacked.append(zip_path)
        return real(zip_path, parent)

    monkeypatch.setattr(product_scenes, "unpack_safe", spy)
    result = run_region(cfg, client=client)
    statuses = sorted((o.status, (o.reason or "")[:18]) for o in result.outcomes)
    # the product elsewhere is used too: this region has no area of interest
    # and the STAC item whose assets are the day-10 product's band files, as a per-band scene
    assert statuses == [("completed", "")] * 4 + [
        ("excluded", "asset B04 is not a"), ("excluded", "cloud cover 80.0 %"), ("excluded", "sensed on 2018-09-"),
        ("excluded", "unreadable: " + str(cfg.source)[:6])], statuses
    stac = next(o for o in result.outcomes if "#" in o.config and o.status == "completed")
    assert stac.scene_id.startswith("S2B_MSIL1C_20180916") and stac.n_polygons >= 1
    assert len(unpacked) == 1 and not any((cfg.output.dir / ".products" / "night").iterdir())
    state = json.loads(state_path(cfg).read_text())
    done = [o for o in state["scenes"].values() if o["status"] == "completed"]
    assert all(o["sensing"].startswith("2018-09-1") and o["footprint"]["type"] == "Polygon" for o in done)
    assert pyogrio.read_info(result.merged, layer="landslides")["features"] >= 1
    page = result.page.read_text()
    assert "cloud cover 80.0 % above max_cloud_cover 50 %" in page and "excluded" in page

    again = run_region(cfg, client=client)
    assert sorted(o.status for o in again.outcomes if o.status != "excluded") == ["skipped"] * 4
    assert len(unpacked) == 1  # the zip's recorded run was still valid: not unpacked again
    assert [o.n_polygons for o in again.outcomes if o.status == "skipped"] == \
        [o.n_polygons for o in result.outcomes if o.status == "completed"]

    # the table of the last job, from its state, without running anything
    from conftest import ROOT

    proc = subprocess.run([sys.executable, "-m", "pipeline", "region", str(night), "--status"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[3] == "scenes: 4 excluded, 4 skipped" and lines[4].split()[:3] == ["status", "sensed", "(UTC)"]
    rows = {line.split()[0] + " " + line.split()[1]: line for line in lines[5:]}
    assert rows["excluded 2018-09-11"].endswith("cloud cover 80.0 % above max_cloud_cover 50 %")
    zipped = next(again.outcomes[i] for i in range(len(again.outcomes)) if again.outcomes[i].config.endswith(".zip")
                  and again.outcomes[i].status == "skipped")
    assert zipped.scene_id in rows["skipped 2018-09-12"] and rows["skipped 2018-09-12"].endswith(".zip")


def test_the_plan_lists_what_tonight_would_run_and_not_use(incoming: Path, tmp_path: Path) -> None:
    from conftest import ROOT

    inc = incoming / "incoming"
    (tmp_path / "template.yaml").write_text("dem:\n  path: dem.tif\n")
    (tmp_path / "region.yaml").write_text(
        f"name: plan\ntemplate: template.yaml\nproducts:\n  paths: ['{inc}/S2*.SAFE']\n"
        "  start: 2018-09-05\n  end: 2018-09-30\n  max_cloud_cover: 50\n"
        f"output:\n  dir: {tmp_path / 'out'}\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "region", str(tmp_path / "region.yaml"), "--plan"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "region plan: products sensed 2018-09-05 to 2018-09-30 (UTC days)"
    assert lines[1] == "would run 2 scene(s) and product(s), would not use 2"
    assert [line.split()[0] for line in lines[2:4]] == ["run:", "run:"] and "2018-09-10 01:56" in lines[2]
    assert any("cloud cover 80.0 % above max_cloud_cover 50 %" in line for line in lines[4:])
    assert not (tmp_path / "out").exists()  # nothing run, nothing written


def test_a_band_folders_footprint_is_read_only_from_allowed_files(incoming: Path, tmp_path: Path) -> None:
    """Finding products opens band files as the run does (the input allow-list): a GDAL VRT
    disguised as a band file is not opened to describe the folder."""
    real = next((incoming / "incoming" / "S2_20180915_L1C_bands").glob("*_B02.jp2"))
    assert describe_path(real.parent).footprint is not None
    folder = tmp_path / "S2_20180915_L1C_vrt"
    folder.mkdir()
    with rasterio.open(real) as src:  # a VRT GDAL would open with its georeferencing
        width, height, wkt, gt = src.width, src.height, src.crs.to_wkt(), src.transform.to_gdal()
    (folder / "T54TWN_20180915T015651_B02.tif").write_text(
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>{html.escape(wkt)}</SRS>'
        f'<GeoTransform>{", ".join(map(repr, gt))}</GeoTransform><VRTRasterBand dataType="UInt16" band="1">'
        f'<SimpleSource><SourceFilename relativeToVRT="0">{real}</SourceFilename><SourceBand>1</SourceBand>'
        "</SimpleSource></VRTRasterBand></VRTDataset>")
    assert describe_path(folder).footprint is None

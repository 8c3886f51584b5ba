"""The built-in demo input: a synthetic Sentinel-2 product in the ESA layout, a DEM, the true scars.

Also covers the SAFE builder the other tests use (tests/safe_builder.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer
from rasterio.features import rasterize
from rasterio.warp import Resampling, reproject
from safe_builder import build_safe, decode_dn
from scipy import ndimage

from pipeline.cli.demo import add_demo_arguments, cli_demo
from pipeline.core.channels import L4S_CHANNELS, S2_BANDS
from pipeline.core.config import load_scene_config
from pipeline.core.errors import ConfigError, OutputError
from pipeline.demo.scene import DemoScene, make_scene
from pipeline.demo.sentinel2 import BAND_IDS
from pipeline.demo.spectra import (
    ATMOSPHERE,
    MIN_CLASS_PIXELS,
    PATCH_CLASSES,
    SPECTRA,
    class_spectrum,
    patch_classes,
    patch_spectra,
)
from pipeline.demo.write import DemoPaths, write_demo_data

SIZE = 480  # 4.8 km: room for the scars, fast to write
SEED = 3
NS_L2A = {"n1": "https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-2A.xsd"}
NS_L1C = {"n1": "https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-1C.xsd"}
L2A_BANDS = [b for b in S2_BANDS if b != "B10"]
PRODUCT_RE = re.compile(
    r"^S2[AB]_MSIL(2A|1C)_(\d{8}T\d{6})_N(\d{4})_R(\d{3})_T(\d{2}[A-Z]{3})_(\d{8}T\d{6})\.SAFE$"
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoPaths:
    return write_demo_data(tmp_path_factory.mktemp("demo") / "demo", size=SIZE, seed=SEED)


@pytest.fixture(scope="module")
def scene() -> DemoScene:
    return make_scene(SIZE, SEED)


def granule_of(safe: Path) -> Path:
    granules = sorted((safe / "GRANULE").iterdir())
    assert len(granules) == 1
    return granules[0]


def band_file(safe: Path, band: str, res: int | None = None) -> Path:
    """The native-resolution file of ``band`` (L2A: R<res>m/..._<band>_<res>m.jp2)."""
    img = granule_of(safe) / "IMG_DATA"
    res = res or S2_BANDS.get(band, 20)
    hits = sorted(img.glob(f"R{res}m/T*_{band}_{res}m.jp2")) or sorted(img.glob(f"T*_{band}.jp2"))
    assert len(hits) == 1, f"{band}: {hits}"
    return hits[0]


def read(path: Path) -> tuple[np.ndarray, Affine, rasterio.crs.CRS]:
    with rasterio.open(path) as ds:
        return ds.read(1), ds.transform, ds.crs


def offsets_from_xml(mtd: Path) -> tuple[float, dict[int, float]]:
    """(quantification, {band_id: offset}) read the way a SAFE reader must."""
    level = "L2A" if mtd.name == "MTD_MSIL2A.xml" else "L1C"
    ns = NS_L2A if level == "L2A" else NS_L1C
    chars = ET.parse(mtd).getroot().find("n1:General_Info/Product_Image_Characteristics", ns)
    assert chars is not None
    if level == "L2A":
        q = chars.find("QUANTIFICATION_VALUES_LIST/BOA_QUANTIFICATION_VALUE")
        offs = chars.findall("BOA_ADD_OFFSET_VALUES_LIST/BOA_ADD_OFFSET")
    else:
        q = chars.find("QUANTIFICATION_VALUE")
        offs = chars.findall("Radiometric_Offset_List/RADIO_ADD_OFFSET")
    assert q is not None and q.text is not None
    return float(q.text), {int(o.attrib["band_id"]): float(o.text or "nan") for o in offs}


# -- layout -----------------------------------------------------------------


def test_l2a_product_follows_esa_layout_and_naming(demo: DemoPaths) -> None:
    m = PRODUCT_RE.match(demo.safe.name)
    assert m and m.group(1) == "2A" and m.group(3) == "0510" and m.group(5) == "54TWN"
    sensing = m.group(2)
    assert (demo.safe / "MTD_MSIL2A.xml").is_file() and (demo.safe / "manifest.safe").is_file()
    granule = granule_of(demo.safe)
    assert re.fullmatch(r"L2A_T54TWN_A\d{6}_\d{8}T\d{6}", granule.name)
    assert (granule / "MTD_TL.xml").is_file()
    for band in L2A_BANDS:
        res = S2_BANDS[band]
        assert band_file(demo.safe, band).name == f"T54TWN_{sensing}_{band}_{res}m.jp2"
        assert band_file(demo.safe, band).parent.name == f"R{res}m"
    for res in (20, 60):
        assert (granule / "IMG_DATA" / f"R{res}m" / f"T54TWN_{sensing}_SCL_{res}m.jp2").is_file()
    # No B10 in L2A, no B08 or SCL among the coarser copies where real products have none.
    assert not list(demo.safe.rglob("*_B10*"))
    assert not list(granule.glob("IMG_DATA/R10m/*SCL*"))
    assert not list(granule.glob("IMG_DATA/R20m/*_B08_*"))
    # The IMAGE_FILE list names exactly the files present (without extension, as ESA writes it).
    root = ET.parse(demo.safe / "MTD_MSIL2A.xml").getroot()
    listed = {e.text for e in root.iterfind("n1:General_Info/Product_Info/Product_Organisation/"
                                            "Granule_List/Granule/IMAGE_FILE", NS_L2A)}
    present = {str(p.relative_to(demo.safe).with_suffix("")) for p in demo.safe.rglob("*.jp2")}
    assert listed == present and len(present) == 36


def test_band_grids_nest_like_real_tiles(demo: DemoPaths) -> None:
    extents = set()
    for path in demo.safe.rglob("IMG_DATA/R*m/*.jp2"):
        res = int(path.parent.name[1:-1])
        with rasterio.open(path) as ds:
            assert ds.crs.to_epsg() == 32654
            assert ds.res == (res, res)
            assert ds.width == ds.height == SIZE * 10 // res
            assert ds.transform.c % 60 == 0 and ds.transform.f % 60 == 0  # Sentinel-2 tile grid
            assert ds.nodata is None  # JP2 carries no nodata tag
            assert ds.dtypes[0] == ("uint8" if path.stem.split("_")[-2] in ("SCL", "TCI") else "uint16")
            extents.add(tuple(ds.bounds))
    assert len(extents) == 1  # 10, 20 and 60 m rasters cover the same extent
    tl = ET.parse(granule_of(demo.safe) / "MTD_TL.xml").getroot()
    geo = {int(g.attrib["resolution"]): (float(g.findtext("ULX", "nan")), float(g.findtext("ULY", "nan")))
           for g in tl.iter("Geoposition")}
    left, _, _, top = extents.pop()
    assert geo == {10: (left, top), 20: (left, top), 60: (left, top)}
    assert tl.findtext(".//HORIZONTAL_CS_CODE") == "EPSG:32654"


def test_l1c_product_has_all_13_bands_flat_and_no_scl(tmp_path: Path) -> None:
    paths = write_demo_data(tmp_path / "l1c", size=120, seed=1, product="L1C", baseline="04.00")
    assert PRODUCT_RE.match(paths.safe.name) and "_MSIL1C_" in paths.safe.name and "_N0400_" in paths.safe.name
    img = granule_of(paths.safe) / "IMG_DATA"
    assert granule_of(paths.safe).name.startswith("L1C_T54TWN_A")
    names = sorted(p.name for p in img.iterdir())
    assert not [p for p in img.iterdir() if p.is_dir()]
    bands = sorted(re.fullmatch(r"T54TWN_\d{8}T\d{6}_(\w{3})\.jp2", n).group(1) for n in names)  # type: ignore[union-attr]
    assert bands == sorted([*S2_BANDS, "TCI"])
    for band, res in S2_BANDS.items():
        _, transform, _ = read(band_file(paths.safe, band))
        assert transform.a == res
    q, offsets = offsets_from_xml(paths.safe / "MTD_MSIL1C.xml")
    assert q == 10000 and offsets == dict.fromkeys(range(13), -1000.0)


# -- metadata ----------------------------------------------------------------


@pytest.mark.parametrize(("product", "baseline"), [("L2A", "05.10"), ("L2A", "03.01"), ("L1C", "04.00"), ("L1C", "02.09")])
def test_offsets_written_from_baseline_0400_only(tmp_path: Path, product: str, baseline: str) -> None:
    dn = np.full((6, 6), 1500, np.uint16)
    safe = build_safe(tmp_path, {"B04": (dn, Affine(10, 0, 600000, 0, -10, 5000040), "EPSG:32633")},
                      product=product, baseline=baseline)
    mtd = safe / f"MTD_MSI{product}.xml"
    ns = NS_L2A if product == "L2A" else NS_L1C
    info = ET.parse(mtd).getroot().find("n1:General_Info/Product_Info", ns)
    assert info is not None and info.findtext("PROCESSING_BASELINE") == baseline
    assert info.findtext("PRODUCT_START_TIME") == "2023-06-15T01:56:19.024Z"
    q, offsets = offsets_from_xml(mtd)
    assert q == 10000
    if baseline >= "04.00":
        assert offsets == dict.fromkeys(range(13), -1000.0)  # band_id 0..12, B10 included as ESA writes it
    else:
        assert offsets == {}
    assert f"_N{baseline.replace('.', '')}_" in safe.name


def test_demo_metadata_describes_the_scene(demo: DemoPaths) -> None:
    root = ET.parse(demo.safe / "MTD_MSIL2A.xml").getroot()
    assert root.tag == f"{{{NS_L2A['n1']}}}Level-2A_User_Product"
    assert root.findtext("n1:General_Info/Product_Info/PRODUCT_URI", namespaces=NS_L2A) == demo.safe.name
    assert root.findtext("n1:General_Info/Product_Info/PRODUCT_TYPE", namespaces=NS_L2A) == "S2MSI2A"
    cloud = float(root.findtext("n1:Quality_Indicators_Info/Cloud_Coverage_Assessment", namespaces=NS_L2A) or "nan")
    scl, _, _ = read(band_file(demo.safe, "SCL", 20))
    valid = scl > 0
    assert cloud == pytest.approx(100 * np.isin(scl[valid], (8, 9)).mean(), abs=1.0)
    footprint = root.findtext("n1:Geometric_Info/Product_Footprint/Product_Footprint/Global_Footprint/EXT_POS_LIST",
                              namespaces=NS_L2A)
    latlon = np.array(footprint.split(), float).reshape(-1, 2)  # type: ignore[union-attr]
    assert np.all((latlon[:, 0] > 42) & (latlon[:, 0] < 43.5) & (latlon[:, 1] > 141) & (latlon[:, 1] < 143))


# -- radiometry ----------------------------------------------------------------


@pytest.mark.parametrize("band", ["B04", "B08", "B11", "B09"])
def test_dn_decode_to_the_intended_reflectance(demo: DemoPaths, scene: DemoScene, band: str) -> None:
    dn, _, _ = read(band_file(demo.safe, band))
    q, offsets = offsets_from_xml(demo.safe / "MTD_MSIL2A.xml")
    refl = (dn.astype(np.float64) + offsets[BAND_IDS[band]]) / q
    intended = scene.reflectance(band)
    nodata = dn == 0
    assert np.array_equal(nodata, np.isnan(intended))
    assert 0.05 < nodata.mean() < 0.25  # the no-data corner
    assert np.abs(refl[~nodata] - intended[~nodata]).max() <= 0.5 / q + 1e-9
    # With the offset, small negative reflectances (noise over water) stay representable.
    assert dn[~nodata].min() >= 1


@pytest.mark.parametrize("baseline", ["05.10", "03.01"])
def test_builder_encoding_round_trips_through_the_metadata_offset(tmp_path: Path, baseline: str) -> None:
    rng = np.random.default_rng(0)
    refl = rng.uniform(0.0, 0.6, (12, 12))
    refl[0, :3] = np.nan
    transform = Affine(20, 0, 499980, 0, -20, 4800000)
    safe = build_safe(tmp_path, {"B05": (refl, transform, "EPSG:32654")}, baseline=baseline)
    dn, t, _ = read(band_file(safe, "B05", 20))
    assert t == transform
    q, offsets = offsets_from_xml(safe / "MTD_MSIL2A.xml")
    back = (dn + offsets.get(4, 0.0)) / q
    assert np.all(dn[0, :3] == 0)
    assert np.abs(back[dn > 0] - refl[dn > 0]).max() <= 0.5 / q + 1e-12
    assert np.allclose(decode_dn(dn, baseline), refl, atol=0.5 / q, equal_nan=True)
    expected_shift = 1000 if baseline >= "04.00" else 0
    assert np.array_equal(dn[dn > 0], np.rint(refl[dn > 0] * 10000).astype(int) + expected_shift)


def test_scars_are_bare_soil_among_vegetation(demo: DemoPaths) -> None:
    def refl(band: str) -> np.ndarray:
        dn, _, _ = read(band_file(demo.safe, band))
        r = (dn.astype(np.float64) - 1000) / 10000
        factor = S2_BANDS[band] // 10
        return np.repeat(np.repeat(r, factor, 0), factor, 1)

    red, nir, nir20, swir = refl("B04"), refl("B08"), refl("B8A"), refl("B11")
    with np.errstate(divide="ignore", invalid="ignore"):  # forest and water red are 0 (see SPECTRA)
        ndvi = (nir - red) / (nir + red)
    truth = read(demo.truth_mask)[0].astype(bool)
    labels, n = ndimage.label(truth)
    assert 6 <= n <= 12
    scl20, _, _ = read(band_file(demo.safe, "SCL", 20))
    scl = np.repeat(np.repeat(scl20, 2, 0), 2, 1)
    ring = ndimage.binary_dilation(truth, iterations=6) & ~ndimage.binary_dilation(truth, iterations=2) & (scl == 4)
    scar, forest = class_spectrum("scar"), class_spectrum("forest")
    for i in range(1, n + 1):
        assert np.median(ndvi[labels == i]) < min(0.6, np.median(ndvi[ring]) - 0.3)
        # Bright in the visible next to the forest: the data-derived scar red, give or take shading.
        assert 0.5 * scar["B04"] < np.median(red[labels == i]) < 1.5 * scar["B04"]
        assert np.median(red[labels == i]) > np.median(red[ring]) + 0.03
    assert np.median(ndvi[ring]) > 0.7
    assert 0.6 * forest["B08"] < np.median(nir[ring]) < 1.4 * forest["B08"]
    # Bare soil: SWIR above NIR; vegetation: SWIR well below NIR.
    assert np.median(swir[truth] / nir20[truth]) > 0.9
    assert np.median(swir[ring] / nir20[ring]) < 0.6
    assert np.isin(scl[truth], (4, 5)).all() and np.mean(scl[truth] == 5) > 0.8


def test_scl_has_clouds_shadows_water_and_matches_the_no_data_corner(demo: DemoPaths) -> None:
    scl, _, _ = read(band_file(demo.safe, "SCL", 20))
    b05, _, _ = read(band_file(demo.safe, "B05"))
    assert np.array_equal(scl == 0, b05 == 0)
    classes = set(np.unique(scl).tolist())
    assert {0, 3, 4, 5, 6} <= classes and classes & {8, 9}
    b02, _, _ = read(band_file(demo.safe, "B02", 20))  # resampled copy, same grid as SCL
    cloud_refl = (b02[np.isin(scl, (8, 9))].astype(float) - 1000) / 10000
    veg_refl = (b02[scl == 4].astype(float) - 1000) / 10000
    assert np.median(cloud_refl) > 0.3 > 0.06 > np.median(veg_refl)
    # The no-data corner is on the east side, as where a swath edge crosses a tile.
    cols = np.nonzero(scl == 0)[1]
    assert cols.min() > 0.6 * scl.shape[1]


# -- DEM and terrain -------------------------------------------------------------


def test_dem_is_geographic_int16_with_voids_and_the_same_terrain(demo: DemoPaths, scene: DemoScene) -> None:
    with rasterio.open(demo.dem) as ds:
        assert ds.crs.to_epsg() == 4326
        assert ds.dtypes[0] == "int16" and ds.nodata == -32768
        assert ds.res[0] == pytest.approx(1 / 3600) and ds.res[1] == pytest.approx(1 / 3600)
        dem = ds.read(1)
        transform = ds.transform
        dem_bounds = ds.bounds
    voids = dem == -32768
    assert 1 <= voids.sum() <= 200
    valid = dem[~voids]
    assert valid.min() > 150 and valid.max() < 1250 and valid.max() - valid.min() > 400
    # Covers the scene with a margin.
    to_ll = Transformer.from_crs("EPSG:32654", "EPSG:4326", always_xy=True)
    w, s, e, n = to_ll.transform_bounds(*scene.bounds)
    assert dem_bounds.left < w - 0.005 and dem_bounds.right > e + 0.005
    assert dem_bounds.bottom < s - 0.005 and dem_bounds.top > n + 0.005
    # Georeferencing: the value at each pixel centre is the terrain at that lon/lat.
    rng = np.random.default_rng(0)
    rows, cols = np.nonzero(~voids)
    pick = rng.choice(rows.size, 400, replace=False)
    lon, lat = rasterio.transform.xy(transform, rows[pick], cols[pick], offset="center")
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:32654", always_xy=True).transform(lon, lat)
    expected = scene.terrain.elevation(np.asarray(x), np.asarray(y))
    assert np.abs(dem[rows[pick], cols[pick]] - expected).max() <= 0.5 + 1e-6
    # ... and a half-pixel georeferencing error would show.
    lon2, lat2 = rasterio.transform.xy(transform, rows[pick], cols[pick], offset="ul")
    x2, y2 = Transformer.from_crs("EPSG:4326", "EPSG:32654", always_xy=True).transform(lon2, lat2)
    assert np.abs(dem[rows[pick], cols[pick]] - scene.terrain.elevation(np.asarray(x2), np.asarray(y2))).mean() > 2


def test_scars_sit_on_steep_slopes_of_the_dem(demo: DemoPaths) -> None:
    truth, transform, crs = read(demo.truth_mask)
    with rasterio.open(demo.dem) as ds:
        dem = np.where(ds.read(1) == ds.nodata, np.nan, ds.read(1)).astype(np.float32)
        utm = np.full(truth.shape, np.nan, np.float32)
        reproject(dem, utm, src_transform=ds.transform, src_crs=ds.crs, dst_transform=transform, dst_crs=crs,
                  src_nodata=np.nan, dst_nodata=np.nan, resampling=Resampling.bilinear)
    d_row, d_col = np.gradient(utm.astype(np.float64), 10.0)
    slope = np.degrees(np.arctan(np.hypot(d_row, d_col)))
    scene_mean = np.nanmean(slope)
    assert np.nanmax(slope) > 40
    scars = gpd.read_file(demo.truth_scars)
    assert scars.crs.to_epsg() == 32654 and 6 <= len(scars) <= 12
    for geom in scars.geometry:
        inside = rasterize([geom], out_shape=truth.shape, transform=transform).astype(bool)
        assert np.nanmean(slope[inside]) > 25
    assert np.nanmean(slope[truth.astype(bool)]) > scene_mean + 5
    # Elongated downslope tongues, not blobs.
    for geom in scars.geometry:
        rect = geom.minimum_rotated_rectangle
        edges = sorted({round(a, 3) for a in (
            np.hypot(*np.diff(np.asarray(rect.exterior.coords)[:3], axis=0).T))})
        assert max(edges) / min(edges) > 1.5


def test_truth_polygons_match_the_truth_mask(demo: DemoPaths) -> None:
    truth, transform, _ = read(demo.truth_mask)
    scars = gpd.read_file(demo.truth_scars)
    burned = rasterize(list(scars.geometry), out_shape=truth.shape, transform=transform)
    assert np.array_equal(burned, truth)
    assert scars["area_m2"].sum() == truth.sum() * 100
    assert scars["scar_id"].is_unique


# -- config, determinism, overwriting, CLI ------------------------------------------


def test_scene_yaml_loads_with_relative_paths(demo: DemoPaths) -> None:
    cfg = load_scene_config(demo.scene_yaml)
    assert cfg.scene.safe == demo.safe and cfg.dem.path == demo.dem
    assert cfg.output.dir == demo.scene_yaml.parent / "output"
    text = demo.scene_yaml.read_text()
    assert str(demo.scene_yaml.parent) not in text  # relative: the folder can be moved


def test_same_seed_same_data_other_seed_other_scene(tmp_path: Path) -> None:
    a = write_demo_data(tmp_path / "a", size=120, seed=7)
    b = write_demo_data(tmp_path / "b", size=120, seed=7)
    c = write_demo_data(tmp_path / "c", size=120, seed=8)
    files_a = sorted(p.relative_to(a.safe.parent) for p in a.safe.parent.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.safe.parent) for p in b.safe.parent.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        if rel.suffix in (".jp2", ".tif"):
            with rasterio.open(a.safe.parent / rel) as da, rasterio.open(b.safe.parent / rel) as db:
                assert np.array_equal(da.read(), db.read()) and da.transform == db.transform, rel
        elif rel.suffix != ".gpkg":
            assert (a.safe.parent / rel).read_bytes() == (b.safe.parent / rel).read_bytes(), rel
    assert gpd.read_file(a.truth_scars).geometry.equals(gpd.read_file(b.truth_scars).geometry)
    assert not np.array_equal(read(a.dem)[0], read(c.dem)[0])
    assert not np.array_equal(read(band_file(a.safe, "B04"))[0], read(band_file(c.safe, "B04"))[0])


def test_refuses_to_overwrite_a_non_empty_directory_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        write_demo_data(out, size=120)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers
    paths = write_demo_data(out, size=120, force=True)
    assert not (out / "keep.txt").exists() and paths.safe.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_demo_data(empty, size=120).scene_yaml.is_file()


def test_size_must_let_the_10_20_60_m_grids_nest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="multiple of 6"):
        write_demo_data(tmp_path / "x", size=1024)
    assert not (tmp_path / "x").exists()


def test_cli_writes_and_reports_then_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    out = tmp_path / "cli"
    args = parser.parse_args([str(out), "--size", "120", "--seed", "2", "--product", "L1C", "--baseline", "03.01"])
    assert cli_demo(args) == 0
    printed = capsys.readouterr().out
    safe = next(out.glob("*.SAFE"))
    assert safe.name in printed and "scene.yaml" in printed and "_MSIL1C_" in safe.name and "_N0301_" in safe.name
    assert cli_demo(args) == 1
    assert "not empty" in capsys.readouterr().err
    args.force = True
    assert cli_demo(args) == 0


# -- the SAFE builder for other tests ---------------------------------------------


def test_builder_puts_arrays_where_their_resolution_says(tmp_path: Path) -> None:
    t10 = Affine(10, 0, 600000, 0, -10, 5000040)
    t20 = Affine(20, 0, 600000, 0, -20, 5000040)
    dn = np.arange(36, dtype=np.uint16).reshape(6, 6) + 1
    safe = build_safe(
        tmp_path, {"B02": (dn, t10, "EPSG:32633"), "B05": (dn, t10, "EPSG:32633"), "B8A": (dn[:3, :3], t20, "EPSG:32633")},
        scl=(np.full((3, 3), 4), t20, "EPSG:32633"), date=dt.date(2018, 9, 11), baseline="03.01",
    )
    assert "_20180911T015619_N0301_" in safe.name
    img = granule_of(safe) / "IMG_DATA"
    assert sorted(p.relative_to(img).as_posix() for p in img.rglob("*.jp2")) == [
        "R10m/T54TWN_20180911T015619_B02_10m.jp2",
        "R10m/T54TWN_20180911T015619_B05_10m.jp2",
        "R20m/T54TWN_20180911T015619_B8A_20m.jp2",
        "R20m/T54TWN_20180911T015619_SCL_20m.jp2",
    ]
    back, transform, crs = read(img / "R10m/T54TWN_20180911T015619_B05_10m.jp2")
    assert np.array_equal(back, dn) and transform == t10 and crs.to_epsg() == 32633
    assert read(img / "R20m/T54TWN_20180911T015619_SCL_20m.jp2")[0].dtype == np.uint8


def test_builder_refuses_what_a_real_product_cannot_hold(tmp_path: Path) -> None:
    t = Affine(60, 0, 600000, 0, -60, 5000040)
    dn = np.ones((4, 4), np.uint16)
    with pytest.raises(ValueError, match="B10"):
        build_safe(tmp_path, {"B10": (dn, t, "EPSG:32633")}, product="L2A")
    with pytest.raises(ValueError, match="SCL"):
        build_safe(tmp_path, {"B01": (dn, t, "EPSG:32633")}, product="L1C", scl=(dn, t, "EPSG:32633"))
    with pytest.raises(ValueError, match="CRS"):
        build_safe(tmp_path, {"B01": (dn, t, "EPSG:32633"), "B09": (dn, t, "EPSG:32634")})
    l1c = build_safe(tmp_path, {"B10": (dn, t, "EPSG:32633")}, product="L1C")
    assert [p.name for p in (granule_of(l1c) / "IMG_DATA").iterdir()] == ["T54TWN_20230615T015619_B10.jp2"]


# -- data-derived spectra and look-alikes ---------------------------------------------

#: Look-alike kind -> the SPECTRA class it is painted with.
LOOKALIKES = {"rock": "rock", "gravel": "bare", "road": "bare", "clearcut": "bare"}


def test_spectra_are_the_medians_of_the_labelled_patches(shared_data: Path) -> None:
    stats = patch_spectra(shared_data / "l4s" / "train")
    assert set(stats.surface) == {"forest", "meadow", "bare", "rock", "scar", "water"}
    assert all(stats.counts[c] >= MIN_CLASS_PIXELS for c in stats.surface)
    assert stats.counts["snow"] < MIN_CLASS_PIXELS  # no snow in the patches, so none in the scene
    for name, toa in stats.toa.items():
        assert toa["B8A"] == toa["B08"]  # the patches have no B8A
        for band in S2_BANDS:
            path, trans = ATMOSPHERE[band]
            assert stats.surface[name][band] == pytest.approx(max(0.0, (toa[band] - path) / trans))
            # The constants shipped in pipeline/demo/spectra.py are these values, rounded to 4 decimals.
            assert class_spectrum(name)[band] == pytest.approx(round(stats.surface[name][band], 4), abs=1e-12)
    assert class_spectrum("cloud")["B02"] == 0.56  # hand-set: the patches hold no clouds
    assert set(SPECTRA) == set(S2_BANDS)


def test_patch_class_rules_on_chosen_pixels() -> None:
    # Columns: scar, snow, water, rock, bare, forest, meadow, shadow (no class).
    image = np.full((len(L4S_CHANNELS), 1, 8), 0.1, np.float32)
    band = {c: image[i, 0] for i, c in enumerate(L4S_CHANNELS)}
    band["B03"][:] = [0.05, 0.50, 0.05, 0.10, 0.10, 0.05, 0.06, 0.03]
    band["B04"][:] = [0.03, 0.48, 0.02, 0.10, 0.10, 0.03, 0.05, 0.02]
    band["B08"][:] = [0.25, 0.45, 0.02, 0.14, 0.14, 0.25, 0.20, 0.03]
    band["B11"][:] = [0.10, 0.10, 0.01, 0.15, 0.15, 0.10, 0.12, 0.02]
    band["SLOPE"][:] = [40, 20, 2, 40, 5, 30, 30, 40]
    band["DEM"][:] = 1000
    mask = np.array([[1, 0, 0, 0, 0, 0, 0, 0]], np.uint8)
    classes = patch_classes(image, mask, L4S_CHANNELS)
    assert list(classes) == list(PATCH_CLASSES)
    for col, name in enumerate(("scar", "snow", "water", "rock", "bare", "forest", "meadow")):
        assert np.flatnonzero(classes[name][0]).tolist() == [col], name
    assert not any(c[0, 7] for c in classes.values())  # shadow: no class


def test_lookalikes_are_painted_outside_the_truth(demo: DemoPaths, scene: DemoScene) -> None:
    truth = read(demo.truth_mask)[0].astype(bool)
    assert np.array_equal(truth, scene.truth_mask().astype(bool))
    scars = gpd.read_file(demo.truth_scars)
    burned = rasterize(list(scars.geometry), out_shape=truth.shape, transform=scene.transform).astype(bool)
    near_truth = ndimage.binary_dilation(truth | burned, iterations=2)
    for kind in LOOKALIKES:
        frac = scene.lookalikes[kind]
        assert (frac >= 0.5).sum() > 0, kind
        assert not (frac > 0)[near_truth].any(), kind
        assert not (frac > 0)[scene.scar_fraction > 0].any(), kind
    total = scene.lookalike_fraction()
    cover = sum(scene.fractions.values()) + total
    assert np.allclose(cover, 1.0, atol=1e-5)  # look-alikes replace the land cover, not add to it
    # Not vegetation in the scene classification.
    assert np.mean(scene.classes_scl()[total >= 0.9] == 5) > 0.8
    # Same seed, same look-alikes.
    again = make_scene(120, 7).lookalikes
    assert all(np.array_equal(v, again[k]) for k, v in make_scene(120, 7).lookalikes.items())


def test_lookalikes_on_the_default_scene_are_a_handful_of_realistic_sizes() -> None:
    scene = make_scene(1020, 0)
    eight = np.ones((3, 3), bool)
    for kind in ("rock", "gravel", "clearcut"):
        labels, n = ndimage.label(scene.lookalikes[kind] > 0, structure=eight)
        assert 3 <= n <= 20, (kind, n)
        for sl in ndimage.find_objects(labels):
            extent = max(s.stop - s.start for s in sl)
            assert 3 <= extent <= 50, (kind, extent)  # 30-500 m
    road = scene.lookalikes["road"] >= 0.5
    assert road.sum() > 200
    assert ndimage.distance_transform_edt(road).max() <= 2  # thin lines, 1-3 pixels across


def test_lookalikes_have_the_brightness_of_their_class(tmp_path: Path, scene: DemoScene) -> None:
    paths = write_demo_data(tmp_path / "l1c", size=SIZE, seed=SEED, product="L1C")
    dn, _, _ = read(band_file(paths.safe, "B04"))
    red = (dn.astype(np.float64) - 1000) / 10000
    clear = scene.valid10 & (scene.cloud == 0) & (scene.shadow == 0)
    forest = class_spectrum("forest", "L1C")["B04"]
    for kind, cls in LOOKALIKES.items():
        sel = clear & (scene.lookalikes[kind] >= (0.75 if kind == "road" else 0.9))  # roads are sub-pixel
        assert sel.sum() > 5, kind
        expected = class_spectrum(cls, "L1C")["B04"]  # data-derived surface, back through the atmosphere
        assert np.median(red[sel]) == pytest.approx(expected, rel=0.2), kind
        assert np.median(red[sel]) > forest + 0.04, kind

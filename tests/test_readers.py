"""Readers: SAFE products (L1C/L2A, before and after baseline 04.00), band folders, DEM voids.

SAFE products are built here: layout and metadata XML are synthetic, pixel
values are the real Slovenia L1C bands (cropped to 96 x 96 px at 10 m and
subsampled to 20 m and 60 m), written as lossless JPEG 2000.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import dask
import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import Resampling

from pipeline.core.channels import S2_BANDS
from pipeline.core.config import SceneConfig
from pipeline.core.errors import ConfigError, InputError
from pipeline.core.grid import Grid
from pipeline.io.dem import open_dem
from pipeline.io.raster_source import open_raster
from pipeline.io.safe_metadata import parse_safe_metadata
from pipeline.io.sentinel2 import read_band_folder, read_safe
from pipeline.stack.layers import stack_scene

TILE = "T33TVM"
SENSING = "20220301T101021"
X0, Y0 = 465180.0, 5080260.0  # multiples of 60 m, like Sentinel-2 tiles
SIZE = 96                     # 10 m pixels; divisible by 2 and 6
L2A_RES = {10: ("B02", "B03", "B04", "B08"),
           20: ("B02", "B03", "B04", "B05", "B06", "B07", "B8A", "B11", "B12"),
           60: ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B8A", "B09", "B11", "B12")}
BAND_ID = {b: i for i, b in enumerate(("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A",
                                       "B09", "B10", "B11", "B12"))}


def slovenia_dn(shared_data: Path) -> dict[str, np.ndarray]:
    """Real DN (uint16, 0 = no data) of the 13 Slovenia bands, 96 x 96 at 10 m."""
    out = {}
    for band in S2_BANDS:
        with rasterio.open(shared_data / "scenes" / "slovenia_l1c" / f"{band}.tif") as ds:
            out[band] = ds.read(1)[:SIZE, :SIZE]
    return out


def _write_jp2(path: Path, data: np.ndarray, res: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="JP2OpenJPEG", width=data.shape[1], height=data.shape[0], count=1,
                       dtype="uint16", crs="EPSG:32633", transform=Affine(res, 0, X0, 0, -res, Y0),
                       QUALITY=100, REVERSIBLE="YES") as ds:
        ds.write(data.astype(np.uint16), 1)


def _stored(dn: np.ndarray, res: int, offset: int) -> np.ndarray:
    """DN subsampled to ``res`` and shifted by -offset (DN 0 stays 0)."""
    step = res // 10
    sub = dn[::step, ::step].astype(np.int32)
    return np.where(sub == 0, 0, sub - offset).astype(np.uint16)


def make_safe(root: Path, dn: dict[str, np.ndarray], *, level: str = "L2A", baseline: str = "04.00",
              with_offset: bool | None = None, start: str = "2022-03-01T10:10:21.024Z",
              list_files: bool = True, scl: np.ndarray | None = None) -> Path:
    """Write a Sentinel-2 SAFE product. ``with_offset`` defaults to baseline >= 04.00."""
    if with_offset is None:
        with_offset = float(baseline) >= 4.0
    offset = -1000 if with_offset else 0
    kind = "MSIL2A" if level == "L2A" else "MSIL1C"
    name = f"S2A_{kind}_{SENSING}_N{baseline.replace('.', '')}_R022_{TILE}_20220301T130000.SAFE"
    safe = root / name
    granule = safe / "GRANULE" / f"{level}_{TILE}_A034912_{SENSING}"
    img = granule / "IMG_DATA"
    files: list[str] = []
    if level == "L2A":
        for res, bands in L2A_RES.items():
            for band in bands:
                rel = f"R{res}m/{TILE}_{SENSING}_{band}_{res}m"
                _write_jp2(img / f"{rel}.jp2", _stored(dn[band], res, offset), res)
                files.append(rel)
        for res in (20, 60):
            classes = scl if scl is not None else np.full((SIZE, SIZE), 4, np.uint8)
            rel = f"R{res}m/{TILE}_{SENSING}_SCL_{res}m"
            _write_jp2(img / f"{rel}.jp2", classes[::res // 10, ::res // 10], res)
            files.append(rel)
    else:
        for band, res in S2_BANDS.items():
            rel = f"{TILE}_{SENSING}_{band}"
            _write_jp2(img / f"{rel}.jp2", _stored(dn[band], res, offset), res)
            files.append(rel)
    image_files = "\n".join(
        f"<IMAGE_FILE>GRANULE/{granule.name}/IMG_DATA/{f}</IMAGE_FILE>" for f in files) if list_files else ""
    spectral = "\n".join(f'<Spectral_Information bandId="{i}" physicalBand="{b.replace("B0", "B")}">'
                         "<RESOLUTION>10</RESOLUTION></Spectral_Information>" for b, i in BAND_ID.items())
    if level == "L2A":
        quant = ('<QUANTIFICATION_VALUES_LIST><BOA_QUANTIFICATION_VALUE unit="none">10000'
                 '</BOA_QUANTIFICATION_VALUE><AOT_QUANTIFICATION_VALUE unit="none">1000.0'
                 "</AOT_QUANTIFICATION_VALUE></QUANTIFICATION_VALUES_LIST>")
        offsets = ("<BOA_ADD_OFFSET_VALUES_LIST>" + "".join(
            f'<BOA_ADD_OFFSET band_id="{i}">{offset}</BOA_ADD_OFFSET>' for i in BAND_ID.values())
            + "</BOA_ADD_OFFSET_VALUES_LIST>") if with_offset else ""
        ns = "https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-2A.xsd"
        root_tag, ptype = "Level-2A_User_Product", "S2MSI2A"
    else:
        quant = '<QUANTIFICATION_VALUE unit="none">10000</QUANTIFICATION_VALUE>'
        offsets = ("<Radiometric_Offset_List>" + "".join(
            f'<RADIO_ADD_OFFSET band_id="{i}">{offset}</RADIO_ADD_OFFSET>' for i in BAND_ID.values())
            + "</Radiometric_Offset_List>") if with_offset else ""
        ns = "https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-1C.xsd"
        root_tag, ptype = "Level-1C_User_Product", "S2MSI1C"
    xml = f"""<?xml version="1.0" encoding="UTF-8"?>
<n1:{root_tag} xmlns:n1="{ns}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
<n1:General_Info>
<Product_Info>
<PRODUCT_START_TIME>{start}</PRODUCT_START_TIME>
<PRODUCT_STOP_TIME>{start}</PRODUCT_STOP_TIME>
<PRODUCT_URI>{name}</PRODUCT_URI>
<PROCESSING_LEVEL>Level-{level[1:]}</PROCESSING_LEVEL>
<PRODUCT_TYPE>{ptype}</PRODUCT_TYPE>
<PROCESSING_BASELINE>{baseline}</PROCESSING_BASELINE>
<Product_Organisation><Granule_List><Granule granuleIdentifier="{granule.name}" imageFormat="JPEG2000">
{image_files}
</Granule></Granule_List></Product_Organisation>
</Product_Info>
<Product_Image_Characteristics>
<Special_Values><SPECIAL_VALUE_TEXT>NODATA</SPECIAL_VALUE_TEXT><SPECIAL_VALUE_INDEX>0</SPECIAL_VALUE_INDEX></Special_Values>
{quant}
{offsets}
<Spectral_Information_List>{spectral}</Spectral_Information_List>
</Product_Image_Characteristics>
</n1:General_Info>
</n1:{root_tag}>
"""
    (safe / f"MTD_{kind}.xml").write_text(xml, encoding="utf-8")
    return safe


@pytest.fixture(scope="module")
def dn(shared_data: Path) -> dict[str, np.ndarray]:
    return slovenia_dn(shared_data)


def _dem(path: Path, value: float = 700.0) -> Path:
    z = value + np.add.outer(np.arange(SIZE + 20) * 2.0, np.arange(SIZE + 20) * 1.0)
    with rasterio.open(path, "w", driver="GTiff", width=SIZE + 20, height=SIZE + 20, count=1, dtype="float32",
                       crs="EPSG:32633", transform=Affine(10, 0, X0 - 100, 0, -10, Y0 + 100)) as ds:
        ds.write(z.astype(np.float32), 1)
    return path


def _cfg(tmp_path: Path, **scene: object) -> SceneConfig:
    return SceneConfig.model_validate(
        {"scene": scene, "dem": {"path": str(_dem(tmp_path / "dem.tif"))}, "grid": {"block_size": 256}},
        context={"base_dir": tmp_path},
    )


# ---------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(("level", "baseline", "expect_offset"),
                         [("L2A", "04.00", -1000.0), ("L2A", "02.14", 0.0),
                          ("L1C", "04.00", -1000.0), ("L1C", "02.07", 0.0)])
def test_metadata_offset_quantification_date(tmp_path: Path, dn: dict[str, np.ndarray], level: str,
                                             baseline: str, expect_offset: float) -> None:
    safe = make_safe(tmp_path, dn, level=level, baseline=baseline)
    meta = parse_safe_metadata(safe / f"MTD_MSI{level}.xml")
    assert meta.level == level
    assert meta.processing_baseline == baseline
    assert meta.product_type == ("S2MSI2A" if level == "L2A" else "S2MSI1C")
    assert meta.quantification == 10000.0
    assert meta.acquisition_date == dt.date(2022, 3, 1)
    expected = {b: expect_offset for b in BAND_ID} if expect_offset else {}
    assert meta.offsets == expected


def test_offset_comes_from_metadata_not_from_the_date(tmp_path: Path, dn: dict[str, np.ndarray]) -> None:
    """A 2018 acquisition reprocessed with baseline 05.00 carries the offset too."""
    safe = make_safe(tmp_path, dn, baseline="05.00", start="2018-09-06T01:23:45.000Z")
    inputs = read_safe(safe)
    assert inputs.acquisition_date == dt.date(2018, 9, 6)
    assert inputs.bands["B04"].offset == -1000.0


# ---------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("listed", [True, False], ids=["listed-in-xml", "found-by-layout"])
def test_l2a_bands_at_native_resolution_and_scl(tmp_path: Path, dn: dict[str, np.ndarray], listed: bool) -> None:
    inputs = read_safe(make_safe(tmp_path, dn, list_files=listed))
    assert inputs.product == "S2_L2A"
    assert "B10" not in inputs.bands
    assert set(inputs.bands) == set(S2_BANDS) - {"B10"}
    for band, bf in inputs.bands.items():
        assert bf.path.parent.name == f"R{S2_BANDS[band]}m", band
        assert bf.path.name.endswith(f"_{band}_{S2_BANDS[band]}m.jp2")
    assert inputs.scl is not None and inputs.scl.name.endswith("_SCL_20m.jp2")
    assert inputs.scene_id.startswith("S2A_MSIL2A_") and not inputs.scene_id.endswith(".SAFE")


def test_l1c_has_all_13_bands(tmp_path: Path, dn: dict[str, np.ndarray]) -> None:
    inputs = read_safe(make_safe(tmp_path, dn, level="L1C", list_files=False))
    assert inputs.product == "S2_L1C"
    assert set(inputs.bands) == set(S2_BANDS)
    assert inputs.scl is None
    with rasterio.open(inputs.bands["B09"].path) as ds:
        assert ds.res == (60.0, 60.0) and ds.driver == "JP2OpenJPEG"


def test_band_listed_in_metadata_but_missing_is_named(tmp_path: Path, dn: dict[str, np.ndarray]) -> None:
    safe = make_safe(tmp_path, dn)
    victim = next(safe.glob("GRANULE/*/IMG_DATA/R20m/*_B05_20m.jp2"))
    victim.unlink()
    with pytest.raises(InputError, match=r"B05_20m\.jp2.*missing"):
        read_safe(safe)


def test_directory_without_metadata_is_not_a_safe(tmp_path: Path) -> None:
    (tmp_path / "X.SAFE").mkdir()
    with pytest.raises(InputError, match="MTD_MSIL2A.xml or MTD_MSIL1C.xml"):
        read_safe(tmp_path / "X.SAFE")


# ---------------------------------------------------------------------------
# reflectance from SAFE products
# ---------------------------------------------------------------------------
def test_saturated_pixels_are_no_data(tmp_path: Path, dn: dict[str, np.ndarray]) -> None:
    dn = {k: v.copy() for k, v in dn.items()}
    dn["B02"][10:14, 20:25] = 65535  # SATURATED in the product's Special_Values
    safe = make_safe(tmp_path, dn, level="L1C", baseline="03.01")  # stored as given (no offset)
    stack = stack_scene(_cfg(tmp_path, safe=str(safe)), ["B02", "B08", "DEM"])
    data, valid = dask.compute(stack.data, stack.valid)
    assert np.isnan(data.sel(band="B02").values[10:14, 20:25]).all()
    assert not valid.values[10:14, 20:25].any()
    assert np.isfinite(data.sel(band="B02").values[dn["B02"] > 0][:100]).all()


@pytest.mark.parametrize(("level", "baseline"), [("L2A", "02.14"), ("L2A", "04.00"), ("L1C", "03.01"),
                                                 ("L1C", "04.00")])
def test_safe_reflectance_equals_dn_over_10000(tmp_path: Path, dn: dict[str, np.ndarray], level: str,
                                               baseline: str) -> None:
    """Same physical scene stored before and after 04.00: the same reflectance comes out."""
    safe = make_safe(tmp_path, dn, level=level, baseline=baseline)
    cfg = _cfg(tmp_path, safe=str(safe))
    stack = stack_scene(cfg, ["B02", "B08", "B05", "B01", "DEM"])
    assert stack.product == f"S2_{level}"
    assert stack.acquisition_date == dt.date(2022, 3, 1)
    assert stack.grid == Grid.from_bounds((X0, Y0 - SIZE * 10, X0 + SIZE * 10, Y0), "EPSG:32633", 10)
    data, valid = dask.compute(stack.data, stack.valid)
    for band in ("B02", "B08"):  # 10 m bands sit on the output grid: exact
        src = dn[band]
        got = data.sel(band=band).values
        np.testing.assert_array_equal(np.isnan(got), src == 0)
        np.testing.assert_allclose(got[src > 0], src[src > 0] / 10000.0, rtol=1e-6)
    nodata = dn["B02"] == 0
    assert not valid.values[nodata].any()
    # 20 m / 60 m bands are interpolated: same range as the source reflectance
    for band in ("B05", "B01"):
        got = data.sel(band=band).values[valid.values]
        src = dn[band][dn[band] > 0] / 10000.0
        assert src.min() - 1e-6 <= got.min() and got.max() <= src.max() + 1e-6
    assert valid.values.mean() > 0.5


def test_l2a_scl_classes_make_pixels_invalid(tmp_path: Path, dn: dict[str, np.ndarray]) -> None:
    scl = np.full((SIZE, SIZE), 4, np.uint8)   # vegetation
    scl[0:20, 60:96] = 9                       # cloud high probability
    scl[60:80, 60:96] = 6                      # water
    scl[80:96, 60:96] = 3                      # cloud shadow
    dn = {k: np.where(v == 0, 1000, v) for k, v in dn.items()}  # no band no-data here
    safe = make_safe(tmp_path, dn, scl=scl)

    def valid_for(mask: dict[str, bool]) -> np.ndarray:
        cfg = SceneConfig.model_validate(
            {"scene": {"safe": str(safe)}, "dem": {"path": str(_dem(tmp_path / "dem.tif"))},
             "mask": {"cloud_buffer_m": 0, **mask}, "grid": {"block_size": 256}})
        return stack_scene(cfg, ["B02", "B04"]).valid.values

    default = valid_for({})
    assert not default[0:20, 60:96].any()
    assert not default[80:96, 60:96].any()
    assert default[60:80, 60:96].all()          # water kept by default
    assert default[20:60, 0:60].all()
    with_water = valid_for({"water": True})
    assert not with_water[60:80, 60:96].any()
    no_cloud_rule = valid_for({"cloud": False})
    assert no_cloud_rule[0:20, 60:96].all()


# ---------------------------------------------------------------------------
# band folders and mappings
# ---------------------------------------------------------------------------
def _tif(path: Path, value: int = 1000, crs: str | None = "EPSG:32633") -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint16", crs=crs,
                       transform=Affine(10, 0, X0, 0, -10, Y0)) as ds:
        ds.write(np.full((1, 8, 8), value, np.uint16))
    return path


def test_band_folder_matches_tokens_case_insensitively(tmp_path: Path) -> None:
    for name in ("T33TVM_20220301_B02_10m.tif", "b8a.TIF", "scene-B11.jp2.tif", "B1.tif", "dem.tif",
                 "notes_B03.txt", "T33TVM_SCL_20m.tif"):
        _tif(tmp_path / name) if name.lower().endswith((".tif", ".tiff")) else (tmp_path / name).write_text("x")
    cfg = _cfg(tmp_path, bands_dir=str(tmp_path))
    inputs = read_band_folder(tmp_path, cfg.scene)
    assert set(inputs.bands) == {"B02", "B8A", "B11", "B01"}
    assert inputs.bands["B8A"].path.name == "b8a.TIF"
    assert inputs.scl is not None and inputs.scl.name == "T33TVM_SCL_20m.tif"
    assert inputs.product == "bands"


def test_ambiguous_band_folder_is_an_error(tmp_path: Path) -> None:
    _tif(tmp_path / "X_B02_10m.tif")
    _tif(tmp_path / "X_B02_20m.tif")
    _tif(tmp_path / "X_B03_10m.tif")
    cfg = _cfg(tmp_path, bands_dir=str(tmp_path))
    with pytest.raises(InputError, match=r"ambiguous.*B02: X_B02_10m\.tif, X_B02_20m\.tif"):
        read_band_folder(tmp_path, cfg.scene)


def test_explicit_mapping_with_offset_and_unknown_band(tmp_path: Path) -> None:
    _tif(tmp_path / "red.tif", value=2500)
    cfg = _cfg(tmp_path, bands={"b4": "red.tif"}, dn_offset=-1000, quantification=10000)
    stack = stack_scene(cfg, ["B04"])
    np.testing.assert_allclose(stack.data.values[0, :8, :8], 0.15, rtol=1e-6)
    bad = _cfg(tmp_path, bands={"B99": "red.tif"})
    with pytest.raises(ConfigError, match="scene.bands.B99"):
        stack_scene(bad, ["B04"])


# ---------------------------------------------------------------------------
# DEM voids
# ---------------------------------------------------------------------------
def test_dem_voids_from_nodata_config_values_and_nan(tmp_path: Path) -> None:
    z = np.full((6, 6), 500.0, np.float32)
    z[0, 0], z[1, 1], z[2, 2], z[3, 3], z[4, 4] = -9999, -32768, np.nan, 0.0, -1.0
    path = tmp_path / "dem.tif"
    with rasterio.open(path, "w", driver="GTiff", width=6, height=6, count=1, dtype="float32", nodata=-1.0,
                       crs="EPSG:4326", transform=Affine(0.0003, 0, 14.5, 0, -0.0003, 45.9)) as ds:
        ds.write(z, 1)
    section = SceneConfig.model_validate(
        {"scene": {"bands_dir": str(tmp_path)}, "dem": {"path": str(path), "void_values": [-9999, -32768, 0]}}).dem
    src = open_dem(section)
    same_grid = Grid(src.crs, src.transform, 6, 6)
    got = src.read_onto(same_grid, Resampling.nearest)
    assert np.isnan(np.diag(got)[:5]).all()
    assert got[5, 5] == 500.0 and np.isfinite(got[0, 1:]).all()


def test_open_raster_reads_no_pixels_and_reports_metadata(tmp_path: Path) -> None:
    src = open_raster(_tif(tmp_path / "B02.tif"), "band B02", nodata=[0], offset=-1000, scale=1e-4)
    assert src.width == 8 and src.crs.to_epsg() == 32633
    assert src.nodata == (0.0,)
    raw = np.array([[0, 1000, 3000]], np.uint16)
    np.testing.assert_allclose(src.to_physical(raw), [[np.nan, 0.0, 0.2]], atol=1e-7)


@pytest.mark.parametrize(("dtype", "nodata", "offset", "scale"), [
    ("uint16", (0.0,), -1000.0, 1e-4),  # Sentinel-2 L2A since baseline 04.00
    ("uint16", (0.0, 65535.0), 0.0, 1e-4),
    ("int16", (-9999.0, -32768.0), 0.0, 1.0),  # a DEM with two void values
    ("float32", (float("nan"), -9999.0), 0.0, 1.0),
    ("float64", (), 2.5, 0.5),
])
def test_physical_values_written_into_a_given_array_are_the_same(tmp_path: Path, dtype: str, nodata: tuple,
                                                                 offset: float, scale: float) -> None:
    """to_physical(raw, out=...) writes into a window of a larger array (a block's channel) the
    same float32 values, bit for bit, as the conversion, offset, scale and no-data steps one by one."""
    from dataclasses import replace

    rng = np.random.default_rng(11)
    raw = (rng.random((40, 50)) * 3000).astype(dtype)
    raw[3, :7] = -9999 if dtype != "uint16" else 0
    if dtype == "float32":
        raw[5, 5] = np.nan
    if dtype == "uint16":
        raw[6, :4] = 65535
    src = replace(open_raster(_tif(tmp_path / "B02.tif"), "band B02"),
                  nodata=nodata, offset=offset, scale=scale)
    expected = raw.astype(np.float32)
    bad = np.isnan(expected)
    for v in nodata:
        if not np.isnan(v):
            bad |= raw == v
    expected += np.float32(offset)
    expected *= np.float32(scale)
    expected[bad] = np.nan
    block = np.full((3, 60, 70), 7.0, np.float32)
    got = src.to_physical(raw, out=block[1, 10:50, 5:55])
    assert got.base is block
    np.testing.assert_array_equal(block[1, 10:50, 5:55], expected)
    np.testing.assert_array_equal(src.to_physical(raw), expected)
    assert (block[0] == 7).all() and (block[1, :10] == 7).all() and (block[2] == 7).all()
    with pytest.raises(ValueError, match="float32"):
        src.to_physical(raw, out=np.zeros((40, 50), np.float64))


def test_cloud_buffer_grows_clouds_and_shadows_but_not_water(tmp_path: Path, dn: dict[str, np.ndarray]) -> None:
    scl = np.full((SIZE, SIZE), 4, np.uint8)
    scl[40:50, 40:50] = 8                      # cloud medium probability
    scl[0:10, 0:10] = 6                        # water
    dn = {k: np.where(v == 0, 1000, v) for k, v in dn.items()}
    safe = make_safe(tmp_path, dn, scl=scl)
    cfg = SceneConfig.model_validate(
        {"scene": {"safe": str(safe)}, "dem": {"path": str(_dem(tmp_path / "dem.tif"))},
         "mask": {"cloud_buffer_m": 40, "water": True}, "grid": {"block_size": 256}})
    valid = stack_scene(cfg, ["B02"]).valid.values
    assert not valid[36:54, 40:50].any()       # 4 px (40 m) around the cloud, along rows
    assert not valid[40:50, 36:54].any()
    assert valid[34, 45] and valid[55, 45]     # 5 px away: kept
    assert not valid[0:10, 0:10].any()
    assert valid[11, 5] and valid[5, 11]       # water is not buffered


def test_cloud_buffer_per_block_equals_whole_array() -> None:
    import dask.array as da

    from pipeline.stack.masks import scl_exclusion

    rng = np.random.default_rng(0)
    scl = rng.choice(np.array([4, 4, 4, 4, 8, 3, 6], np.float32), size=(90, 70))
    scl[rng.random(scl.shape) < 0.01] = np.nan
    whole = scl_exclusion(da.from_array(scl, chunks=-1), [0, 1, 3, 8, 9], [3, 8, 9], 3.5).compute()
    tiled = scl_exclusion(da.from_array(scl, chunks=(13, 17)), [0, 1, 3, 8, 9], [3, 8, 9], 3.5).compute()
    assert np.array_equal(whole, tiled)
    assert whole.mean() > (np.isin(scl, [3, 8]) | np.isnan(scl)).mean()  # the buffer grew something


@pytest.mark.parametrize("holes", [False, True])
def test_20m_to_10m_upsampling_matches_gdal_bilinear(tmp_path: Path, holes: bool) -> None:
    """The separable upsampler (with and without no-data in the window) gives GDAL's bilinear warp."""
    from rasterio.warp import reproject

    rng = np.random.default_rng(1)
    src = rng.uniform(100, 5000, (60, 50)).astype(np.uint16)
    if holes:
        src[20:24, 10:13] = 0
    transform = Affine(20, 0, X0, 0, -20, Y0)
    path = tmp_path / "B05.tif"
    with rasterio.open(path, "w", driver="GTiff", width=50, height=60, count=1, dtype="uint16",
                       crs="EPSG:32633", transform=transform, nodata=0) as ds:
        ds.write(src, 1)
    raster = open_raster(path, "band B05", scale=1e-4)
    # a 10 m grid reaching past the source on two sides, offset by half a source pixel
    grid = Grid(rasterio.crs.CRS.from_epsg(32633), Affine(10, 0, X0 - 30, 0, -10, Y0 + 10), 110, 124)
    got = raster.read_onto(grid)
    ref = np.full(grid.shape, np.nan, np.float32)
    reproject(src.astype(np.float32) * np.float32(1e-4), ref, src_transform=transform, src_crs="EPSG:32633",
              dst_transform=grid.transform, dst_crs="EPSG:32633", resampling=Resampling.bilinear,
              src_nodata=0, dst_nodata=np.nan)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got[~np.isnan(got)], ref[~np.isnan(ref)], rtol=1e-5, atol=1e-6)
    assert np.isnan(got).any() and np.isfinite(got).mean() > 0.8


@pytest.mark.parametrize(("ratio", "holes", "offset"), [
    (2, False, (0, 0)), (2, True, (1, 3)), (6, False, (5, 2)), (6, True, (0, 7)), (4, False, (2, 1)), (3, False, (2, 1)),
])
def test_integer_upsampling_from_slices_is_bit_identical_to_the_gathered_taps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ratio: int, holes: bool, offset: tuple[int, int]) -> None:
    """20 m and 60 m bands upsample from strided slices of the source (one pair of weights per
    phase) where that is exact: the same float32 values as the gathered taps, on windows inside the
    source, reaching past its edges, and starting at any phase of its pixels."""
    from pipeline.io import upsample

    rng = np.random.default_rng(ratio)
    res = 10 * ratio
    src = rng.uniform(100, 9000, (47, 53)).astype(np.uint16)
    if holes:
        src[10:14, 20:23] = 0
    transform = Affine(res, 0, X0, 0, -res, Y0)
    path = tmp_path / "band.tif"
    with rasterio.open(path, "w", driver="GTiff", width=53, height=47, count=1, dtype="uint16",
                       crs="EPSG:32633", transform=transform, nodata=0) as ds:
        ds.write(src, 1)
    raster = open_raster(path, "band B05", scale=1e-4)
    crs = rasterio.crs.CRS.from_epsg(32633)
    row0, col0 = offset
    grids = [
        # inside the source, starting at destination pixel (row0, col0) of the source's pixels
        Grid(crs, Affine(10, 0, X0 + 10 * (col0 + 2 * ratio), 0, -10, Y0 - 10 * (row0 + 2 * ratio)),
             42 * ratio - col0, 36 * ratio - row0),
        # the whole source and beyond (edges: the gathered taps)
        Grid(crs, Affine(10, 0, X0 - 10 * col0 - 40, 0, -10, Y0 + 10 * row0 + 30), 53 * ratio + 20, 47 * ratio + 10),
    ]
    calls: list[bool] = []
    real = upsample.tap_phases

    def spy(taps: tuple[np.ndarray, ...], r: int) -> object:
        phases = real(taps, r)
        calls.append(phases is not None)
        return phases

    monkeypatch.setattr(upsample, "tap_phases", spy)
    strided = [raster.read_onto(g) for g in grids]
    if ratio % 2 == 0:
        assert calls[:2] == [True, True], "the strided path was not taken inside the source"
    # an odd ratio puts some output centres on source pixel centres, where the float64 positions
    # land on either side of the pixel: those axes keep the gathered taps (the same values)
    monkeypatch.setattr(upsample, "tap_phases", lambda taps, r: None)
    gathered = [raster.read_onto(g) for g in grids]
    for a, b in zip(strided, gathered, strict=True):
        assert np.isfinite(a).mean() > 0.5
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
    # and they are GDAL's values (inside the source the weights sum to one: no division)
    from rasterio.warp import reproject

    for grid, got in zip(grids, strided, strict=True):
        ref = np.full(grid.shape, np.nan, np.float32)
        reproject(src.astype(np.float32) * np.float32(1e-4), ref, src_transform=transform, src_crs=crs,
                  dst_transform=grid.transform, dst_crs=crs, resampling=Resampling.bilinear,
                  src_nodata=0, dst_nodata=np.nan)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
        np.testing.assert_allclose(got[~np.isnan(got)], ref[~np.isnan(ref)], rtol=1e-5, atol=1e-6)
    # into a caller's array (one channel of a block): the same values, in that array
    buf = np.zeros((2, *grids[0].shape), np.float32)
    channel = buf[1]
    assert raster.read_onto(grids[0], out=channel) is channel
    np.testing.assert_array_equal(buf[1].view(np.uint32), gathered[0].view(np.uint32))
    assert not buf[0].any()
    with pytest.raises(ValueError, match="out must be float32"):
        raster.read_onto(grids[0], out=np.zeros(grids[0].shape, np.float64))


def test_decimated_read_is_the_mean_of_the_valid_pixels_of_each_block(tmp_path: Path) -> None:
    """Quicklook reads: each coarse pixel is the mean of its block's valid pixels in physical
    units, DN 0 (no data here, though the file declares none) never enters a mean."""
    rng = np.random.default_rng(4)
    dn = rng.integers(1000, 5000, (96, 120)).astype(np.uint16)
    dn[:24, :] = 0  # whole blocks without data (the grid starts at row 16)
    dn[10:13, 20:22] = 0  # some no-data pixels inside blocks
    path = tmp_path / "b04.tif"
    transform = Affine(10, 0, 600000, 0, -10, 5000000)
    with rasterio.open(path, "w", driver="GTiff", width=120, height=96, count=1, dtype="uint16",
                       crs="EPSG:32633", transform=transform, tiled=True, blockxsize=32, blockysize=32) as dst:
        dst.write(dn, 1)
    src = open_raster(path, "band B04", nodata=(0,), offset=-1000, scale=1e-4)
    grid = Grid(src.crs, transform * Affine.translation(8, 16), 100, 72)  # aligned, inside the file
    factor = 4
    out = np.empty((72 // factor, 100 // factor), np.float32)
    assert src.read_decimated(grid, factor, out)
    phys = src.to_physical(dn)[16:16 + 72, 8:8 + 100].reshape(18, factor, 25, factor)
    count = np.isfinite(phys).sum(axis=(1, 3))
    expected = np.where(count > 0, np.nansum(phys, axis=(1, 3)) / np.maximum(count, 1), np.nan)
    assert np.isnan(expected).any() and np.isfinite(expected).any()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    np.testing.assert_allclose(out, expected, rtol=1e-6, equal_nan=True)
    # a grid the file does not cover, or on other pixels, is not read this way
    shifted = Grid(src.crs, transform * Affine.translation(0.5, 0), 40, 40)
    assert not src.read_decimated(shifted, factor, np.empty((10, 10), np.float32))
    beyond = Grid(src.crs, transform * Affine.translation(100, 0), 40, 40)
    assert not src.read_decimated(beyond, factor, np.empty((10, 10), np.float32))

"""Nothing leaked: inputs go through an allow-list, ids and output folders cannot escape.

* A VRT could make GDAL read any local file as pixels (a ``VRTRawRasterBand`` over
  /etc/passwd gave "elevations") or make a network request (``/vsicurl/`` sources).
  Inputs are now local GeoTIFF/COG or JPEG 2000 files; VRTs only with
  ``scene.allow_vrt`` / ``dem.allow_vrt``, and then only over sources that pass the
  same rules, never with raw-file bands or Python pixel functions.
* ``scene.id: ".."`` became a path component of the outputs; ids are now checked,
  and ids derived from product or folder names are made safe.
* ``output.dir: /vsimem/out`` is not a folder and is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from small_scene import X0, Y0, write_raster, write_scene

from pipeline.core.config import load_scene_config
from pipeline.core.configbase import scene_id_from_name
from pipeline.core.errors import ConfigError, InputError
from pipeline.core.grid import Grid
from pipeline.core.region_config import load_region_config
from pipeline.io.allow_list import VrtPolicy
from pipeline.io.dem import open_dem, open_slope
from pipeline.io.gdal import GDAL_SAFETY_OPTIONS
from pipeline.io.raster_source import open_raster
from pipeline.io.sentinel2 import SceneInputs, read_safe, read_scene
from pipeline.run.validate import validate_scene

SIZE = 32
PASSWD = Path("/etc/passwd")




@pytest.fixture
def scene(tmp_path: Path) -> Path:
    """A small valid scene: B02, B03, B04 GeoTIFFs in bands/ and a DEM, all in EPSG:32633."""
    return write_scene(tmp_path, SIZE)


def scene_yaml(root: Path, **overrides: object):  # type: ignore[no-untyped-def]
    data: dict[str, object] = {"scene": {"bands_dir": "bands"}, "dem": {"path": "dem.tif"},
                               "channels": ["B02", "B03", "B04", "SLOPE", "DEM"], "output": {"dir": "out"}}
    for key, value in overrides.items():  # sections are merged into the defaults
        base = dict(data.get(key) or {})  # type: ignore[call-overload]
        if key == "scene" and isinstance(value, dict) and ("bands" in value or "safe" in value):
            base.pop("bands_dir")
        data[key] = {**base, **value} if isinstance(value, dict) else value
    path = root / "scene.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_scene_config(path)


def _secret(root: Path) -> Path:
    """/etc/passwd where there is one, else a stand-in secret."""
    if PASSWD.is_file():
        return PASSWD
    path = root / "secret.txt"
    path.write_text("root:x:0:0:root:/root:/bin/bash\n" * 8)
    return path


def _raw_vrt(path: Path, target: Path, *, subclass: str = "VRTRawRasterBand", relative: bool = False) -> Path:
    source = target.name if relative else str(target)
    path.write_text(f"""<VRTDataset rasterXSize="8" rasterYSize="4">
  <SRS>EPSG:32633</SRS>
  <GeoTransform>{X0}, 10, 0, {Y0}, 0, -10</GeoTransform>
  <VRTRasterBand dataType="Byte" band="1" subClass="{subclass}">
    <SourceFilename relativeToVRT="{int(relative)}">{source}</SourceFilename>
    <ImageOffset>0</ImageOffset><PixelOffset>1</PixelOffset><LineOffset>8</LineOffset>
  </VRTRasterBand>
</VRTDataset>
""")
    return path


def _sourced_vrt(path: Path, source: str, *, relative: bool = True, size: int = SIZE + 10,
                 origin: tuple[float, float] = (X0 - 50, Y0 + 50), extra: str = "") -> Path:
    """A plain VRTSourcedRasterBand over one source (the DEM's size and grid by default)."""
    path.write_text(f"""<VRTDataset rasterXSize="{size}" rasterYSize="{size}">
  <SRS>EPSG:32633</SRS>
  <GeoTransform>{origin[0]}, 10, 0, {origin[1]}, 0, -10</GeoTransform>
  <VRTRasterBand dataType="Float32" band="1"{extra}>
    <SimpleSource>
      <SourceFilename relativeToVRT="{int(relative)}">{source}</SourceFilename>
      <SourceBand>1</SourceBand>
    </SimpleSource>
  </VRTRasterBand>
</VRTDataset>
""")
    return path


@pytest.fixture
def no_gdal_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything asks GDAL to open a file (so no request can be made)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"GDAL was asked to open {args[0] if args else kwargs}")

    monkeypatch.setattr(rasterio, "open", refuse)


# ---------------------------------------------------------------------------
# 7. the input allow-list
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("allow_vrt", [False, True])
def test_passwd_vrt_as_dem_is_refused(scene: Path, allow_vrt: bool) -> None:
    vrt = _raw_vrt(scene / "dem.vrt", _secret(scene))
    cfg = scene_yaml(scene, dem={"path": "dem.vrt", "allow_vrt": allow_vrt})
    with pytest.raises(InputError) as caught:
        open_dem(cfg.dem)
    msg = str(caught.value)
    assert str(vrt) in msg and "DEM" in msg
    assert ("VRTRawRasterBand" if allow_vrt else "dem.allow_vrt") in msg
    problems = validate_scene(cfg)
    assert any(str(vrt) in p for p in problems), problems


@pytest.mark.parametrize("allow_vrt", [False, True])
def test_passwd_vrt_as_band_file_is_refused(scene: Path, allow_vrt: bool) -> None:
    vrt = _raw_vrt(scene / "bands" / "evil.vrt", _secret(scene))
    cfg = scene_yaml(scene, scene={"bands": {"B02": "bands/evil.vrt", "B03": "bands/T33TVM_B03.tif",
                                          "B04": "bands/T33TVM_B04.tif"}, "allow_vrt": allow_vrt})
    with pytest.raises(InputError) as caught:
        read_scene(cfg.scene).open_band("B02")
    msg = str(caught.value)
    assert str(vrt) in msg and "band B02" in msg
    assert ("VRTRawRasterBand" if allow_vrt else "scene.allow_vrt") in msg
    assert any(str(vrt) in p for p in validate_scene(cfg))


def test_passwd_vrt_as_slope_or_scl_is_refused(scene: Path) -> None:
    vrt = _raw_vrt(scene / "evil.vrt", _secret(scene))
    cfg = scene_yaml(scene, dem={"slope": "evil.vrt", "allow_vrt": True},
                  scene={"scl": "evil.vrt", "allow_vrt": True})
    with pytest.raises(InputError, match="VRTRawRasterBand"):
        open_slope(cfg.dem)
    with pytest.raises(InputError, match="VRTRawRasterBand") as caught:
        read_scene(cfg.scene).open_scl()
    assert str(vrt) in str(caught.value) and "SCL" in str(caught.value)


def test_raw_band_is_refused_whatever_the_spelling_and_wherever_it_is(scene: Path) -> None:
    """GDAL matches VRT names without regard to case, a raw band next to the VRT reads any bytes
    too, and a VRT may name another VRT."""
    (scene / "blob.bin").write_bytes(bytes(range(32)))
    sibling = _raw_vrt(scene / "sibling.vrt", scene / "blob.bin", subclass="vrtrawrasterband", relative=True)
    with pytest.raises(InputError, match="VRTRawRasterBand"):
        open_raster(sibling, "DEM", vrt=VrtPolicy(allowed=True))
    outer = _sourced_vrt(scene / "outer.vrt", "sibling.vrt")
    with pytest.raises(InputError, match="VRTRawRasterBand") as caught:
        open_raster(outer, "DEM", vrt=VrtPolicy(allowed=True))
    assert str(outer) in str(caught.value)


def test_vrt_with_a_source_that_is_not_a_raster_is_refused(scene: Path) -> None:
    vrt = _sourced_vrt(scene / "dem.vrt", str(_secret(scene)), relative=False)
    with pytest.raises(InputError, match="cannot be opened as a raster") as caught:
        open_raster(vrt, "DEM", vrt=VrtPolicy(allowed=True))
    assert str(vrt) in str(caught.value)


def test_vrt_with_a_python_pixel_function_is_refused(scene: Path) -> None:
    vrt = _sourced_vrt(scene / "dem.vrt", "dem.tif", extra=' subClass="VRTDerivedRasterBand"')
    text = vrt.read_text().replace(
        "<SimpleSource>", "<PixelFunctionType>f</PixelFunctionType><PixelFunctionLanguage>Python"
        "</PixelFunctionLanguage><PixelFunctionCode>import os</PixelFunctionCode><SimpleSource>")
    vrt.write_text(text)
    with pytest.raises(InputError, match="Python pixel function"):
        open_raster(vrt, "DEM", vrt=VrtPolicy(allowed=True))
    assert os.environ["GDAL_VRT_ENABLE_PYTHON"] == "NO"
    assert all(os.environ[k] == v for k, v in GDAL_SAFETY_OPTIONS.items())


@pytest.mark.parametrize("path", [
    "/vsicurl/http://127.0.0.1:9/dem.tif",
    "/vsicurl/https://example.com/dem.tif",
    "/vsis3/bucket/dem.tif",
    "/vsimem/dem.tif",
    "/vsizip//data/dem.zip/dem.tif",
])
def test_vsi_dem_is_refused_without_opening_it(scene: Path, no_gdal_open: None, path: str) -> None:
    cfg = scene_yaml(scene, dem={"path": path})
    with pytest.raises(InputError, match="must be on the local disk") as caught:
        open_dem(cfg.dem)
    assert "DEM" in str(caught.value)


@pytest.mark.parametrize("path", ["https://example.com/B02.tif", "s3://bucket/B02.tif",
                                  "/vsicurl/http://127.0.0.1:9/B02.tif"])
def test_url_or_vsi_band_is_refused_without_opening_it(no_gdal_open: None, path: str) -> None:
    with pytest.raises(InputError, match="must be on the local disk"):
        open_raster(path, "band B02")  # type: ignore[arg-type]


def test_vsi_band_in_a_config_is_refused(scene: Path, no_gdal_open: None) -> None:
    cfg = scene_yaml(scene, scene={"bands": {"B02": "/vsicurl/http://127.0.0.1:9/B02.tif"}})
    with pytest.raises(InputError, match="must be on the local disk"):
        read_scene(cfg.scene).open_band("B02")
    with pytest.raises(InputError, match="must be on the local disk"):
        read_scene(scene_yaml(scene, scene={"bands_dir": "/vsizip//data/x.zip"}).scene)


@pytest.mark.parametrize("source", ["/vsicurl/http://127.0.0.1:9/dem.tif", "http://127.0.0.1:9/dem.tif",
                                    "vrt://dem.tif?bands=1"])
def test_allowed_vrt_with_a_network_source_is_refused_before_gdal(scene: Path, no_gdal_open: None,
                                                                  source: str) -> None:
    vrt = _sourced_vrt(scene / "dem.vrt", source, relative=False)
    cfg = scene_yaml(scene, dem={"path": "dem.vrt", "allow_vrt": True})
    with pytest.raises(InputError, match="must be on the local disk") as caught:
        open_dem(cfg.dem)
    assert str(vrt) in str(caught.value)


def test_harmless_vrt_is_refused_by_default_and_accepted_when_opted_in(scene: Path) -> None:
    vrt = _sourced_vrt(scene / "dem.vrt", "dem.tif")
    cfg = scene_yaml(scene, dem={"path": "dem.vrt"})
    with pytest.raises(InputError, match="dem.allow_vrt") as caught:
        open_dem(cfg.dem)
    assert str(vrt) in str(caught.value)

    cfg = scene_yaml(scene, dem={"path": "dem.vrt", "allow_vrt": True})
    assert validate_scene(cfg) == []
    src = open_dem(cfg.dem)
    assert src.driver == "VRT"
    direct = open_dem(scene_yaml(scene).dem)
    grid = Grid(crs=direct.crs, transform=direct.transform, width=direct.width, height=direct.height)
    np.testing.assert_array_equal(src.read_onto(grid), direct.read_onto(grid))


def test_harmless_band_vrt_needs_scene_allow_vrt(scene: Path) -> None:
    _sourced_vrt(scene / "bands" / "b02.vrt", "T33TVM_B02.tif", size=SIZE, origin=(X0, Y0))
    bands = {"B02": "bands/b02.vrt", "B03": "bands/T33TVM_B03.tif", "B04": "bands/T33TVM_B04.tif"}
    with pytest.raises(InputError, match="scene.allow_vrt"):
        read_scene(scene_yaml(scene, scene={"bands": bands}).scene).open_band("B02")
    cfg = scene_yaml(scene, scene={"bands": bands, "allow_vrt": True})
    assert validate_scene(cfg) == []
    assert read_scene(cfg.scene).open_band("B02").driver == "VRT"


def test_other_raster_formats_are_refused(scene: Path) -> None:
    asc = scene / "dem.asc"
    asc.write_text("ncols 2\nnrows 2\nxllcorner 0\nyllcorner 0\ncellsize 10\n1 2\n3 4\n")
    with pytest.raises(InputError, match="expected a GeoTIFF/COG or JPEG 2000 file"):
        open_raster(asc, "DEM")
    assert open_raster(scene / "dem.tif", "DEM").driver == "GTiff"


# ---------------------------------------------------------------------------
# 8. scene ids and the output folder
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["..", ".", "a/b", "../x", "/abs", ".hidden", "", "a\\b", "x" * 121, "a b"])
def test_unsafe_scene_id_is_refused_naming_the_field(scene: Path, bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        scene_yaml(scene, scene={"id": bad})
    msg = str(caught.value)
    assert "scene.id" in msg and "not a safe name" in msg
    assert str(scene / "scene.yaml") in msg


@pytest.mark.parametrize("good", ["S2A_MSIL2A_20220301T101021_N0400_R022_T33TVM", "iburi-2018.v2", "x" * 120])
def test_safe_scene_id_is_accepted(scene: Path, good: str) -> None:
    assert scene_yaml(scene, scene={"id": good}).scene.id == good


def test_derived_ids_are_made_safe(tmp_path: Path) -> None:
    assert scene_id_from_name("..") == "scene"
    assert scene_id_from_name("../../etc") == "_.._etc"
    assert scene_id_from_name("my scene (v2)") == "my_scene__v2_"
    folder = tmp_path / ".odd name"
    folder.mkdir()
    write_raster(folder / "T33TVM_B02.tif", np.ones((4, 4), np.uint16))
    (tmp_path / "scene.yaml").write_text(yaml.safe_dump({"scene": {"bands_dir": ".odd name/sub/.."},
                                                         "dem": {"path": "dem.tif"}}))
    (folder / "sub").mkdir()
    inputs = read_scene(load_scene_config(tmp_path / "scene.yaml").scene)
    assert inputs.scene_id == "odd_name"
    with pytest.raises(InputError, match="not a safe name"):
        SceneInputs(product="bands", scene_id="..", acquisition_date=None, bands={})


def _safe_product(root: Path, uri: str, image_file: str | None = None) -> Path:
    safe = root / "S2A_MSIL1C_X.SAFE"
    img = safe / "GRANULE" / "L1C_T33TVM" / "IMG_DATA"
    img.mkdir(parents=True)
    (img / "T33TVM_20220301T101021_B02.jp2").write_bytes(b"")  # found, not opened
    listed = f"<IMAGE_FILE>{image_file}</IMAGE_FILE>" if image_file else ""
    (safe / "MTD_MSIL1C.xml").write_text(
        f"<Level-1C_User_Product><Product_Info><PRODUCT_URI>{uri}</PRODUCT_URI>{listed}</Product_Info>"
        "<QUANTIFICATION_VALUE>10000</QUANTIFICATION_VALUE></Level-1C_User_Product>")
    return safe


def test_product_name_from_metadata_cannot_escape(tmp_path: Path) -> None:
    inputs = read_safe(_safe_product(tmp_path, "../../../tmp/evil.SAFE"))
    assert "/" not in inputs.scene_id and not inputs.scene_id.startswith(".")
    assert inputs.scene_id == "_.._.._tmp_evil"


def test_band_file_listed_outside_the_product_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere_B02.jp2"
    outside.write_bytes(b"")
    safe = _safe_product(tmp_path, "S2A_MSIL1C_X", image_file="../elsewhere_B02")
    with pytest.raises(InputError, match="outside the product"):
        read_safe(safe)


@pytest.mark.parametrize("out", ["/vsimem/out", "/vsis3/bucket/out", "s3://bucket/out"])
def test_vsi_output_dir_is_refused(scene: Path, out: str) -> None:
    with pytest.raises(ConfigError) as caught:
        scene_yaml(scene, output={"dir": out})
    msg = str(caught.value)
    assert "output.dir" in msg and "not a local folder" in msg
    region = scene / "region.yaml"
    region.write_text(yaml.safe_dump({"scenes": ["scene.yaml"], "output": {"dir": out}}))
    with pytest.raises(ConfigError, match="output.dir"):
        load_region_config(region)

"""Bad inputs: a clear message naming the file or field, the right error class, no output written.

Each case runs three ways: ``stack_scene`` (and computing the stack) raises
the documented error; ``validate_scene`` reports the same problem without
reading pixels (except for damage only a read can find); and the ``stack``
command exits non-zero and leaves the output folder empty.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from pathlib import Path

import dask
import numpy as np
import pytest
import rasterio
from affine import Affine
from small_scene import X0, Y0, scene_yaml, write_raster, write_scene

from pipeline.cli.stack import add_stack_arguments, cli_stack
from pipeline.cli.validate import add_validate_arguments, cli_validate
from pipeline.core.config import load_scene_config
from pipeline.core.errors import ChannelError, GridError, InputError, PipelineError
from pipeline.run.validate import validate_scene
from pipeline.stack.layers import save_stack, stack_scene

SIZE = 64




@pytest.fixture
def scene(tmp_path: Path) -> Path:
    """A small scene folder: B02, B03, B04 (tiled, compressed) and a DEM, all in EPSG:32633."""
    return write_scene(tmp_path, SIZE, tiled=True, blockxsize=16, blockysize=16, compress="deflate")


def _stack_cli(config: Path) -> int:
    parser = argparse.ArgumentParser()
    add_stack_arguments(parser)
    return cli_stack(parser.parse_args([str(config)]))


def _validate_cli(config: Path) -> int:
    parser = argparse.ArgumentParser()
    add_validate_arguments(parser)
    return cli_validate(parser.parse_args([str(config)]))


def _assert_refused(config: Path, error: type[PipelineError], *needles: str, found_by_validate: bool = True,
                    capsys: pytest.CaptureFixture[str] | None = None) -> None:
    """The stack fails with ``error`` naming ``needles``; validate agrees; nothing is written."""
    cfg = load_scene_config(config)
    with pytest.raises(error) as caught:
        stack = stack_scene(cfg)
        dask.compute(stack.data, stack.valid)
    for needle in needles:
        assert needle in str(caught.value), f"{needle!r} not in {caught.value}"
    problems = validate_scene(cfg)
    if found_by_validate:
        assert any(all(n in p for n in needles) for p in problems), problems
        assert _validate_cli(config) == 2
    assert _stack_cli(config) == 2
    if capsys is not None:
        err = capsys.readouterr().err
        assert all(n in err for n in needles), err
    out = config.parent / "out"
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_good_scene_passes_and_writes(scene: Path) -> None:
    config = scene_yaml(scene)
    assert validate_scene(load_scene_config(config)) == []
    assert _stack_cli(config) == 0
    assert [p.name for p in (scene / "out").iterdir()] == ["bands_stack.tif"]


def test_missing_band_file_in_a_mapping(scene: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = scene_yaml(scene, scene={"bands": {"B02": "bands/T33TVM_B02.tif", "B03": "bands/gone_B03.tif",
                                             "B04": "bands/T33TVM_B04.tif"}})
    _assert_refused(config, InputError, str(scene / "bands" / "gone_B03.tif"), "band B03", "not found",
                    capsys=capsys)


def test_missing_dem_file(scene: Path) -> None:
    (scene / "dem.tif").unlink()
    _assert_refused(scene_yaml(scene), InputError, str(scene / "dem.tif"), "DEM file not found")


def test_truncated_raster_is_refused_before_reading(scene: Path) -> None:
    victim = scene / "bands" / "T33TVM_B03.tif"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) * 2 // 3])
    _assert_refused(scene_yaml(scene), InputError, str(victim), "truncated")


def test_corrupt_tile_fails_when_read_not_silently_zero(scene: Path) -> None:
    """The index is intact, a compressed tile is garbage: only reading can tell."""
    victim = scene / "bands" / "T33TVM_B04.tif"
    with rasterio.open(victim) as ds:
        offset = int(ds.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1))
        size = int(ds.get_tag_item("BLOCK_SIZE_1_1", "TIFF", bidx=1))
    raw = bytearray(victim.read_bytes())
    raw[offset:offset + size] = b"\xff" * size
    victim.write_bytes(bytes(raw))
    _assert_refused(scene_yaml(scene), InputError, str(victim), "cannot read pixels", found_by_validate=False)
    assert validate_scene(load_scene_config(scene_yaml(scene))) == []  # metadata alone looks fine


def test_truncated_jpeg2000_is_refused(scene: Path) -> None:
    jp2 = scene / "bands" / "T33TVM_B03.jp2"
    with rasterio.open(scene / "bands" / "T33TVM_B03.tif") as src:
        data = src.read(1)
    with rasterio.open(jp2, "w", driver="JP2OpenJPEG", width=SIZE, height=SIZE, count=1, dtype="uint16",
                       crs="EPSG:32633", transform=Affine(10, 0, X0, 0, -10, Y0), QUALITY=100,
                       REVERSIBLE="YES") as ds:
        ds.write(data, 1)
    (scene / "bands" / "T33TVM_B03.tif").unlink()
    raw = jp2.read_bytes()
    jp2.write_bytes(raw[: len(raw) - 200])
    _assert_refused(scene_yaml(scene), InputError, str(jp2), "truncated")


def test_file_that_is_not_a_raster(scene: Path) -> None:
    victim = scene / "bands" / "T33TVM_B02.tif"
    victim.write_text("this is not a GeoTIFF")
    _assert_refused(scene_yaml(scene), InputError, str(victim), "cannot be opened as a raster")


def test_raster_without_crs(scene: Path) -> None:
    victim = scene / "bands" / "T33TVM_B03.tif"
    write_raster(victim, np.full((SIZE, SIZE), 1000, np.uint16), crs=None)
    _assert_refused(scene_yaml(scene), InputError, str(victim), "no CRS")


def test_dem_that_does_not_overlap(scene: Path) -> None:
    far = 500 + np.zeros((40, 40), np.float32)
    write_raster(scene / "dem.tif", far, crs="EPSG:4326", transform=Affine(0.001, 0, 140.0, 0, -0.001, 43.0))
    _assert_refused(scene_yaml(scene), GridError, str(scene / "dem.tif"), "DEM does not overlap the scene")


def test_aoi_outside_the_scene(scene: Path) -> None:
    config = scene_yaml(scene, aoi={"bbox": [10.0, 40.0, 10.1, 40.1], "crs": "EPSG:4326"})
    _assert_refused(config, GridError, "aoi.bbox [10.0, 40.0, 10.1, 40.1] (EPSG:4326)", "outside the scene")


def test_channel_the_inputs_cannot_supply(scene: Path) -> None:
    config = scene_yaml(scene, channels=["B02", "B08", "B8A", "DEM"])
    _assert_refused(config, ChannelError, "B08, B8A", "it has B02, B03, B04, SLOPE, DEM")


def test_unknown_and_repeated_channels(scene: Path) -> None:
    _assert_refused(scene_yaml(scene, channels=["B02", "NDVI"]), ChannelError, "unknown channel 'NDVI'")
    _assert_refused(scene_yaml(scene, channels=["B02", "b2"]), ChannelError, "B02 asked for twice")


def test_error_while_writing_leaves_no_partial_file(scene: Path) -> None:
    """A failure in the middle of the stream removes the temporary files; an old output survives."""
    config = scene_yaml(scene)
    cfg = load_scene_config(config)
    out = scene / "out" / "stack.tif"
    out.parent.mkdir()
    out.write_bytes(b"previous version")
    stack = stack_scene(cfg)
    calls = {"n": 0}
    original = stack.data.data

    def explode(block: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        raise InputError("simulated read failure")

    broken = stack.data.copy(data=original.map_blocks(explode, dtype=np.float32))
    broken_stack = type(stack)(data=broken, valid=stack.valid, grid=stack.grid, scene_id=stack.scene_id,
                               acquisition_date=stack.acquisition_date, product=stack.product)
    with pytest.raises(InputError, match="simulated"):
        save_stack(broken_stack, out)
    assert calls["n"] >= 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["stack.tif"]
    assert out.read_bytes() == b"previous version"


@pytest.mark.parametrize("make_bad", [
    lambda root: shutil.rmtree(root / "bands"),
    lambda root: [p.unlink() for p in (root / "bands").iterdir()],
], ids=["folder-missing", "folder-empty"])
def test_band_folder_missing_or_empty(scene: Path, make_bad: Callable[[Path], object]) -> None:
    make_bad(scene)
    _assert_refused(scene_yaml(scene), InputError, str(scene / "bands"), "scene.bands_dir")


def test_validate_warns_about_rules_the_bands_cannot_feed(scene: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """B08 is missing: the water and vegetation rules would be skipped by a run. Validate says so,
    naming the rule and the band, and still passes (the run itself works)."""
    config = scene_yaml(scene, postprocess={"max_mean_ndwi": 0.0, "max_mean_ndvi": 0.5, "min_mean_slope_deg": 10.0})
    assert _validate_cli(config) == 0
    err = capsys.readouterr().err
    assert "postprocess.max_mean_ndwi is set but the scene has no B08" in err
    assert "postprocess.max_mean_ndvi is set but the scene has no B08" in err
    assert "min_mean_slope_deg" not in err  # the slope comes from the DEM
    assert _validate_cli(scene_yaml(scene)) == 0
    assert "warning" not in capsys.readouterr().err

"""SAFE inputs are checked against the MD5 checksums their ``manifest.safe`` lists.

A flipped bit inside a band's JPEG 2000 codestream (the file's length and the
codestream's end marker intact) decodes without an error to wrong pixels: the
file checks of :func:`pipeline.io.raster_source.open_raster` cannot see it, only the
product's checksums can. The demo writer's manifest lists no checksums, so the
products here get theirs added the way ESA's manifests carry them
(``<byteStream size=...>`` with ``<checksum checksumName="MD5">``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import struct
from pathlib import Path

import dask
import numpy as np
import pytest
import rasterio
import yaml
from affine import Affine
from safe_builder import build_safe

from pipeline.cli.stack import add_stack_arguments, cli_stack
from pipeline.cli.validate import add_validate_arguments, cli_validate
from pipeline.core.config import load_scene_config
from pipeline.core.errors import InputError
from pipeline.io.safe_checksums import parse_manifest_checksums, verify_manifest_checksums
from pipeline.io.sentinel2 import read_scene
from pipeline.run.validate import validate_scene
from pipeline.stack.coarse import read_coarse
from pipeline.stack.layers import stack_scene

X0, Y0 = 465180.0, 5080260.0
SIZE = 64
CHANNELS = ["B02", "B03", "B04", "SLOPE", "DEM"]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def add_manifest_checksums(safe: Path, *, skip: tuple[str, ...] = ()) -> None:
    """Give every file the manifest names its size and upper-case MD5 (as ESA writes them), except
    files whose name contains one of ``skip``."""
    manifest = safe / "manifest.safe"

    def entry(m: re.Match[str]) -> str:
        space, href = m.group(1), m.group(2)
        if any(s in href for s in skip):
            return m.group(0)
        path = safe / href
        return (f'<byteStream mimeType="application/octet-stream" size="{path.stat().st_size}">{space}'
                f'<fileLocation locatorType="URL" href="{href}" />{space}'
                f'<checksum checksumName="MD5">{_md5(path).upper()}</checksum>')

    text, n = re.subn(r'<byteStream mimeType="application/octet-stream">(\s*)<fileLocation locatorType="URL" '
                      r'href="([^"]+)" />', entry, manifest.read_text())
    assert n > 0
    manifest.write_text(text)


def flip_codestream_byte(path: Path, where: float = 0.5) -> tuple[int, int]:
    """Flip one bit inside the JPEG 2000 codestream of ``path`` (between its headers and its end
    marker): box lengths and the end marker stay as they were. Returns (byte offset, old byte)."""
    data = bytearray(path.read_bytes())
    pos = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", bytes(data[pos:pos + 8]))
        if kind == b"jp2c":
            start, end = pos + 8, pos + length
            break
        pos += length
    else:  # pragma: no cover - the writer makes JP2 files
        raise AssertionError(f"{path}: no codestream box")
    at = start + int((end - start) * where)
    old = data[at]
    data[at] ^= 0x10
    assert data[end - 2:end] == b"\xff\xd9"
    path.write_bytes(bytes(data))
    return at, old


@pytest.fixture
def product(tmp_path: Path) -> Path:
    """A small L2A SAFE (B02, B03, B04, B8A at their resolutions, SCL), a DEM and a scene YAML; the
    manifest lists MD5 checksums. Returns the YAML."""
    rng = np.random.default_rng(7)
    t10 = Affine(10, 0, X0, 0, -10, Y0)
    t20 = Affine(20, 0, X0, 0, -20, Y0)
    bands = {b: (rng.integers(300, 3000, (SIZE, SIZE)).astype(np.uint16), t10, "EPSG:32633")
             for b in ("B02", "B03", "B04")}
    bands["B8A"] = (rng.integers(300, 3000, (SIZE // 2, SIZE // 2)).astype(np.uint16), t20, "EPSG:32633")
    scl = (np.full((SIZE // 2, SIZE // 2), 4, np.uint8), t20, "EPSG:32633")
    safe = build_safe(tmp_path, bands, scl=scl)
    add_manifest_checksums(safe)
    dem = 500 + np.add.outer(np.arange(SIZE + 10.0), np.arange(SIZE + 10.0)).astype(np.float32)
    with rasterio.open(tmp_path / "dem.tif", "w", driver="GTiff", width=SIZE + 10, height=SIZE + 10, count=1,
                       dtype="float32", crs="EPSG:32633", transform=Affine(10, 0, X0 - 50, 0, -10, Y0 + 50)) as ds:
        ds.write(dem, 1)
    return _config(tmp_path, safe)


def _config(root: Path, safe: Path, **scene: object) -> Path:
    data = {"scene": {"safe": safe.name, **scene}, "dem": {"path": "dem.tif"}, "channels": CHANNELS,
            "grid": {"block_size": 256}, "output": {"dir": "out"}}
    path = root / ("scene.yaml" if not scene else "scene_options.yaml")
    path.write_text(yaml.safe_dump(data))
    return path


def _safe(config: Path) -> Path:
    return next(config.parent.glob("*.SAFE"))


def _band(config: Path, band: str) -> Path:
    return next(_safe(config).rglob(f"*_{band}_*.jp2"))


def _pixels(config: Path) -> np.ndarray:
    stack = stack_scene(load_scene_config(config))
    with dask.config.set(scheduler="synchronous"):
        return np.asarray(stack.data.sel(band="B03").values)


def test_the_manifest_checksums_are_parsed(product: Path) -> None:
    listed = parse_manifest_checksums(_safe(product) / "manifest.safe")
    band = _band(product, "B03")
    key = band.relative_to(_safe(product)).as_posix()
    assert listed[key].algorithm == "MD5"
    assert listed[key].value == _md5(band)  # lower case, whatever the manifest's case
    assert listed[key].size == band.stat().st_size
    assert "MTD_MSIL2A.xml" in listed


def test_an_intact_product_is_verified_and_says_how_many_files(product: Path) -> None:
    stack = stack_scene(load_scene_config(product))
    check = stack.checksums
    assert check is not None and check.verified
    # MTD_MSIL2A.xml + B02, B03, B04 + SCL: the files this stack reads, not B8A (not asked for)
    assert check.files == 5 and check.algorithms == ("MD5",) and not check.unlisted
    assert check.bytes == sum(p.stat().st_size for p in [
        _safe(product) / "MTD_MSIL2A.xml", *(_band(product, b) for b in ("B02", "B03", "B04")),
        next(_safe(product).rglob("*_SCL_20m.jp2"))])
    assert check.as_dict()["verified"] is True and check.as_dict()["files"] == 5


def test_a_flipped_bit_in_a_band_codestream_is_an_error_naming_file_and_both_checksums(product: Path) -> None:
    band = _band(product, "B03")
    listed = _md5(band)
    flip_codestream_byte(band)
    computed = _md5(band)
    with pytest.raises(InputError) as err:
        stack_scene(load_scene_config(product))
    msg = str(err.value)
    assert str(band) in msg and "band B03" in msg
    assert listed in msg and computed in msg and "MD5" in msg
    assert "scene.verify_checksums" in msg  # how to skip the check


def test_without_the_check_the_flip_gives_wrong_pixels_silently(product: Path, tmp_path: Path) -> None:
    """The failure the check exists for: the damaged file opens and decodes without any error."""
    before = _pixels(product)
    flip_codestream_byte(_band(product, "B03"))
    unchecked = _config(tmp_path, _safe(product), verify_checksums=False)
    stack = stack_scene(load_scene_config(unchecked))
    assert stack.checksums is not None and not stack.checksums.verified
    assert "verify_checksums: false" in (stack.checksums.reason or "")
    after = _pixels(unchecked)
    assert np.isfinite(after).all()
    assert (after != before).any()  # wrong pixels, no error


def test_the_stack_command_exits_2_and_writes_nothing(product: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flip_codestream_byte(_band(product, "B02"))
    parser = argparse.ArgumentParser()
    add_stack_arguments(parser)
    assert cli_stack(parser.parse_args([str(product)])) == 2
    assert "does not match its checksum" in capsys.readouterr().err
    assert not (product.parent / "out").exists() or not any((product.parent / "out").iterdir())


def test_validate_finds_the_damage_as_the_run_would(product: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert validate_scene(load_scene_config(product)) == []
    band = _band(product, "B04")
    flip_codestream_byte(band)
    problems = validate_scene(load_scene_config(product))
    assert len(problems) == 1 and str(band) in problems[0] and "does not match its checksum" in problems[0]
    parser = argparse.ArgumentParser()
    add_validate_arguments(parser)
    assert cli_validate(parser.parse_args([str(product)])) == 2
    assert "band B04 does not match its checksum" in capsys.readouterr().err


def test_a_damaged_scl_is_found(product: Path) -> None:
    flip_codestream_byte(next(_safe(product).rglob("*_SCL_20m.jp2")))
    with pytest.raises(InputError, match="scene classification layer"):
        stack_scene(load_scene_config(product))


def test_changed_product_metadata_is_found(product: Path) -> None:
    """The offsets and quantification come from MTD_MSIL2A.xml: a changed digit there shifts every
    reflectance, so it is checked too."""
    mtd = _safe(product) / "MTD_MSIL2A.xml"
    text = mtd.read_text()
    assert ">-1000<" in text
    mtd.write_text(text.replace(">-1000<", ">-1001<", 1))
    with pytest.raises(InputError, match="product metadata"):
        stack_scene(load_scene_config(product))


def test_a_wrong_size_is_reported_before_hashing(product: Path) -> None:
    band = _band(product, "B04")
    with open(band, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(InputError, match=r"is \d+ bytes but manifest.safe lists \d+ bytes"):
        stack_scene(load_scene_config(product))


def test_only_the_files_the_run_reads_are_checked(product: Path) -> None:
    """B8A is in the product but not among the channels: its damage does not stop this stack."""
    flip_codestream_byte(_band(product, "B8A"))
    stack = stack_scene(load_scene_config(product))
    assert stack.checksums is not None and stack.checksums.verified and stack.checksums.files == 5
    with pytest.raises(InputError, match="B8A"):
        stack_scene(load_scene_config(product), ["B8A", "B02"])


def test_files_verified_once_are_not_hashed_again_unless_they_change(product: Path) -> None:
    cfg = load_scene_config(product)
    first = stack_scene(cfg).checksums
    again = stack_scene(cfg).checksums
    assert first is not None and again is not None
    assert first.hashed == 5 and again.hashed == 0 and again.verified and again.files == 5
    # the quicklook's decimated read checks the same files: nothing hashed again
    read_coarse(cfg, ["B04", "B03", "B02"], first_grid := stack_scene(cfg).grid, 4)
    band = _band(product, "B02")
    flip_codestream_byte(band)
    st = band.stat()
    os.utime(band, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a later modification time
    with pytest.raises(InputError, match="B02"):
        stack_scene(cfg)
    with pytest.raises(InputError, match="B02"):
        read_coarse(cfg, ["B02"], first_grid, 4)


def test_a_manifest_without_checksums_is_recorded_as_not_verified(tmp_path: Path) -> None:
    """The demo writer's manifests list none: the run goes on and says nothing was verified."""
    t10 = Affine(10, 0, X0, 0, -10, Y0)
    safe = build_safe(tmp_path, {"B02": (np.full((SIZE, SIZE), 1000, np.uint16), t10, "EPSG:32633")})
    scene = read_scene(load_scene_config(_config_minimal(tmp_path, safe)).scene, verify=["B02"])
    assert scene.checksums is not None and not scene.checksums.verified and scene.checksums.files == 0
    assert scene.checksums.reason


def test_files_the_manifest_does_not_list_are_reported(tmp_path: Path) -> None:
    safe = build_safe(tmp_path, {"B02": (np.full((SIZE, SIZE), 1000, np.uint16),
                                         Affine(10, 0, X0, 0, -10, Y0), "EPSG:32633")})
    add_manifest_checksums(safe, skip=("_B02_",))
    files = [(next(safe.rglob("*_B02_10m.jp2")), "band B02"), (safe / "MTD_MSIL2A.xml", "product metadata")]
    check = verify_manifest_checksums(safe / "manifest.safe", safe, files)
    assert not check.verified and check.files == 1 and len(check.unlisted) == 1
    assert "lists no checksum" in (check.reason or "")


def test_a_manifest_that_cannot_be_parsed_is_an_error(product: Path) -> None:
    (_safe(product) / "manifest.safe").write_text("<xfdu:XFDU")
    with pytest.raises(InputError, match="manifest"):
        stack_scene(load_scene_config(product))


def test_per_band_files_have_no_checksums(product: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bands"
    folder.mkdir()
    (folder / "B02.jp2").write_bytes(_band(product, "B02").read_bytes())
    path = tmp_path / "bands.yaml"
    path.write_text(yaml.safe_dump({"scene": {"bands_dir": "bands"}, "dem": {"path": "dem.tif"}}))
    scene = read_scene(load_scene_config(path).scene, verify=["B02"])
    assert scene.checksums is not None and not scene.checksums.verified
    assert "SAFE" in (scene.checksums.reason or "")


def test_the_option_is_not_part_of_the_run_fingerprint(product: Path) -> None:
    """Checking inputs does not change results: switching it off must not make a new run folder."""
    from pipeline.run.fingerprint import result_config

    on = load_scene_config(product)
    off = load_scene_config(_config(product.parent, _safe(product), verify_checksums=False))
    assert on.scene.verify_checksums and not off.scene.verify_checksums
    assert result_config(on) == result_config(off)


def _config_minimal(root: Path, safe: Path) -> Path:
    path = root / "minimal.yaml"
    path.write_text(yaml.safe_dump({"scene": {"safe": safe.name}, "dem": {"path": "dem.tif"}}))
    return path

"""Clouds of L1C scenes: s2cloudless on the stack's grid, averaged and grown in metres, block by block.

A synthetic L1C scene (bands at their native 10/20/60 m, top-of-atmosphere reflectance from the
class medians of pipeline/demo/spectra.py) holds two bright, flat, cold clouds across block seams
and two bright bare-soil landslides; the real scenes in ../shared/data are measured where present.
"""

from __future__ import annotations

import logging
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import yaml
from affine import Affine
from small_scene import X0, Y0, write_raster

from pipeline.core.channels import S2_BANDS
from pipeline.core.config import SceneConfig, load_scene_config
from pipeline.core.errors import ConfigError
from pipeline.demo.spectra import ATMOSPHERE, SPECTRA, SPECTRA_CLASSES
from pipeline.io.sentinel2 import read_scene
from pipeline.stack import clouds
from pipeline.stack.clouds import (
    AVERAGE_RADIUS_M,
    CLOUD_BANDS,
    COARSE_M,
    DILATION_RADIUS_M,
    cell_means,
    cloud_exclusion,
    cloud_mask,
    coarse_factor,
    footprints,
    grow_clouds,
    mask_from_codes,
    probability_codes,
    to_grid,
    use_detector,
)
from pipeline.stack.layers import stack_scene
from pipeline.stack.masks import scl_exclusion

pytest.importorskip("s2cloudless", reason="the cloud detector's package (pip install s2cloudless)")

SIZE = 528  # px at 10 m: 88 pixels of 60 m; blocks of 256 leave a 16 px strip, blocks of 512 too
#: A bright, flat, cold cloud at the top of the atmosphere: high in every band, B09 (water vapour)
#: and B10 (cirrus) included, SWIR a little lower.
CLOUD = {"B01": 0.50, "B02": 0.48, "B03": 0.47, "B04": 0.47, "B05": 0.48, "B06": 0.49, "B07": 0.50,
         "B08": 0.50, "B8A": 0.50, "B09": 0.22, "B10": 0.06, "B11": 0.36, "B12": 0.25}
#: (row, col, radius in px): one across the 256 px seams, one across the 512 px seam
CLOUDS = ((250, 270, 50), (505, 130, 30))
#: (rows, cols) of two landslides 120 m wide and 400 m long
SCARS = ((slice(380, 420), slice(380, 392)), (slice(60, 100), slice(420, 432)))


def toa(name: str, surface_gain: float = 1.0) -> dict[str, float]:
    """Top-of-atmosphere reflectance of class ``name`` with its surface reflectance times ``surface_gain``."""
    col = SPECTRA_CLASSES.index(name)
    return {b: ATMOSPHERE[b][0] + ATMOSPHERE[b][1] * SPECTRA[b][col] * surface_gain for b in SPECTRA}


def _paint(field: np.ndarray, where: np.ndarray, spectrum: dict[str, float], bands: list[str]) -> None:
    field[:, where] = np.array([spectrum[b] for b in bands], np.float32)[:, None]


def reflectance_field(size: int = SIZE) -> tuple[list[str], np.ndarray]:
    """(bands, 10 m TOA reflectance): forest and meadow, the clouds, a bright scar (its surface twice
    the median scar's) and a scar so bright at the top of the atmosphere (twice the median scar's
    TOA reflectance) that s2cloudless gives it a cloud probability above 0.4 per pixel."""
    bands = list(S2_BANDS)
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:size, :size]
    field = np.empty((len(bands), size, size), np.float32)
    meadow = (np.sin(yy / 23.0) + np.cos(xx / 31.0)) > 0.4
    _paint(field, ~meadow, toa("forest"), bands)
    _paint(field, meadow, toa("meadow"), bands)
    _paint(field, _mask(SCARS[0], size), toa("scar", 2.0), bands)
    _paint(field, _mask(SCARS[1], size), {b: 2 * v for b, v in toa("scar").items()}, bands)
    for r, c, rad in CLOUDS:
        _paint(field, (yy - r) ** 2 + (xx - c) ** 2 <= rad * rad, CLOUD, bands)
    field *= rng.normal(1.0, 0.03, field.shape).astype(np.float32)
    return bands, field


def _mask(rc: tuple[slice, slice], size: int) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[rc] = True
    return m


def write_l1c(root: Path, *, size: int = SIZE, skip: tuple[str, ...] = (), level: str | None = "L1C",
              scl: np.ndarray | None = None) -> Path:
    """Per-band GeoTIFFs at each band's native resolution (uint16 DN = reflectance x 10000) and a DEM."""
    bands, field = reflectance_field(size)
    (root / "bands").mkdir(parents=True)
    for band, refl in zip(bands, field, strict=True):
        if band in skip:
            continue
        f = S2_BANDS[band] // 10
        native = refl.reshape(size // f, f, size // f, f).mean(axis=(1, 3))
        dn = np.clip(np.rint(native * 10000), 1, 65535).astype(np.uint16)
        write_raster(root / "bands" / f"T33TVM_{band}.tif", dn, Affine(10 * f, 0, X0, 0, -10 * f, Y0), nodata=0)
    if scl is not None:
        write_raster(root / "bands" / "T33TVM_SCL.tif", scl.astype(np.uint8), Affine(20, 0, X0, 0, -20, Y0))
    dem = 500 + np.add.outer(np.arange(size + 10.0), np.arange(size + 10.0)).astype(np.float32)
    write_raster(root / "dem.tif", dem, Affine(10, 0, X0 - 50, 0, -10, Y0 + 50))
    scene: dict[str, object] = {"bands_dir": "bands", "nodata": 0}
    if level is not None:
        scene["level"] = level
    data = {"scene": scene, "dem": {"path": "dem.tif"}, "channels": ["B02", "B03", "B04", "B08"],
            "grid": {"block_size": 256}, "output": {"dir": "out"}}
    path = root / "scene.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def with_mask(cfg: SceneConfig, block: int | None = None, **mask: object) -> SceneConfig:
    update: dict[str, object] = {"mask": cfg.mask.model_copy(update=mask)}
    if block is not None:
        update["grid"] = cfg.grid.model_copy(update={"block_size": block})
    return cfg.model_copy(update=update)


def distance_to_clouds(size: int = SIZE) -> np.ndarray:
    """Distance in pixels from each pixel centre to the nearest cloud's edge (negative inside)."""
    yy, xx = np.mgrid[:size, :size]
    return np.min([np.hypot(yy - r, xx - c) - rad for r, c, rad in CLOUDS], axis=0)


@pytest.fixture(scope="module")
def l1c(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_l1c(tmp_path_factory.mktemp("l1c"))


@pytest.fixture(scope="module")
def masks_by_block(l1c: Path) -> dict[int, np.ndarray]:
    """The stack's ``mask`` (True: kept) of the L1C scene with blocks of 256 and 512 px."""
    cfg = load_scene_config(l1c)
    out = {}
    for block in (256, 512):
        stack = stack_scene(with_mask(cfg, block))
        assert stack.mask is not None and stack.mask.data.chunks[0][0] == block
        out[block] = stack.mask.values
    return out


# ---------------------------------------------------------------------------
# the synthetic scene
# ---------------------------------------------------------------------------
def test_clouds_are_masked_with_their_buffer(masks_by_block: dict[int, np.ndarray]) -> None:
    cloud = ~masks_by_block[256]
    dist = distance_to_clouds() * 10.0  # metres
    grown = DILATION_RADIUS_M + 40.0     # the detector's dilation + mask.cloud_buffer_m (default)
    assert cloud[dist <= grown - 10].all(), "a cloud or its buffer is not masked"
    # the averaging moves a sharp edge by a few pixels, a little more along the grid's edge (where the
    # disk is cut, only pixels inside count), and a cell is masked whole: nothing far beyond the buffer
    inner = np.zeros_like(cloud)
    edge = int(AVERAGE_RADIUS_M / 10)
    inner[edge:-edge, edge:-edge] = True
    assert not cloud[inner & (dist > grown + 0.2 * AVERAGE_RADIUS_M + COARSE_M)].any()
    assert not cloud[dist > grown + AVERAGE_RADIUS_M + COARSE_M].any()
    assert 0.05 < cloud.mean() < 0.1


def test_bright_landslides_are_not_masked(masks_by_block: dict[int, np.ndarray]) -> None:
    """A bright bare-soil scar and one bright enough for a per-pixel probability above 0.4: both
    narrower than the averaging disk, so neither is masked."""
    bands, field = reflectance_field()
    bright, brighter = (probability_codes(field[[bands.index(b) for b in CLOUD_BANDS]][(slice(None), *rc)])
                        for rc in SCARS)
    assert bright.max() < 200 and np.median(brighter) > 400  # what the detector says per pixel
    for rc in SCARS:
        assert masks_by_block[256][rc].all()


def test_the_cloud_mask_does_not_depend_on_the_block_size(masks_by_block: dict[int, np.ndarray]) -> None:
    np.testing.assert_array_equal(masks_by_block[256], masks_by_block[512])


def test_block_wise_mask_equals_the_whole_array() -> None:
    """Cells from the grid's origin and halos on blocks far smaller than the stack's, whole cells or
    not (many seams, a partial last cell, dask enlarging the smallest), and unknown pixels."""
    rng = np.random.default_rng(3)
    bands = rng.uniform(0.02, 0.2, (len(CLOUD_BANDS), 301, 283)).astype(np.float32)
    bands[:, 100:170, 50:150] = np.array([CLOUD[b] for b in CLOUD_BANDS], np.float32)[:, None, None]
    bands[:, rng.random(bands.shape[1:]) < 0.1] = np.nan   # unknown pixels
    bands[:, 200:230, 20:90] = np.nan                        # unknown cells
    whole = cloud_mask(bands, 10.0, 0.4, 40.0)
    assert 0.1 < whole.mean() < 0.5
    for chunks in ((64, 64), (100, 37), (60, 42), (301, 283)):
        lazy = cloud_exclusion(da.from_array(bands, chunks=(len(CLOUD_BANDS), *chunks)), 10.0, 0.4, 40.0, 128)
        assert lazy.chunks[0][0] == 128
        np.testing.assert_array_equal(lazy.compute(), whole)


def test_cells_are_means_of_the_known_pixels_from_the_origin() -> None:
    assert coarse_factor(10.0) == 6 and coarse_factor(20.0) == 3 and coarse_factor(60.0) == coarse_factor(100.0) == 1
    bands = np.arange(2 * 8 * 7, dtype=np.float32).reshape(2, 8, 7)
    bands[1, 0, 0] = np.nan                      # unknown in one band: the pixel does not count
    cells = cell_means(bands, 6)
    assert cells.shape == (2, 2, 2)
    np.testing.assert_allclose(cells[:, 1, 1], bands[:, 6:, 6:].mean(axis=(1, 2)))   # a partial cell
    np.testing.assert_allclose(cells[0, 0, 0], (bands[0, :6, :6].sum() - bands[0, 0, 0]) / 35)
    bands[:, :6, :6] = np.nan
    assert np.isnan(cell_means(bands, 6)[:, 0, 0]).all()
    np.testing.assert_array_equal(to_grid(np.array([[1, 2], [3, 4]]), 6, (8, 7))[[0, 7]][:, [5, 6]], [[1, 2], [3, 4]])


def _flat_cloud_mask(cloud_10m: np.ndarray, buffer_m: float = 40.0) -> np.ndarray:
    """The mask of a probability of 0.99 on ``cloud_10m`` and 0.02 elsewhere, each cell taking its
    pixels' mean probability (as the detector sees a cell's mean reflectance)."""
    codes = np.where(cloud_10m, 990.0, 20.0)[None]
    cells = np.rint(cell_means(codes.astype(np.float32), 6)[0]).astype(np.int16)
    average, grow = footprints(10.0, buffer_m, 6)
    return grow_clouds(to_grid(mask_from_codes(cells, average, None, 0.4), 6, cloud_10m.shape), grow)


def test_the_buffer_is_the_same_setting_as_for_scl_clouds() -> None:
    """A flat cloud disk: the mask reaches its edge plus 110 m plus ``mask.cloud_buffer_m``, give or
    take a cell."""
    yy, xx = np.mgrid[:240, :240]
    dist = np.hypot(yy - 120, xx - 120)
    cell = COARSE_M / 10
    for buffer_m in (0.0, 40.0, 200.0):
        reach = dist[_flat_cloud_mask(dist <= 40, buffer_m)].max()
        grown = 40 + (DILATION_RADIUS_M + buffer_m) / 10
        assert grown - cell <= reach <= grown + 1.5 * cell


def test_a_cloud_smaller_than_the_averaging_disk_is_not_masked() -> None:
    """The known miss: a cloud under about 280 m across is averaged away (as a bright scar is)."""
    yy, xx = np.mgrid[:120, :120]
    for radius_px, masked in ((10, False), (16, True)):
        assert _flat_cloud_mask(np.hypot(yy - 60, xx - 60) <= radius_px).any() == masked


def test_none_turns_the_detector_off(l1c: Path) -> None:
    cfg = with_mask(load_scene_config(l1c), cloud_detector="none")
    stack = stack_scene(cfg)
    mask, valid = dask.compute(stack.mask.data, stack.valid.data)
    assert mask.all() and valid.all()  # the DEM covers the scene; nothing else masks it


def test_the_probability_threshold_is_the_configured_one(tmp_path: Path) -> None:
    """Forest and meadow only: clear at 0.4, all cloud at a threshold below their probability."""
    cfg = load_scene_config(write_l1c(tmp_path, size=120))
    assert stack_scene(cfg).mask.values.all()
    assert not stack_scene(with_mask(cfg, cloud_probability=0.001)).mask.values.any()


# ---------------------------------------------------------------------------
# L2A scenes and the configuration
# ---------------------------------------------------------------------------
def test_l2a_scenes_use_their_scl_and_never_run_the_detector(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    size = 96
    scl = np.full((size // 2, size // 2), 4, np.uint8)   # vegetation
    scl[10:20, 10:20] = 9                                  # cloud, high probability
    scl[30:34, 30:40] = 3                                  # cloud shadow
    path = write_l1c(tmp_path, size=size, level="L2A", scl=scl)

    def no_detector(*args: object, **kwargs: object) -> None:
        raise AssertionError("s2cloudless ran on an L2A scene")

    monkeypatch.setattr(clouds, "probability_codes", no_detector)
    cfg = load_scene_config(path)
    auto = stack_scene(cfg).valid.values
    none = stack_scene(with_mask(cfg, cloud_detector="none")).valid.values
    np.testing.assert_array_equal(auto, none)
    scl10 = da.from_array(np.repeat(np.repeat(scl, 2, 0), 2, 1).astype(np.float32), chunks=64)
    expected = ~scl_exclusion(scl10, cfg.mask.excluded_scl_classes(), cfg.mask.buffered_scl_classes(), 4.0)
    np.testing.assert_array_equal(auto, expected.compute())
    with pytest.raises(ConfigError, match="L2A"):
        stack_scene(with_mask(cfg, cloud_detector="s2cloudless"))


def test_config_values_are_checked(tmp_path: Path) -> None:
    path = write_l1c(tmp_path, size=12)
    base = yaml.safe_load(path.read_text())
    for mask, field in (({"cloud_detector": "fmask"}, "cloud_detector"), ({"cloud_probability": 0}, "cloud_probability"),
                        ({"cloud_probability": 1.5}, "cloud_probability")):
        path.write_text(yaml.safe_dump({**base, "mask": mask}))
        with pytest.raises(ConfigError, match=f"mask.{field}"):
            load_scene_config(path)
    path.write_text(yaml.safe_dump(base))
    assert load_scene_config(path).mask.model_dump(include={"cloud_detector", "cloud_probability"}) == {
        "cloud_detector": "auto", "cloud_probability": 0.4}


def test_missing_bands_are_an_error_when_asked_for_and_a_warning_with_auto(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_l1c(tmp_path, size=60, skip=("B10",))
    cfg = load_scene_config(path)
    with pytest.raises(ConfigError, match=r"mask.cloud_detector: s2cloudless needs bands .* lacks B10"):
        stack_scene(with_mask(cfg, cloud_detector="s2cloudless"))
    with caplog.at_level(logging.WARNING, logger="pipeline.stack.clouds"):
        stack = stack_scene(cfg)
    assert "B10" in caplog.text and "NOT masked" in caplog.text
    assert stack.mask.values.all()


def test_validate_names_the_detectors_missing_bands(tmp_path: Path) -> None:
    """``validate`` reports what the run would refuse: s2cloudless asked for on a scene without B10."""
    from pipeline.run.validate import validate_scene

    cfg = load_scene_config(write_l1c(tmp_path, size=60, skip=("B10",)))
    assert not any("cloud_detector" in p for p in validate_scene(cfg, ["B04"]))
    problems = validate_scene(with_mask(cfg, cloud_detector="s2cloudless"), ["B04"])
    assert any("mask.cloud_detector: s2cloudless needs bands" in p and "lacks B10" in p for p in problems), problems


def test_auto_warns_when_the_level_is_unknown(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_l1c(tmp_path, size=60, level=None)
    with caplog.at_level(logging.WARNING, logger="pipeline.stack.clouds"):
        stack_scene(load_scene_config(path))
    assert "scene.level: L1C" in caplog.text


# ---------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------
def test_slovenia_l1c_is_cloud_free_and_keeps_its_bright_ground(shared_data: Path, tmp_path: Path) -> None:
    """The real Slovenia L1C crop holds no cloud; its bright bare ground (B11 about 0.26) stays."""
    root = shared_data / "scenes" / "slovenia_l1c"
    cfg = SceneConfig.model_validate({"scene": {"bands_dir": str(root), "level": "L1C"},
                                      "dem": {"path": str(root / "dem.tif")}, "channels": ["B04"]})
    with_detector = stack_scene(cfg).valid.values
    without = stack_scene(with_mask(cfg, cloud_detector="none")).valid.values
    assert without.sum() > 7000 and (without & ~with_detector).sum() < 0.01 * without.sum()


def test_virginia_l1c_lacks_the_10m_bands(shared_data: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The real Virginia L1C crop has no 10 m band: no cloud mask with auto (a warning), an error
    when s2cloudless is asked for."""
    root = shared_data / "scenes" / "virginia_18SVG_l1c"
    cfg = SceneConfig.model_validate({"scene": {"bands_dir": str(root), "level": "L1C"},
                                      "dem": {"path": str(root / "B12.tif")}})
    scene = read_scene(cfg.scene)
    with caplog.at_level(logging.WARNING, logger="pipeline.stack.clouds"):
        assert not use_detector(cfg.mask, scene, "L1C")
    assert "B02, B04, B08" in caplog.text and "NOT masked" in caplog.text
    with pytest.raises(ConfigError, match="lacks B02, B04, B08"):
        use_detector(with_mask(cfg, cloud_detector="s2cloudless").mask, scene, "L1C")


def test_landslide4sense_landslides_stay_and_its_cloud_is_masked(shared_data: Path) -> None:
    """The labelled L1C patches: no landslide pixel is masked; image_902's cumulus core is."""
    from pipeline.training.patch_files import find_patches
    from pipeline.training.patch_readers import read_image, read_mask

    for rec in find_patches(shared_data / "l4s" / "train", require_masks=True):
        patch = read_image(rec.image)
        ch = list(patch.channels)  # no B8A in these patches: B08 stands in
        x = np.stack([patch.image[ch.index("B08" if b == "B8A" else b)] for b in CLOUD_BANDS]).astype(np.float32)
        masked = cloud_mask(x, 10.0, 0.4, 40.0)
        assert rec.mask is not None
        assert not (masked & (read_mask(rec.mask)[0] == 1)).any(), rec.image.name
        if rec.image.name == "image_902.h5":
            assert masked[110:, 110:].all() and not masked[:64].any()

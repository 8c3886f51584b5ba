"""Training patch readers, channel selection, augmentation and data checksum."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio
from affine import Affine

from pipeline.channels import L4S_CHANNELS
from pipeline.datasets import (
    AugmentConfig,
    PatchDataset,
    augment,
    channel_indices,
    data_checksum,
    find_patches,
    load_patch,
    read_image,
)
from pipeline.errors import ChannelError, InputError
from pipeline.normalization import normalize

RGB_TERRAIN = ["B02", "B03", "B04", "SLOPE", "DEM"]


def _write_h5(folder: Path, n: int, rng: np.random.Generator, with_mask: bool = True) -> None:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    if with_mask:
        (folder / "mask").mkdir(parents=True, exist_ok=True)
    img = rng.random((128, 128, 14)) + 0.5
    with h5py.File(folder / "img" / f"image_{n}.h5", "w") as h5:
        h5["img"] = img
    if with_mask:
        with h5py.File(folder / "mask" / f"mask_{n}.h5", "w") as h5:
            h5["mask"] = (rng.random((128, 128)) > 0.9).astype(np.uint8)


def test_flat_folder_pairs_images_and_masks_in_natural_order(shared_data: Path) -> None:
    records = find_patches(shared_data / "l4s" / "train", require_masks=True)
    assert len(records) == 15
    ids = [int(r.id) for r in records]
    assert ids == sorted(ids)
    for r in records:
        assert r.image.name == f"image_{r.id}.h5"
        assert r.mask is not None and r.mask.name == f"mask_{r.id}.h5"


def test_unlabelled_folder_has_no_masks_and_is_refused_for_training(shared_data: Path) -> None:
    records = find_patches(shared_data / "l4s" / "unlabeled")
    assert len(records) == 14 and all(r.mask is None for r in records)
    with pytest.raises(InputError, match="no mask"):
        find_patches(shared_data / "l4s" / "unlabeled", require_masks=True)


def test_landslide4sense_split_layout_is_read_unchanged(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 10):
        _write_h5(tmp_path / "TrainData", n, rng)
    _write_h5(tmp_path / "ValidData", 7, rng)
    _write_h5(tmp_path / "TestData", 3, rng, with_mask=False)
    train = find_patches(tmp_path, "train", require_masks=True)
    assert [r.id for r in train] == ["1", "2", "10"]
    assert [r.id for r in find_patches(tmp_path, "valid")] == ["7"]
    assert find_patches(tmp_path, "test")[0].mask is None
    # without a split the training folder is used
    assert [r.id for r in find_patches(tmp_path)] == ["1", "2", "10"]
    with pytest.raises(InputError, match="ValidData|nothere"):
        find_patches(tmp_path / "TrainData", "nothere")


def test_channel_subset_by_name_matches_the_hdf5_columns(shared_data: Path) -> None:
    rec = find_patches(shared_data / "l4s" / "train")[0]
    with h5py.File(rec.image) as h5:
        raw = h5["img"][()]
    patch = load_patch(rec, ["b2", "B3", "B04", "slope", "DEM"])
    assert patch.channels == tuple(RGB_TERRAIN)
    for k, name in enumerate(RGB_TERRAIN):
        np.testing.assert_allclose(patch.image[k], raw[..., L4S_CHANNELS.index(name)].astype(np.float32))
    assert patch.mask is not None and patch.mask.dtype == np.uint8 and set(np.unique(patch.mask)) <= {0, 1}
    assert channel_indices(L4S_CHANNELS, ["B13", "B14"]) == [12, 13]
    with pytest.raises(ChannelError, match="B8A"):
        load_patch(rec, ["B8A"])


def _write_tif(path: Path, data: np.ndarray, descriptions: list[str] | None, nodata: float | None) -> None:
    profile = {
        "driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": data.shape[0],
        "dtype": data.dtype.name, "crs": "EPSG:32633", "transform": Affine(10, 0, 500000, 0, -10, 5000000),
        "nodata": nodata,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if descriptions:
            for i, d in enumerate(descriptions, start=1):
                dst.set_band_description(i, d)


def test_geotiff_chips_with_band_names_and_nodata(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    data = np.full((5, 64, 64), 100.0, dtype=np.float32)
    data[:, 0, 0] = -9999.0
    data[0] = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    data[0, 0, 0] = -9999.0
    # bands stored in a different order than requested
    _write_tif(tmp_path / "images" / "chip_a.tif", data, ["DEM", "B04", "B03", "B02", "SLOPE"], -9999.0)
    mask = np.zeros((1, 64, 64), np.uint8)
    mask[0, 10:20, 10:20] = 255
    _write_tif(tmp_path / "masks" / "chip_a.tif", mask, None, None)
    records = find_patches(tmp_path, require_masks=True)
    assert len(records) == 1 and records[0].id == "chip_a"
    patch = load_patch(records[0], ["B02", "DEM"])
    assert patch.channels == ("B02", "DEM")
    np.testing.assert_array_equal(patch.image[1, 1:, 1:], data[0, 1:, 1:])
    assert not patch.valid[0, 0] and patch.valid[1:, 1:].all()
    assert patch.mask is not None and patch.mask.sum() == 100 and patch.mask.max() == 1


def test_unnamed_geotiff_bands_need_source_channels(tmp_path: Path) -> None:
    path = tmp_path / "x.tif"
    _write_tif(path, np.ones((3, 32, 32), np.float32), None, None)
    with pytest.raises(ChannelError, match="source_channels"):
        read_image(path)
    assert read_image(path, ["B04", "B03", "B02"]).channels == ("B04", "B03", "B02")


def test_checksum_follows_contents_not_location_or_order(shared_data: Path, tmp_path: Path) -> None:
    records = find_patches(shared_data / "l4s" / "train")[:3]
    first = data_checksum(records)
    assert first == data_checksum(list(reversed(records)))
    for r in records:
        for p in (r.image, r.mask):
            assert p is not None
            dst = tmp_path / p.parent.name / p.name
            dst.parent.mkdir(exist_ok=True)
            shutil.copy(p, dst)
    copied = find_patches(tmp_path)
    assert data_checksum(copied) == first
    with h5py.File(copied[0].mask, "r+") as h5:  # type: ignore[arg-type]
        h5["mask"][0, 0] = 1 - h5["mask"][0, 0]
    assert data_checksum(copied) != first
    assert data_checksum(records[:2]) != first


def test_augmentation_keeps_image_and_mask_aligned() -> None:
    rng = np.random.default_rng(0)
    mask = (rng.random((32, 32)) > 0.7).astype(np.uint8)
    image = np.stack([mask.astype(np.float32), np.arange(32 * 32, dtype=np.float32).reshape(32, 32)])
    valid = np.ones((32, 32), bool)
    valid[0, :5] = False
    cfg = AugmentConfig(hflip=True, vflip=True, rot90=True, noise_std=0.0)
    seen = set()
    for seed in range(12):
        img, m, v = augment(image, mask, valid, cfg, np.random.default_rng(seed))
        np.testing.assert_array_equal(img[0], m.astype(np.float32))
        assert v.sum() == valid.sum()
        seen.add(img[1].tobytes())
    assert len(seen) > 4  # flips and rotations actually vary


def test_noise_only_touches_valid_pixels() -> None:
    image = np.zeros((2, 16, 16), np.float32)
    valid = np.ones((16, 16), bool)
    valid[:4] = False
    cfg = AugmentConfig(hflip=False, vflip=False, rot90=False, noise_std=0.1)
    img, _, _ = augment(image, np.zeros((16, 16), np.uint8), valid, cfg, np.random.default_rng(1))
    assert (img[:, :4] == 0).all()
    assert 0.05 < img[:, 4:].std() < 0.15


def test_dataset_items_are_normalized_and_augmentation_is_reproducible(shared_data: Path) -> None:
    records = find_patches(shared_data / "l4s" / "train")[:2]
    spec = {"method": "patch_robust"}
    plain = PatchDataset(records, RGB_TERRAIN, spec)
    raw = plain.raw(0)
    expected = normalize(raw.image[None], raw.valid[None], spec)[0]
    np.testing.assert_allclose(plain[0]["image"].numpy(), expected, rtol=0, atol=1e-6)
    assert plain[0]["mask"].shape == (1, 128, 128)

    aug = AugmentConfig(noise_std=0.05)
    a = PatchDataset(records, RGB_TERRAIN, spec, augment=aug, seed=3)
    b = PatchDataset(records, RGB_TERRAIN, spec, augment=aug, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert np.array_equal(a[1]["image"].numpy(), b[1]["image"].numpy())
    b.set_epoch(3)
    assert not np.array_equal(a[1]["image"].numpy(), b[1]["image"].numpy())
    pos, neg = plain.label_counts()
    assert pos + neg == 2 * 128 * 128 and pos == sum(int(plain[i]["mask"].sum()) for i in range(2))

"""Training patch readers, channel selection, augmentation and data checksum."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio
from affine import Affine

from pipeline.core.channels import L4S_CHANNELS, L4S_DIVISOR, S2_BANDS, physical_factors
from pipeline.core.errors import ChannelError, InputError
from pipeline.model.normalization import normalize, validate_spec
from pipeline.training.augmentation import Augmentation, AugmentConfig, augment
from pipeline.training.datasets import PatchDataset
from pipeline.training.patch_files import data_checksum, find_patches
from pipeline.training.patch_readers import channel_indices, load_patch, read_image

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
    factors = physical_factors(L4S_CHANNELS, "l4s")
    for k, name in enumerate(RGB_TERRAIN):
        column = L4S_CHANNELS.index(name)
        # the column of that channel, in physical units (its own factor, not a neighbour's)
        np.testing.assert_allclose(patch.image[k], raw[..., column] * factors[column], rtol=1e-6)
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
    data = np.full((5, 64, 64), 0.1, dtype=np.float32)  # reflectance (physical units, the default)
    data[4] = 12.0  # SLOPE, degrees
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
    np.testing.assert_array_equal(patch.image[0, 1:, 1:], data[3, 1:, 1:])
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
    # fixed statistics in physical units (reflectance, degrees, metres), used as given
    spec = {"method": "fixed", "mean": [0.1, 0.1, 0.1, 10.0, 1000.0], "std": [0.05, 0.05, 0.05, 8.0, 500.0],
            "clip": 10.0}
    plain = PatchDataset(records, RGB_TERRAIN, spec)
    assert plain.normalization == validate_spec(spec) and plain.stats is None
    raw = plain.raw(0)
    expected = normalize(raw.image[None], raw.valid[None], spec)[0]
    np.testing.assert_allclose(plain[0]["image"].numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(plain[0]["image"].numpy()[4], np.clip((raw.image[4] - 1000.0) / 500.0, -10, 10),
                               rtol=1e-6, atol=1e-6)
    assert plain[0]["mask"].shape == (1, 128, 128)

    aug = AugmentConfig(noise_std=0.05)
    a = PatchDataset(records, RGB_TERRAIN, spec, Augmentation(augment=aug), seed=3)
    b = PatchDataset(records, RGB_TERRAIN, spec, Augmentation(augment=aug), seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert np.array_equal(a[1]["image"].numpy(), b[1]["image"].numpy())
    b.set_epoch(3)
    assert not np.array_equal(a[1]["image"].numpy(), b[1]["image"].numpy())
    pos, neg = plain.label_counts()
    assert pos + neg == 2 * 128 * 128 and pos == sum(int(plain[i]["mask"].sum()) for i in range(2))


def test_a_training_spec_takes_its_statistics_from_the_patches(shared_data: Path) -> None:
    """``{"method": "fixed"}`` without mean/std: the median and IQR of the dataset's own valid
    pixels (physical units) become its statistics; a subset resolves on its own patches."""
    records = find_patches(shared_data / "l4s" / "train")[:3]
    ds = PatchDataset(records, RGB_TERRAIN, {"method": "fixed", "clip": 5.0})
    pixels = np.concatenate([ds.raw(i).image[:, ds.raw(i).valid] for i in range(3)], axis=1)
    q25, q50, q75 = np.percentile(pixels, [25, 50, 75], axis=1)
    assert ds.stats is not None and ds.stats.n_pixels == 3 * 128 * 128
    assert ds.normalization["method"] == "fixed" and ds.normalization["clip"] == 5.0
    np.testing.assert_allclose(ds.normalization["mean"], q50, rtol=1e-6)
    np.testing.assert_allclose(ds.normalization["std"], q75 - q25, rtol=1e-5)
    assert "3 training patches" in str(ds.normalization["source"])
    assert 0.0 < ds.normalization["mean"][0] < 1.0  # B02 as reflectance
    raw = ds.raw(1)
    np.testing.assert_allclose(ds[1]["image"].numpy(), normalize(raw.image[None], raw.valid[None], ds.normalization)[0],
                               atol=1e-6)
    # a subset keeps the parent's resolved spec, or resolves an unresolved one on its own patches
    assert ds.subset([0]).normalization == ds.normalization
    own = ds.subset([0], normalization={"method": "fixed", "clip": 5.0})
    np.testing.assert_allclose(own.normalization["mean"], np.median(ds.raw(0).image[:, ds.raw(0).valid], axis=1),
                               rtol=1e-6)
    assert own.normalization["mean"] != ds.normalization["mean"]


def test_landslide4sense_patches_are_read_in_physical_units(shared_data: Path) -> None:
    """The published divisors undo the Landslide4Sense scaling exactly: every stored value times its
    channel's divisor is an integer (Sentinel-2 L1C digital numbers, degrees, metres), and
    read_image returns those integers / 10000 for the bands (reflectance) and as they are for
    SLOPE and DEM."""
    divisor = np.asarray(L4S_DIVISOR, np.float64)
    quantification = np.array([1e4 if c in S2_BANDS else 1.0 for c in L4S_CHANNELS])
    records = find_patches(shared_data / "l4s" / "train") + find_patches(shared_data / "l4s" / "unlabeled")
    assert len(records) == 29
    for rec in records:
        with h5py.File(rec.image) as h5:
            raw = np.asarray(h5["img"][()], np.float64)
        original = raw * divisor
        np.testing.assert_allclose(original, np.round(original), rtol=0, atol=1e-9, err_msg=rec.image.name)
        patch = read_image(rec.image)
        assert patch.image.dtype == np.float32 and patch.channels == L4S_CHANNELS
        expected = np.moveaxis(np.round(original), -1, 0) / quantification[:, None, None]
        np.testing.assert_allclose(patch.image, expected, rtol=1e-6, atol=0, err_msg=rec.image.name)
        reflectance = patch.image[[L4S_CHANNELS.index(b) for b in S2_BANDS if b in L4S_CHANNELS]]
        assert reflectance.min() >= 0 and np.median(reflectance) < 0.5


def test_geotiff_chips_of_digital_numbers_need_declared_units(tmp_path: Path) -> None:
    """A chip whose bands hold digital numbers (reflectance x 10000) is refused unless it says so
    (``units="dn"`` or a UNITS tag), rather than fed to a model as reflectance of 1000."""
    rng = np.random.default_rng(0)
    dn = np.concatenate([rng.integers(200, 3000, (3, 32, 32)), np.full((1, 32, 32), 25), np.full((1, 32, 32), 900)])
    dn = dn.astype(np.float32)
    path = tmp_path / "chip.tif"
    _write_tif(path, dn, RGB_TERRAIN, None)
    with pytest.raises(ChannelError, match=r"median .* units .*data\.units: dn"):
        read_image(path)
    patch = read_image(path, units="dn")
    np.testing.assert_allclose(patch.image[:3], dn[:3] / 10000, rtol=1e-6)
    np.testing.assert_array_equal(patch.image[3:], dn[3:])  # degrees and metres unchanged
    # the same from the file's own UNITS tag
    with rasterio.open(path, "r+") as dst:
        dst.update_tags(UNITS="dn")
    np.testing.assert_allclose(read_image(path).image, patch.image)
    with pytest.raises(ChannelError, match="unknown units"):
        read_image(path, units="percent")

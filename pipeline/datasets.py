"""Training patches: readers, channel selection, augmentation, checksum.

Two on-disk layouts are read unchanged:

* Landslide4Sense HDF5 patches: ``<root>/TrainData/img/image_N.h5`` with
  ``<root>/TrainData/mask/mask_N.h5`` (and ``ValidData``, ``TestData``), or a
  flat folder ``<root>/img`` + ``<root>/mask``. Dataset ``img`` is float64
  (128, 128, 14) band-last in :data:`pipeline.channels.L4S_CHANNELS` order,
  ``mask`` is uint8 (128, 128) in {0, 1}.
* GeoTIFF chip folders: ``<root>/img`` (or ``images``) + ``<root>/mask`` (or
  ``masks``, ``labels``) holding ``*.tif``. Images are band-first; channel
  names come from the band descriptions (``B02``, ``SLOPE``...), from
  ``source_channels``, or are the Landslide4Sense order for 14 bands. Pixels
  that are nodata or non-finite in any band are invalid.

Images and masks are paired by the part of the file name after the prefix
(``image_12.h5`` <-> ``mask_12.h5``, ``chip_a.tif`` <-> ``chip_a.tif``).

:class:`PatchDataset` yields normalized patches (through
:func:`pipeline.normalization.normalize`, the one place normalization lives),
then augments them (flips, 90-degree rotations, Gaussian noise in normalized
units). Augmentation draws from a generator seeded by (seed, epoch, index), so
a run is reproducible whatever the number of loader workers.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from .channels import L4S_CHANNELS, canonical
from .errors import ChannelError, InputError
from .normalization import BandStats, band_stats, needs_population, resolve_spec

log = logging.getLogger(__name__)

#: Split names accepted for the Landslide4Sense layout and their folders.
SPLIT_DIRS: dict[str, str] = {
    "train": "TrainData",
    "valid": "ValidData",
    "validation": "ValidData",
    "test": "TestData",
}
IMAGE_DIRS = ("img", "image", "images")
MASK_DIRS = ("mask", "masks", "label", "labels")
H5_SUFFIXES = (".h5", ".hdf5")
TIF_SUFFIXES = (".tif", ".tiff")
_PREFIX = re.compile(r"^(image|img|mask|label|labels)[_-]?", re.IGNORECASE)


@dataclass(frozen=True)
class PatchRecord:
    """One patch on disk: an image file and, when labelled, its mask file."""

    id: str
    image: Path
    mask: Path | None = None


@dataclass(frozen=True)
class Patch:
    """One patch in memory (raw values, before normalization)."""

    image: np.ndarray  # (C, H, W) float32, in the order of ``channels``
    valid: np.ndarray  # (H, W) bool
    mask: np.ndarray | None  # (H, W) uint8 in {0, 1}
    channels: tuple[str, ...]


class AugmentConfig(BaseModel):
    """Training-time augmentation (applied after normalization)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hflip: bool = Field(True, description="random left-right flip (p=0.5)")
    vflip: bool = Field(True, description="random up-down flip (p=0.5)")
    rot90: bool = Field(True, description="random rotation by k*90 degrees")
    noise_std: float = Field(0.0, ge=0, description="std of additive Gaussian noise, normalized units")

    @property
    def enabled(self) -> bool:
        return self.hflip or self.vflip or self.rot90 or self.noise_std > 0


NO_AUGMENT = AugmentConfig(hflip=False, vflip=False, rot90=False, noise_std=0.0)


# --------------------------------------------------------------------------
# Finding files
# --------------------------------------------------------------------------
def _key(path: Path) -> str:
    return _PREFIX.sub("", path.stem)


def _natural(text: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _first_dir(root: Path, names: Iterable[str]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def _patch_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in H5_SUFFIXES + TIF_SUFFIXES]


def find_patches(root: Path | str, split: str | None = None, require_masks: bool = False) -> list[PatchRecord]:
    """List the patches under ``root``, sorted naturally by id.

    ``root`` is a Landslide4Sense root (holding ``TrainData``...; ``split``
    picks the folder, default ``train``) or a folder with ``img``/``mask``
    sub-folders. ``split`` may also name a sub-folder directly. With
    ``require_masks`` every image must have a mask.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: patch folder not found")
    folder = root
    if split is not None:
        sub = SPLIT_DIRS.get(split.lower(), split)
        if not (root / sub).is_dir():
            raise InputError(
                f"{root}: split {split!r} expects the folder {root / sub} "
                f"(Landslide4Sense layout: {', '.join(sorted(set(SPLIT_DIRS.values())))})"
            )
        folder = root / sub
    elif _first_dir(root, IMAGE_DIRS) is None and (root / "TrainData").is_dir():
        folder = root / "TrainData"
    img_dir = _first_dir(folder, IMAGE_DIRS)
    if img_dir is None:
        raise InputError(
            f"{folder}: no image folder; expected one of {', '.join(IMAGE_DIRS)} "
            "(Landslide4Sense: TrainData/img/image_N.h5 + TrainData/mask/mask_N.h5)"
        )
    images = _patch_files(img_dir)
    if not images:
        raise InputError(f"{img_dir}: no .h5/.hdf5/.tif/.tiff patch files")
    mask_dir = _first_dir(folder, MASK_DIRS)
    masks: dict[str, Path] = {}
    if mask_dir is not None:
        for p in _patch_files(mask_dir):
            k = _key(p)
            if k in masks:
                raise InputError(f"{mask_dir}: two masks for patch {k!r}: {masks[k].name}, {p.name}")
            masks[k] = p
    records: list[PatchRecord] = []
    seen: dict[str, Path] = {}
    for img in images:
        k = _key(img)
        if k in seen:
            raise InputError(f"{img_dir}: two images for patch {k!r}: {seen[k].name}, {img.name}")
        seen[k] = img
        mask = masks.get(k)
        if mask is None and require_masks:
            raise InputError(
                f"{img}: no mask for patch {k!r} in {mask_dir or folder / 'mask'} "
                f"(expected e.g. mask_{k}{img.suffix})"
            )
        if mask is None and masks:
            log.warning("%s: no mask for patch %r", img, k)
        records.append(PatchRecord(id=k, image=img, mask=mask))
    records.sort(key=lambda r: _natural(r.id))
    return records


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------
def _canonical_list(names: Sequence[str], where: str) -> tuple[str, ...]:
    try:
        out = tuple(canonical(n) for n in names)
    except ValueError as exc:
        raise ChannelError(f"{where}: {exc}") from None
    if len(set(out)) != len(out):
        raise ChannelError(f"{where}: channel names repeat: {list(out)}")
    return out


def _h5_dataset(h5: object, path: Path, preferred: str) -> np.ndarray:
    import h5py

    assert isinstance(h5, h5py.File)
    if preferred in h5:
        return np.asarray(h5[preferred][()])
    datasets = [k for k in h5 if isinstance(h5[k], h5py.Dataset)]
    if len(datasets) == 1:
        return np.asarray(h5[datasets[0]][()])
    raise InputError(f"{path}: HDF5 dataset {preferred!r} not found (has {datasets})")


def read_image(path: Path, source_channels: Sequence[str] | None = None) -> Patch:
    """Read one image patch as (C, H, W) float32 with its channel names and valid mask."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in H5_SUFFIXES:
            import h5py

            with h5py.File(path, "r") as h5:
                arr = _h5_dataset(h5, path, "img")
            if arr.ndim != 3:
                raise InputError(f"{path}: img must be (H, W, C) band-last, got shape {arr.shape}")
            image = np.ascontiguousarray(np.moveaxis(arr, -1, 0), dtype=np.float32)
            valid = np.ones(image.shape[1:], dtype=bool)
            descriptions: tuple[str | None, ...] = (None,) * image.shape[0]
        elif suffix in TIF_SUFFIXES:
            import rasterio

            with rasterio.open(path) as src:
                image = src.read(out_dtype="float32")
                valid = src.dataset_mask() > 0
                descriptions = tuple(src.descriptions)
        else:
            raise InputError(f"{path}: unsupported patch format (expected .h5/.hdf5/.tif/.tiff)")
    except (OSError, KeyError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path}: cannot read patch: {exc}") from None
    count = image.shape[0]
    if source_channels is not None:
        names = _canonical_list(source_channels, f"{path}: source_channels")
    elif all(descriptions):
        names = _canonical_list([str(d) for d in descriptions], f"{path}: band descriptions")
    elif count == len(L4S_CHANNELS):
        names = L4S_CHANNELS
    else:
        raise ChannelError(
            f"{path}: {count} bands without names; give data.source_channels "
            f"(the Landslide4Sense order {', '.join(L4S_CHANNELS)} is assumed only for 14 bands)"
        )
    if len(names) != count:
        raise ChannelError(f"{path}: {count} bands but {len(names)} channel names {list(names)}")
    valid &= np.isfinite(image).all(axis=0)
    return Patch(image=image, valid=valid, mask=None, channels=names)


def read_mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a mask patch: (labels uint8 in {0, 1}, valid bool). Non-zero is landslide."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in H5_SUFFIXES:
            import h5py

            with h5py.File(path, "r") as h5:
                arr = _h5_dataset(h5, path, "mask")
            valid = np.ones(arr.shape[-2:], dtype=bool)
        elif suffix in TIF_SUFFIXES:
            import rasterio

            with rasterio.open(path) as src:
                arr = src.read(1)
                valid = src.read_masks(1) > 0
        else:
            raise InputError(f"{path}: unsupported mask format (expected .h5/.hdf5/.tif/.tiff)")
    except (OSError, KeyError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path}: cannot read mask: {exc}") from None
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise InputError(f"{path}: mask must be (H, W), got shape {arr.shape}")
    return (arr > 0).astype(np.uint8), valid


def channel_indices(available: Sequence[str], wanted: Sequence[str]) -> list[int]:
    """Indices of ``wanted`` channels (any spelling: ``B2``, ``slope``) in ``available``."""
    avail = [canonical(a) for a in available]
    out = []
    for name in _canonical_list(wanted, "channels"):
        if name not in avail:
            raise ChannelError(
                f"channel {name} is not in the patches (they hold {', '.join(avail)})"
            )
        out.append(avail.index(name))
    return out


def load_patch(
    record: PatchRecord,
    channels: Sequence[str] | None = None,
    source_channels: Sequence[str] | None = None,
) -> Patch:
    """Read a patch with its mask, keeping ``channels`` (default: all) in that order."""
    patch = read_image(record.image, source_channels)
    image, names = patch.image, patch.channels
    if channels is not None:
        idx = channel_indices(names, channels)
        image = image[idx]
        names = tuple(names[i] for i in idx)
    valid = patch.valid
    mask = None
    if record.mask is not None:
        mask, mask_valid = read_mask(record.mask)
        if mask.shape != image.shape[1:]:
            raise InputError(
                f"{record.mask}: mask shape {mask.shape} differs from image {record.image} {image.shape[1:]}"
            )
        valid = valid & mask_valid
    return Patch(image=np.ascontiguousarray(image), valid=valid, mask=mask, channels=names)


# --------------------------------------------------------------------------
# Checksum
# --------------------------------------------------------------------------
def data_checksum(records: Iterable[PatchRecord]) -> str:
    """SHA-256 over the contents of every image and mask file, sorted by file name."""
    files: set[Path] = set()
    for r in records:
        files.add(Path(r.image))
        if r.mask is not None:
            files.add(Path(r.mask))
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: (p.name, str(p))):
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------
def augment(
    image: np.ndarray,
    mask: np.ndarray,
    valid: np.ndarray,
    cfg: AugmentConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply the same random flips/rotation to image (C,H,W), mask and valid (H,W); noise to image."""
    if cfg.hflip and rng.random() < 0.5:
        image, mask, valid = image[..., ::-1], mask[..., ::-1], valid[..., ::-1]
    if cfg.vflip and rng.random() < 0.5:
        image, mask, valid = image[..., ::-1, :], mask[..., ::-1, :], valid[..., ::-1, :]
    if cfg.rot90:
        k = int(rng.integers(4))
        if k:
            image = np.rot90(image, k, axes=(-2, -1))
            mask = np.rot90(mask, k, axes=(-2, -1))
            valid = np.rot90(valid, k, axes=(-2, -1))
    image = np.ascontiguousarray(image, dtype=np.float32)
    if cfg.noise_std > 0:
        noise = rng.normal(0.0, cfg.noise_std, size=image.shape).astype(np.float32)
        image = image + noise * valid[None]
    return image, np.ascontiguousarray(mask), np.ascontiguousarray(valid)


# --------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------
def normalize_patch(image: np.ndarray, valid: np.ndarray, spec: dict[str, object]) -> np.ndarray:
    """Normalize one (C, H, W) patch with :func:`pipeline.normalization.normalize`."""
    from .normalization import normalize

    out = normalize(image[None].astype(np.float32, copy=False), valid[None], spec)
    return np.asarray(out[0], dtype=np.float32)


class PatchDataset(Dataset):  # type: ignore[type-arg]
    """Normalized (and optionally augmented) patches for training and evaluation.

    Items are dicts of tensors: ``image`` (C, H, W) float32, ``mask`` (1, H, W)
    float32 (zeros when unlabelled), ``valid`` (1, H, W) bool, ``index`` int.
    """

    def __init__(
        self,
        records: Sequence[PatchRecord],
        channels: Sequence[str],
        normalization: dict[str, object],
        augment: AugmentConfig | None = None,
        source_channels: Sequence[str] | None = None,
        seed: int = 0,
        cache: bool = True,
        require_masks: bool = True,
        stats: BandStats | None = None,
    ) -> None:
        if not records:
            raise InputError("no patches given")
        self.records = list(records)
        self.channels = _canonical_list(channels, "channels")
        self.normalization = dict(normalization)
        self.augment = augment or NO_AUGMENT
        self.source_channels = tuple(source_channels) if source_channels else None
        self.seed = int(seed)
        self.epoch = 0
        self.cache = cache
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        if require_masks:
            missing = [r.image for r in self.records if r.mask is None]
            if missing:
                raise InputError(f"{missing[0]}: patch has no mask ({len(missing)} of {len(self.records)} lack one)")
        # scene_robust: the statistics of the population (given, or this patch set's own,
        # computed here before any data-loader worker forks)
        self.stats = None
        if needs_population(self.normalization):
            self.stats = stats if stats is not None else self.population_stats()
        self._spec = resolve_spec(self.normalization, self.stats)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draw (call once per epoch)."""
        self.epoch = int(epoch)

    def subset(self, indices: Sequence[int], augment: AugmentConfig | None = None) -> PatchDataset:
        """A dataset over some of these patches, sharing the cache and the population statistics.

        With a population normalization (``scene_robust``) the whole set stays
        the population: a cross-validation fold is normalized like the rest of
        its scene (statistics of the images only, no label is used).
        """
        sub = PatchDataset(
            [self.records[i] for i in indices], self.channels, self.normalization, augment,
            self.source_channels, self.seed, self.cache, require_masks=False, stats=self.stats,
        )
        if self.cache:
            sub._cache = {j: self._cache[i] for j, i in enumerate(indices) if i in self._cache}
        return sub

    def population_stats(self, max_pixels: int = 2**22) -> BandStats:
        """Per-channel median and robust scale over the valid pixels of all patches.

        At most ``max_pixels`` in all: beyond that each patch contributes an
        equal, seeded random sample of its valid pixels (reproducible).
        """
        per_patch = max(1024, max_pixels // len(self.records))
        parts = []
        for i in range(len(self)):
            patch = self.raw(i)
            vals = patch.image.reshape(len(self.channels), -1)[:, patch.valid.ravel()]
            if vals.shape[1] > per_patch:
                pick = np.random.default_rng([self.seed, i]).choice(vals.shape[1], per_patch, replace=False)
                vals = vals[:, np.sort(pick)]
            parts.append(vals.astype(np.float32, copy=False))
        return band_stats(np.concatenate(parts, axis=1), self.channels)

    def raw(self, index: int) -> Patch:
        """The patch with raw (unnormalized) values in ``channels`` order."""
        return load_patch(self.records[index], self.channels, self.source_channels)

    def normalized(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image (C,H,W) normalized, mask (H,W) uint8, valid (H,W) bool), cached when enabled."""
        if index in self._cache:
            return self._cache[index]
        patch = self.raw(index)
        image = normalize_patch(patch.image, patch.valid, self._spec)
        mask = patch.mask if patch.mask is not None else np.zeros(patch.valid.shape, np.uint8)
        item = (image, mask, patch.valid)
        if self.cache:
            self._cache[index] = item
        return item

    def label_counts(self) -> tuple[int, int]:
        """(landslide, background) valid pixel counts over all patches (reads masks only when not cached)."""
        pos = neg = 0
        for i, rec in enumerate(self.records):
            if i in self._cache:
                _, mask, valid = self._cache[i]
            elif rec.mask is not None:
                mask, valid = read_mask(rec.mask)
            else:
                continue
            m = mask.astype(bool) & valid
            pos += int(m.sum())
            neg += int(valid.sum()) - int(m.sum())
        return pos, neg

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All patches stacked, without augmentation: image (N,C,H,W), mask (N,H,W), valid (N,H,W)."""
        items = [self.normalized(i) for i in range(len(self))]
        return (
            np.stack([i[0] for i in items]),
            np.stack([i[1] for i in items]),
            np.stack([i[2] for i in items]),
        )

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        image, mask, valid = self.normalized(index)
        if self.augment.enabled:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image, mask, valid = augment(image, mask, valid, self.augment, rng)
        return {
            "image": torch.from_numpy(np.array(image, dtype=np.float32)),
            "mask": torch.from_numpy(mask[None].astype(np.float32)),
            "valid": torch.from_numpy(np.array(valid[None], dtype=bool)),
            "index": index,
        }

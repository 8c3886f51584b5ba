"""Training patches: readers, channel selection, augmentation, checksum.

Two on-disk layouts are read unchanged:

* Landslide4Sense HDF5 patches: ``<root>/TrainData/img/image_N.h5`` with
  ``<root>/TrainData/mask/mask_N.h5`` (and ``ValidData``, ``TestData``), or a
  flat folder ``<root>/img`` + ``<root>/mask``. Dataset ``img`` is float64
  (128, 128, 14) band-last in :data:`pipeline.core.channels.L4S_CHANNELS` order,
  ``mask`` is uint8 (128, 128) in {0, 1}.
* GeoTIFF chip folders: ``<root>/img`` (or ``images``) + ``<root>/mask`` (or
  ``masks``, ``labels``) holding ``*.tif``. Images are band-first; channel
  names come from the band descriptions (``B02``, ``SLOPE``...), from
  ``source_channels``, or are the Landslide4Sense order for 14 bands. Pixels
  that are nodata or non-finite in any band are invalid.

Every reader returns physical units (reflectance, degrees, metres; see
:data:`pipeline.core.channels.UNITS`). Landslide4Sense patches are multiplied
back by the dataset's published divisors (:data:`pipeline.core.channels.L4S_DIVISOR`).
Chips declare their units (``units``: ``physical``, ``dn`` or ``l4s``, from
the training config or the file's ``UNITS`` metadata tag) and are taken as
physical otherwise; a chip whose reflectance bands look like digital numbers
is refused rather than guessed.

Images and masks are paired by the part of the file name after the prefix
(``image_12.h5`` <-> ``mask_12.h5``, ``chip_a.tif`` <-> ``chip_a.tif``).

:class:`PatchDataset` augments patches in physical units (the radiometric
difference between L1C and L2A products, :class:`RadiometricConfig`), then
normalizes them (through :func:`pipeline.model.normalization.normalize`, the one
place normalization lives) and augments them geometrically (flips, 90-degree
rotations, Gaussian noise in normalized units). Augmentation draws from a
generator seeded by (seed, epoch, index), so a run is reproducible whatever
the number of loader workers.
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

from pipeline.core.channels import L4S_CHANNELS, S2_BANDS, canonical, physical_factors
from pipeline.core.errors import ChannelError, InputError
from pipeline.model.normalization import BandStats, band_stats, fixed_spec, is_resolved, validate_spec

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
UNITS = ("physical", "dn", "l4s")
#: A reflectance above this in the median of a band means the values are not reflectance.
_MAX_MEDIAN_REFLECTANCE = 1.5


@dataclass(frozen=True)
class PatchRecord:
    """One patch on disk: an image file and, when labelled, its mask file."""

    id: str
    image: Path
    mask: Path | None = None


@dataclass(frozen=True)
class Patch:
    """One patch in memory (physical values, before normalization)."""

    image: np.ndarray  # (C, H, W) float32 physical units, in the order of ``channels``
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


class RadiometricConfig(BaseModel):
    """The atmosphere in physical units: how an L2A product differs from L1C, and how hazes vary.

    The training patches are L1C (top of atmosphere); L2A (surface
    reflectance) is darker in the visible bands by the path reflectance that
    the atmospheric correction removes, and somewhat brighter in the near
    and short-wave infrared. :func:`surface_look` models that: ``x' = g_b *
    (x - u * path_b)`` with ``path_b`` the dark-object value of band b
    (``path_quantile`` of the training patches' values, a classic estimate
    of the path reflectance) for ``path_bands``, and ``g_b = 1 + u *
    nir_gain`` for ``nir_bands``; ``u = 1`` is the training patches' typical
    atmosphere removed. A model serves L2A scenes by undoing that (``u =
    1``) before its normalization (:func:`pipeline.model.normalization.level_spec`).

    Training varies the atmosphere around what the model sees: with
    probability ``p`` a patch gets ``u ~ U(-spread, spread)`` (hazier or
    clearer than typical), and every patch a per-band gain ``U(1 - jitter,
    1 + jitter)`` (sensor, sun angle, season). Terrain channels are left
    alone.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    p: float = Field(0.0, ge=0, le=1, description="share of patches given another atmosphere")
    spread: float = Field(0.5, ge=0, le=1, description="atmospheres from -spread to +spread of the typical path")
    path_quantile: float = Field(1.0, gt=0, lt=50, description="percentile of the training values taken as path reflectance")
    path_bands: list[str] = Field(default_factory=lambda: ["B01", "B02", "B03", "B04", "B05"])
    nir_bands: list[str] = Field(default_factory=lambda: ["B06", "B07", "B08", "B8A", "B09", "B11", "B12"])
    nir_gain: float = Field(0.08, ge=0, le=0.5, description="relative brightening of nir_bands in surface reflectance")
    jitter: float = Field(0.0, ge=0, le=0.5, description="per-band gain jitter on every patch")

    @property
    def enabled(self) -> bool:
        return self.p > 0 or self.jitter > 0


NO_AUGMENT = AugmentConfig(hflip=False, vflip=False, rot90=False, noise_std=0.0)
NO_RADIOMETRIC = RadiometricConfig()


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


def read_image(path: Path, source_channels: Sequence[str] | None = None, units: str | None = None) -> Patch:
    """Read one image patch as (C, H, W) float32 physical values with its channel names and valid mask.

    ``units`` says how the file stores its values (see the module's docstring); by default
    Landslide4Sense HDF5 patches are ``l4s`` and GeoTIFF chips say so in their ``UNITS`` tag
    or are ``physical``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    tag = None
    try:
        if suffix in H5_SUFFIXES:
            import h5py

            with h5py.File(path, "r") as h5:
                arr = _h5_dataset(h5, path, "img")
            tag = "l4s"
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
                tag = src.tags().get("UNITS", "physical").lower()
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
    to_physical(image, names, units or tag or "physical", valid, path)
    return Patch(image=image, valid=valid, mask=None, channels=names)


def to_physical(image: np.ndarray, channels: Sequence[str], units: str, valid: np.ndarray, where: Path) -> None:
    """Convert ``image`` (C, H, W) from ``units`` to physical units in place, with a plausibility check.

    Raises :class:`ChannelError` when the units are unknown or a reflectance band's median is
    far above 1 (digital numbers, or Landslide4Sense values, declared as reflectance).
    """
    if units not in UNITS:
        raise ChannelError(f"{where}: unknown units {units!r}; expected one of {', '.join(UNITS)}")
    try:
        factors = physical_factors(list(channels), units)
    except ValueError as exc:
        raise ChannelError(f"{where}: {exc}") from None
    for band, factor in zip(image, factors, strict=True):
        if factor != 1.0:
            band *= np.float32(factor)
    if valid.any():
        for name, band in zip(channels, image, strict=True):
            median = float(np.median(band[valid])) if name in S2_BANDS else 0.0
            if median > _MAX_MEDIAN_REFLECTANCE:
                raise ChannelError(
                    f"{where}: band {name} has median {median:g} in units {units!r}, far above any "
                    "reflectance; declare the units of the chips (data.units: dn for digital numbers, "
                    "l4s for Landslide4Sense scaling, or a UNITS tag in the GeoTIFF)"
                )


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
    units: str | None = None,
) -> Patch:
    """Read a patch with its mask, keeping ``channels`` (default: all) in that order."""
    patch = read_image(record.image, source_channels, units)
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


def radiometric(
    image: np.ndarray, channels: Sequence[str], cfg: RadiometricConfig, path: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A copy of ``image`` (C, H, W, physical units) with :class:`RadiometricConfig`'s random change.

    ``path`` holds the path reflectance of each channel (0 where none is subtracted).
    """
    u = float(rng.uniform(-cfg.spread, cfg.spread)) if cfg.p > 0 and rng.random() < cfg.p else 0.0
    gain = rng.uniform(1 - cfg.jitter, 1 + cfg.jitter, len(channels)) if cfg.jitter > 0 else None
    return surface_look(image, channels, cfg, path, u, gain)


def surface_look(
    image: np.ndarray, channels: Sequence[str], cfg: RadiometricConfig, path: np.ndarray, u: float,
    gain: np.ndarray | None = None,
) -> np.ndarray:
    """``image`` with ``u`` times the typical atmosphere removed (1: an L2A product's look; negative:
    a hazier scene), times an optional per-band ``gain``; terrain channels unchanged."""
    out = np.array(image, dtype=np.float32, copy=True)
    g = np.ones(len(channels), np.float32) if gain is None else np.asarray(gain, np.float32).copy()
    nir = np.array([ch in cfg.nir_bands for ch in channels])
    g[nir] *= np.float32(1 + u * cfg.nir_gain)
    path = np.where([ch in cfg.path_bands for ch in channels], path, 0)
    offset = -np.float32(u) * np.asarray(path, np.float32)
    spectral = np.array([ch in S2_BANDS for ch in channels])
    g[~spectral], offset[~spectral] = 1.0, 0.0
    out += offset[:, None, None]
    out *= g[:, None, None]
    return out


# --------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------
class PatchDataset(Dataset):  # type: ignore[type-arg]
    """Normalized (and optionally augmented) patches for training and evaluation.

    ``normalization`` is an artefact's spec, or a training spec without
    statistics (``{"method": "fixed"}``): then the median and interquartile
    range of these patches' valid pixels become its ``mean`` and ``std``
    (:attr:`normalization` holds the resolved spec, :attr:`stats` the
    statistics). Items are dicts of tensors: ``image`` (C, H, W) float32,
    ``mask`` (1, H, W) float32 (zeros when unlabelled), ``valid`` (1, H, W)
    bool, ``index`` int.
    """

    def __init__(
        self,
        records: Sequence[PatchRecord],
        channels: Sequence[str],
        normalization: dict[str, object] | None,
        augment: AugmentConfig | None = None,
        source_channels: Sequence[str] | None = None,
        seed: int = 0,
        cache: bool = True,
        require_masks: bool = True,
        radiometric: RadiometricConfig | None = None,
        units: str | None = None,
    ) -> None:
        if not records:
            raise InputError("no patches given")
        self.records = list(records)
        self.channels = _canonical_list(channels, "channels")
        self.augment = augment or NO_AUGMENT
        self.radiometric = radiometric or NO_RADIOMETRIC
        self.source_channels = tuple(source_channels) if source_channels else None
        self.units = units
        self.seed = int(seed)
        self.epoch = 0
        self.cache = cache
        self._cache: dict[int, Patch] = {}
        if require_masks:
            missing = [r.image for r in self.records if r.mask is None]
            if missing:
                raise InputError(f"{missing[0]}: patch has no mask ({len(missing)} of {len(self.records)} lack one)")
        self.stats: BandStats | None = None
        self.path = np.zeros(len(self.channels), np.float32)
        self.nir_gain = np.zeros(len(self.channels), np.float32)
        self._resolve(normalization)

    def _resolve(self, normalization: dict[str, object] | None) -> None:
        """Set :attr:`normalization`, taking missing statistics (and the path reflectance of the
        radiometric augmentation) from these patches."""
        spec = validate_spec(normalization, len(self.channels), resolved=False)
        if not is_resolved(spec) or self.radiometric.p > 0:
            self.stats, path = self._statistics(self.radiometric.path_quantile)
            path_bands = set(self.radiometric.path_bands)
            self.path = np.where([c in path_bands for c in self.channels], path, 0).astype(np.float32)
            self.nir_gain = np.where([c in self.radiometric.nir_bands for c in self.channels],
                                     self.radiometric.nir_gain, 0.0).astype(np.float32)
        if not is_resolved(spec):
            assert self.stats is not None
            source = (f"median and interquartile range of {self.stats.n_pixels} valid pixels of "
                      f"{len(self.records)} training patches")
            spec = fixed_spec(self.stats, spec.get("clip"), source)
        self.normalization: dict[str, object] = spec

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draw (call once per epoch)."""
        self.epoch = int(epoch)

    def subset(
        self, indices: Sequence[int], augment: AugmentConfig | None = None,
        normalization: dict[str, object] | None = None, radiometric: RadiometricConfig | None = None,
    ) -> PatchDataset:
        """A dataset over some of these patches, sharing the cache.

        ``normalization`` defaults to this dataset's (resolved) spec; a spec
        without statistics takes them from the subset's own patches (a
        cross-validation fold's training patches).
        """
        sub = PatchDataset.__new__(PatchDataset)
        sub.records = [self.records[i] for i in indices]
        sub.channels, sub.source_channels, sub.units = self.channels, self.source_channels, self.units
        sub.seed, sub.epoch, sub.cache = self.seed, 0, self.cache
        sub._cache = {j: self._cache[i] for j, i in enumerate(indices) if i in self._cache} if self.cache else {}
        sub.augment = augment or NO_AUGMENT
        sub.radiometric = radiometric or NO_RADIOMETRIC
        sub.stats, sub.path, sub.nir_gain = self.stats, self.path, self.nir_gain
        sub._resolve(normalization or self.normalization)
        return sub

    def _statistics(self, path_quantile: float, max_pixels: int = 2**22) -> tuple[BandStats, np.ndarray]:
        """Per-channel median and robust scale over the valid pixels of all patches, and the
        ``path_quantile`` percentile of each channel (the dark-object path reflectance).

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
        values = np.concatenate(parts, axis=1)
        path = (np.percentile(values, path_quantile, axis=1) if values.shape[1]
                else np.zeros(len(self.channels)))
        return band_stats(values, self.channels), np.asarray(path, np.float32)

    def raw(self, index: int) -> Patch:
        """The patch in physical units, ``channels`` order (cached when enabled)."""
        if index in self._cache:
            return self._cache[index]
        patch = load_patch(self.records[index], self.channels, self.source_channels, self.units)
        if patch.mask is None:
            patch = Patch(patch.image, patch.valid, np.zeros(patch.valid.shape, np.uint8), patch.channels)
        if self.cache:
            self._cache[index] = patch
        return patch

    def normalized(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image (C,H,W) normalized, mask (H,W) uint8, valid (H,W) bool), without augmentation."""
        patch = self.raw(index)
        assert patch.mask is not None
        return normalize_patch(patch.image, patch.valid, self.normalization), patch.mask, patch.valid

    def label_counts(self) -> tuple[int, int]:
        """(landslide, background) valid pixel counts over all patches (reads masks only when not cached)."""
        pos = neg = 0
        for i, rec in enumerate(self.records):
            if i in self._cache:
                mask, valid = self._cache[i].mask, self._cache[i].valid
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
        patch = self.raw(index)
        assert patch.mask is not None
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image = patch.image
        if self.radiometric.enabled:
            image = radiometric(image, self.channels, self.radiometric, self.path, rng)
        image = normalize_patch(image, patch.valid, self.normalization)
        mask, valid = patch.mask, patch.valid
        if self.augment.enabled:
            image, mask, valid = augment(image, mask, valid, self.augment, rng)
        return {
            "image": torch.from_numpy(np.array(image, dtype=np.float32)),
            "mask": torch.from_numpy(mask[None].astype(np.float32)),
            "valid": torch.from_numpy(np.array(valid[None], dtype=bool)),
            "index": index,
        }


def normalize_patch(image: np.ndarray, valid: np.ndarray, spec: dict[str, object]) -> np.ndarray:
    """Normalize one (C, H, W) patch with :func:`pipeline.model.normalization.normalize`."""
    from pipeline.model.normalization import normalize

    out = normalize(image[None].astype(np.float32, copy=False), valid[None], spec)
    return np.asarray(out[0], dtype=np.float32)

"""The patch dataset of training and evaluation: patches read once, normalized, augmented per epoch.

:class:`PatchDataset` augments patches in physical units (the radiometric
difference between L1C and L2A products), then normalizes them (through
:func:`pipeline.model.normalization.normalize`, the one place normalization
lives) and augments them geometrically (:mod:`pipeline.training.augmentation`).
Augmentation draws from a generator seeded by (seed, epoch, index), so a run
is reproducible whatever the number of loader workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.core.errors import ConfigError, InputError
from pipeline.model.normalization import BandStats, band_stats, fixed_spec, is_resolved, validate_spec
from pipeline.training.augmentation import NO_AUGMENTATION, Augmentation, augment, radiometric
from pipeline.training.patch_files import PatchRecord
from pipeline.training.patch_readers import Patch, PatchFormat, canonical_channels, load_patch, read_mask

if TYPE_CHECKING:
    from pipeline.training.config import TrainConfig


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
        augmentation: Augmentation = NO_AUGMENTATION,
        patch_format: PatchFormat = PatchFormat(),  # noqa: B008 - frozen, shared safely
        seed: int = 0,
        cache: bool = True,
        require_masks: bool = True,
    ) -> None:
        if not records:
            raise InputError("no patches given")
        self.records = list(records)
        self.channels = canonical_channels(channels, "channels")
        self.augmentation = augmentation
        self.patch_format = patch_format
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
        rad = self.augmentation.radiometric
        if not is_resolved(spec) or rad.p > 0:
            self.stats, path = self._statistics(rad.path_quantile)
            path_bands = set(rad.path_bands)
            self.path = np.where([c in path_bands for c in self.channels], path, 0).astype(np.float32)
            self.nir_gain = np.where([c in rad.nir_bands for c in self.channels], rad.nir_gain, 0.0).astype(np.float32)
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
        self, indices: Sequence[int], augmentation: Augmentation = NO_AUGMENTATION,
        normalization: dict[str, object] | None = None,
    ) -> PatchDataset:
        """A dataset over some of these patches, sharing the cache.

        ``normalization`` defaults to this dataset's (resolved) spec; a spec
        without statistics takes them from the subset's own patches (a
        cross-validation fold's training patches).
        """
        sub = PatchDataset.__new__(PatchDataset)
        sub.records = [self.records[i] for i in indices]
        sub.channels, sub.patch_format = self.channels, self.patch_format
        sub.seed, sub.epoch, sub.cache = self.seed, 0, self.cache
        sub._cache = {j: self._cache[i] for j, i in enumerate(indices) if i in self._cache} if self.cache else {}
        sub.augmentation = augmentation
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
        fmt = self.patch_format
        patch = load_patch(self.records[index], self.channels, fmt.source_channels, fmt.units)
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
        aug = self.augmentation
        if aug.radiometric.enabled:
            image = radiometric(image, self.channels, aug.radiometric, self.path, rng)
        image = normalize_patch(image, patch.valid, self.normalization)
        mask, valid = patch.mask, patch.valid
        if aug.augment.enabled:
            image, mask, valid = augment(image, mask, valid, aug.augment, rng)
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


def make_dataset(
    cfg: TrainConfig, records: Sequence[PatchRecord], augment: bool = True,
    normalization: dict[str, Any] | None = None,
) -> PatchDataset:
    """A :class:`PatchDataset` with the config's channels, normalization and augmentation.

    ``normalization`` (a resolved spec, e.g. the training set's) replaces the config's.
    """
    return PatchDataset(
        records,
        cfg.model.channels,
        normalization or cfg.model.normalization,
        Augmentation(cfg.augment, cfg.radiometric) if augment else NO_AUGMENTATION,
        PatchFormat(cfg.data.source_channels, cfg.data.units),
        seed=cfg.seed,
        cache=cfg.data.cache,
    )


def serving_normalization(cfg: TrainConfig, dataset: PatchDataset) -> dict[str, Any]:
    """The normalization a model trained on ``dataset`` ships with: the patches' statistics, plus
    those for L2A scenes when the model serves them (the typical path reflectance of the patches
    added back, the infrared gain undone: :func:`pipeline.model.normalization.add_level`)."""
    from pipeline.model.normalization import add_level

    spec = dict(dataset.normalization)
    if "L2A" not in cfg.model.levels or spec["method"] != "fixed":
        return spec
    if not dataset.path.any():
        raise ConfigError(
            "model.levels includes L2A but no path reflectance was estimated from the training patches: "
            "leave normalization.mean/std to the patches or set radiometric.p > 0"
        )
    return add_level(spec, "L2A", dataset.path, 1.0 + dataset.nir_gain)

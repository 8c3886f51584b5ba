"""Training-time augmentation: the radiometric change in physical units, then flips, rotations and noise.

:class:`RadiometricConfig` models the atmosphere (how an L2A product differs
from L1C, how hazes vary) and is applied before normalization;
:class:`AugmentConfig` (flips, 90-degree rotations, Gaussian noise in
normalized units) after it. :class:`Augmentation` holds both for a dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.core.channels import S2_BANDS


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


@dataclass(frozen=True)
class Augmentation:
    """What a dataset changes at random in its patches: ``radiometric`` in physical units before
    normalization (its statistics also give the path reflectance), ``augment`` after it."""

    augment: AugmentConfig = NO_AUGMENT
    radiometric: RadiometricConfig = NO_RADIOMETRIC


#: A dataset's patches as they are.
NO_AUGMENTATION = Augmentation()


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
        noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(cfg.noise_std)
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

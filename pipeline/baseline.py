"""Random Forest baseline: per-pixel spectral, NDVI and terrain features.

The conventional baseline the seed papers compare against. Every pixel is a
sample; its features are

* every channel of the patch after the model normalization
  (:func:`pipeline.normalization.normalize`, per-patch robust by default),
  so spectral bands and terrain (SLOPE, DEM) are on the same footing as for
  the networks;
* NDVI = (B08 - B04) / (B08 + B04) from the raw values when both bands are
  present (on Landslide4Sense the bands are rescaled by unknown constants,
  so this is an NDVI-like index, consistent within the dataset);
* optionally the 3x3 neighbourhood mean of each normalized channel
  (``context``; off by default to stay per-pixel).

Training pixels are subsampled per patch (``pixels_per_patch``) with
landslide pixels kept preferentially; classes are balanced by weight. The
decision threshold is chosen on out-of-bag predictions of the training
pixels (pooled F1), never on the evaluation patches.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .channels import canonical
from .metrics import select_threshold

log = logging.getLogger(__name__)


class RandomForestConfig(BaseModel):
    """Random Forest hyper-parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_estimators: int = Field(200, ge=1)
    max_depth: int | None = Field(16, ge=1)
    min_samples_leaf: int = Field(5, ge=1)
    pixels_per_patch: int = Field(3000, ge=10, description="training pixels sampled per patch")
    context: bool = Field(False, description="add 3x3 mean of each normalized channel")
    n_jobs: int = Field(1, description="scikit-learn n_jobs (cores are shared: keep small)")
    seed: int = 0


def feature_names(channels: Sequence[str], context: bool = False) -> list[str]:
    """Names of the features :func:`pixel_features` returns, in order."""
    chans = [canonical(c) for c in channels]
    names = [f"{c}_norm" for c in chans]
    if "B04" in chans and "B08" in chans:
        names.append("NDVI")
    if context:
        names += [f"{c}_mean3" for c in chans]
    return names


def _box3(x: np.ndarray) -> np.ndarray:
    """3x3 mean with edge replication, over the last two axes."""
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    h, w = x.shape[-2:]
    acc = np.zeros_like(x, dtype=np.float32)
    for dy in range(3):
        for dx in range(3):
            acc += p[..., dy : dy + h, dx : dx + w]
    return acc / 9.0


def pixel_features(
    normalized: np.ndarray, raw: np.ndarray, channels: Sequence[str], context: bool = False
) -> np.ndarray:
    """Features (F, H, W) float32 of one patch from its normalized and raw (C, H, W) arrays."""
    chans = [canonical(c) for c in channels]
    feats = [normalized.astype(np.float32)]
    if "B04" in chans and "B08" in chans:
        red = raw[chans.index("B04")].astype(np.float64)
        nir = raw[chans.index("B08")].astype(np.float64)
        den = nir + red
        ndvi = np.where(np.abs(den) > 1e-12, (nir - red) / np.where(den == 0, 1, den), 0.0)
        feats.append(np.clip(np.nan_to_num(ndvi), -1, 1).astype(np.float32)[None])
    if context:
        feats.append(_box3(normalized.astype(np.float32)))
    return np.concatenate(feats, axis=0)


@dataclass
class RandomForestBaseline:
    """Per-pixel Random Forest with an out-of-bag threshold."""

    config: RandomForestConfig = field(default_factory=RandomForestConfig)
    channels: tuple[str, ...] = ()
    threshold: float = 0.5
    model: Any = None
    oob_f1: float = float("nan")

    def sample(
        self, feature: np.ndarray, mask: np.ndarray, valid: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Training pixels of one patch: up to half landslide, the rest background. Returns (x, y)."""
        n = self.config.pixels_per_patch
        f = feature.reshape(feature.shape[0], -1).T
        y = mask.reshape(-1).astype(bool)
        ok = valid.reshape(-1)
        pos = np.flatnonzero(ok & y)
        neg = np.flatnonzero(ok & ~y)
        n_pos = min(pos.size, n // 2)
        n_neg = min(neg.size, n - n_pos)
        take = np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)])
        return f[take], y[take]

    def fit(
        self,
        features: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        valids: Sequence[np.ndarray],
    ) -> RandomForestBaseline:
        """Train on per-patch features (F,H,W), masks (H,W) and valid masks (H,W)."""
        rng = np.random.default_rng(self.config.seed)
        pairs = [self.sample(f, m, v, rng) for f, m, v in zip(features, masks, valids, strict=True)]
        return self.fit_samples(np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs]))

    def fit_samples(self, x: np.ndarray, y: np.ndarray) -> RandomForestBaseline:
        """Train on sampled pixels ``x`` (n, F) with labels ``y`` (n,)."""
        from sklearn.ensemble import RandomForestClassifier

        cfg = self.config
        if y.all() or not y.any():
            raise ValueError("Random Forest baseline needs both landslide and background pixels to train")
        self.model = RandomForestClassifier(
            n_estimators=cfg.n_estimators,
            max_depth=cfg.max_depth,
            min_samples_leaf=cfg.min_samples_leaf,
            class_weight="balanced_subsample",
            oob_score=True,
            n_jobs=cfg.n_jobs,
            random_state=cfg.seed,
        )
        with warnings.catch_warnings():
            # few trees leave some pixels without out-of-bag votes; they are skipped below
            warnings.filterwarnings("ignore", message="Some inputs do not have OOB scores")
            self.model.fit(x, y)
        oob = self.model.oob_decision_function_[:, 1]
        scored = np.isfinite(oob)
        self.threshold, self.oob_f1 = select_threshold(oob[scored], y[scored])
        log.info("random forest: %d pixels, %d features, OOB threshold %.3f (F1 %.3f)",
                 x.shape[0], x.shape[1], self.threshold, self.oob_f1)
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Landslide probability (H, W) of one patch's features (F, H, W)."""
        if self.model is None:
            raise ValueError("Random Forest baseline is not trained")
        f = features.reshape(features.shape[0], -1).T
        prob = self.model.predict_proba(f)[:, 1]
        return prob.reshape(features.shape[1:]).astype(np.float32)


def dataset_features(dataset: Any, indices: Sequence[int], context: bool = False) -> list[np.ndarray]:
    """Features of patches ``indices`` of a :class:`pipeline.datasets.PatchDataset`."""
    out = []
    for i in indices:
        norm, _, _ = dataset.normalized(i)
        raw = dataset.raw(i).image
        out.append(pixel_features(norm, raw, dataset.channels, context))
    return out


def fit_predict(
    dataset: Any,
    train_idx: Sequence[int],
    test_idx: Sequence[int],
    config: RandomForestConfig | None = None,
) -> tuple[np.ndarray, RandomForestBaseline]:
    """Train on ``train_idx`` patches, return probabilities (n, H, W) for ``test_idx`` and the model.

    Patches are processed one at a time (features of the whole training set never sit in memory).
    """
    cfg = config or RandomForestConfig()
    rf = RandomForestBaseline(config=cfg, channels=tuple(dataset.channels))
    rng = np.random.default_rng(cfg.seed)
    xs, ys = [], []
    for i in train_idx:
        _, mask, valid = dataset.normalized(i)
        feat = dataset_features(dataset, [i], cfg.context)[0]
        x, y = rf.sample(feat, mask, valid, rng)
        xs.append(x)
        ys.append(y)
    rf.fit_samples(np.concatenate(xs), np.concatenate(ys))
    probs = np.stack([rf.predict_proba(dataset_features(dataset, [i], cfg.context)[0]) for i in test_idx])
    return probs, rf

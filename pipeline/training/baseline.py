"""Conventional per-pixel baselines: Random Forest and RBF support vector machine.

The baselines the seed papers compare against. Every pixel is a sample; its
features are

* every channel of the patch after the normalization of the training
  patches (:func:`pipeline.model.normalization.normalize`, fixed statistics in
  physical units), so spectral bands and terrain are on the same footing
  as for the networks;
* NDVI = (B08 - B04) / (B08 + B04) from the physical values when both
  bands are present;
* optionally the 3x3 neighbourhood mean of each normalized channel
  (``context``; off by default to stay per-pixel).

Training pixels are subsampled per patch (``pixels_per_patch``) with
landslide pixels kept preferentially; classes are balanced by weight. The
decision threshold is chosen on the training pixels alone, never on the
evaluation patches: out-of-bag votes for the Random Forest, 3-fold
out-of-sample decision values for the SVM (an RBF SVM's cost grows with
the square of its samples, hence its smaller sample).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.core.channels import canonical
from pipeline.training.thresholds import select_threshold

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


class SVMConfig(BaseModel):
    """RBF support vector machine hyper-parameters (scikit-learn's defaults for C and gamma)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    C: float = Field(1.0, gt=0)
    gamma: float | Literal["scale", "auto"] = "scale"
    pixels_per_patch: int = Field(400, ge=10, description="training pixels sampled per patch")
    context: bool = Field(False, description="add 3x3 mean of each normalized channel")
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
class PixelBaseline:
    """A per-pixel classifier (Random Forest or SVM) with a threshold chosen on its training pixels."""

    config: RandomForestConfig | SVMConfig = field(default_factory=RandomForestConfig)
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

    @property
    def kind(self) -> str:
        return "svm" if isinstance(self.config, SVMConfig) else "random forest"

    def fit_samples(self, x: np.ndarray, y: np.ndarray) -> PixelBaseline:
        """Train on sampled pixels ``x`` (n, F) with labels ``y`` (n,)."""
        if y.all() or not y.any():
            raise ValueError(f"the {self.kind} baseline needs both landslide and background pixels to train")
        scores = self._fit_svm(x, y) if isinstance(self.config, SVMConfig) else self._fit_forest(x, y)
        scored = np.isfinite(scores)
        self.threshold, self.oob_f1 = select_threshold(scores[scored], y[scored])
        log.info("%s: %d pixels, %d features, out-of-sample threshold %.3f (F1 %.3f)",
                 self.kind, x.shape[0], x.shape[1], self.threshold, self.oob_f1)
        return self

    def _fit_forest(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        from sklearn.ensemble import RandomForestClassifier

        cfg = self.config
        assert isinstance(cfg, RandomForestConfig)
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
            # few trees leave some pixels without out-of-bag votes; they are skipped
            warnings.filterwarnings("ignore", message="Some inputs do not have OOB scores")
            self.model.fit(x, y)
        return self.model.oob_decision_function_[:, 1]

    def _fit_svm(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Fit, and return 3-fold out-of-sample probabilities of the training pixels (for the threshold)."""
        from sklearn.model_selection import StratifiedKFold, cross_val_predict

        folds = StratifiedKFold(3, shuffle=True, random_state=self.config.seed)
        scores = cross_val_predict(self._svm(), x, y, cv=folds, method="decision_function")
        self.model = self._svm().fit(x, y)
        # decision values -> (0, 1) so that thresholds read like the other models' probabilities
        return _logistic(scores)

    def _svm(self) -> Any:
        from sklearn.svm import SVC

        cfg = self.config
        assert isinstance(cfg, SVMConfig)
        return SVC(C=cfg.C, kernel="rbf", gamma=cfg.gamma, class_weight="balanced", random_state=cfg.seed)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Landslide probability (H, W) of one patch's features (F, H, W)."""
        if self.model is None:
            raise ValueError(f"the {self.kind} baseline is not trained")
        f = features.reshape(features.shape[0], -1).T
        if isinstance(self.config, SVMConfig):
            prob = _logistic(self.model.decision_function(f))
        else:
            prob = self.model.predict_proba(f)[:, 1]
        return prob.reshape(features.shape[1:]).astype(np.float32)


def _logistic(scores: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(scores, np.float64)))


def _patch_features(dataset: Any, index: int, context: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (F,H,W), mask, valid) of one patch of a :class:`pipeline.training.datasets.PatchDataset`."""
    norm, mask, valid = dataset.normalized(index)
    return pixel_features(norm, dataset.raw(index).image, dataset.channels, context), mask, valid


def fit_predict(
    train: Any,
    test: Any,
    config: RandomForestConfig | SVMConfig | None = None,
) -> tuple[np.ndarray, PixelBaseline]:
    """Train on the patches of ``train``, return probabilities (n, H, W) for ``test`` and the model.

    ``train`` and ``test`` are :class:`pipeline.training.datasets.PatchDataset` s; ``test`` should be
    normalized with ``train``'s statistics. Patches are processed one at a time (features of
    the whole training set never sit in memory).
    """
    cfg = config or RandomForestConfig()
    model = PixelBaseline(config=cfg, channels=tuple(train.channels))
    rng = np.random.default_rng(cfg.seed)
    xs, ys = [], []
    for i in range(len(train)):
        feat, mask, valid = _patch_features(train, i, cfg.context)
        x, y = model.sample(feat, mask, valid, rng)
        xs.append(x)
        ys.append(y)
    model.fit_samples(np.concatenate(xs), np.concatenate(ys))
    probs = np.stack([model.predict_proba(_patch_features(test, i, cfg.context)[0]) for i in range(len(test))])
    return probs, model

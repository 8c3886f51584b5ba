"""Ensembles: several model artefacts combined into one probability.

:func:`check_ensemble` checks that members fit together (one window size)
and normalizes their weights; :func:`ensemble_probability` combines the
members' probabilities by weighted mean or weighted vote;
:func:`ensemble_threshold` gives the decision threshold that goes with the
combination. Nothing here needs PyTorch except :func:`load_ensemble`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from pipeline.core.errors import ModelError
from pipeline.model.artefact import ModelArtefact, load_artefact

if TYPE_CHECKING:
    import torch

EnsembleMethod = Literal["mean", "vote"]


def load_ensemble(paths: Sequence[str | os.PathLike[str]], device: str | torch.device = "cpu") -> list[ModelArtefact]:
    """Load the artefacts of an ensemble on ``device``; members must share the tile size."""
    models = [load_artefact(p, device=device) for p in paths]
    check_ensemble(models)
    return models


def check_ensemble(models: Sequence[ModelArtefact], weights: Sequence[float] | None = None) -> np.ndarray:
    """Validate an ensemble and return normalized member weights (sum 1)."""
    if not models:
        raise ModelError("no model given: model.path must name at least one artefact")
    tiles = {m.tile_size for m in models}
    if len(tiles) > 1:
        raise ModelError(f"ensemble members must share one tile_size, got {sorted(tiles)}")
    if weights is None:
        w = np.ones(len(models), np.float64)
    else:
        w = np.asarray(list(weights), np.float64)
        if w.shape != (len(models),):
            raise ModelError(f"model.weights: {w.size} weight(s) given for {len(models)} model(s)")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ModelError(f"model.weights: weights must be non-negative with a positive sum, got {list(w)}")
    return w / w.sum()


def ensemble_probability(
    member_probs: np.ndarray,
    weights: Sequence[float] | np.ndarray,
    thresholds: Sequence[float] | np.ndarray,
    method: EnsembleMethod = "mean",
) -> np.ndarray:
    """Combine member probabilities of shape (M, ...) into one array (...).

    ``mean``: weighted mean of probabilities. ``vote``: weighted fraction of
    members whose probability reaches their own threshold (a soft vote in
    [0, 1]; with equal weights, > 0.5 is a majority).
    """
    p = np.asarray(member_probs)
    w = np.asarray(weights, np.float32).reshape((-1,) + (1,) * (p.ndim - 1))
    if method == "mean":
        return (p * w).sum(axis=0, dtype=np.float32) / np.float32(w.sum())
    if method == "vote":
        t = np.asarray(thresholds, np.float32).reshape(w.shape)
        return ((p >= t) * w).sum(axis=0, dtype=np.float32) / np.float32(w.sum())
    raise ModelError(f"model.ensemble: unknown method {method!r}; expected mean or vote")


def ensemble_threshold(
    models: Sequence[ModelArtefact], weights: Sequence[float] | None = None, method: EnsembleMethod = "mean"
) -> float:
    """Decision threshold for the combined probability.

    A single model keeps its own threshold; ``mean`` uses the weighted mean
    of the members' thresholds; ``vote`` uses 0.5 (weighted majority).
    """
    w = check_ensemble(models, weights)
    if len(models) == 1:
        return float(models[0].threshold)
    if method == "vote":
        return 0.5
    return float(np.dot(w, [m.threshold for m in models]))

"""Threshold calibration: the decision threshold with the best pooled F1, or one that flags a given share.

A pixel is landslide when its probability is at or above the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def f1_by_threshold(
    prob: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None, thresholds: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled F1 for each threshold (landslide if prob >= t). Returns (thresholds, f1)."""
    prob = np.asarray(prob, dtype=np.float64).ravel()
    target = np.asarray(target, dtype=bool).ravel()
    if valid is not None:
        keep = np.asarray(valid, dtype=bool).ravel()
        prob, target = prob[keep], target[keep]
    ts = np.asarray(thresholds if thresholds is not None else np.round(np.arange(0.02, 0.981, 0.02), 4))
    pos = np.sort(prob[target])
    neg = np.sort(prob[~target])
    tp = pos.size - np.searchsorted(pos, ts, side="left")
    fp = neg.size - np.searchsorted(neg, ts, side="left")
    fn = pos.size - tp
    den = 2 * tp + fp + fn
    f1 = np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0)
    return ts, f1


def select_threshold(
    prob: np.ndarray,
    target: np.ndarray,
    valid: np.ndarray | None = None,
    thresholds: Sequence[float] | None = None,
) -> tuple[float, float]:
    """Threshold maximizing pooled F1 on validation data: (threshold, f1).

    Ties go to the threshold closest to 0.5 (a stable default on flat curves).
    """
    ts, f1 = f1_by_threshold(prob, target, valid, thresholds)
    best = f1.max()
    candidates = np.flatnonzero(np.isclose(f1, best, rtol=0, atol=1e-12))
    i = candidates[np.argmin(np.abs(ts[candidates] - 0.5))]
    return float(ts[i]), float(f1[i])


def share_threshold(prob: np.ndarray, share: float, lo: float = 0.02, hi: float = 0.98) -> float:
    """Threshold at which a fraction ``share`` of ``prob`` is flagged (prob >= t), limited to [lo, hi]."""
    values = np.sort(np.asarray(prob, dtype=np.float64).ravel())
    if values.size == 0 or share <= 0:
        return hi
    k = min(values.size - 1, max(0, int(round(values.size * (1.0 - share)))))
    return float(np.clip(values[k], lo, hi))

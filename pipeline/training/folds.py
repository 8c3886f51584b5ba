"""Cross-validation folds of training patches, stratified by landslide fraction.

The folds are dealt by hand rather than by scikit-learn's ``StratifiedKFold``:
that one stratifies class labels, while here the stratum is a continuous
landslide fraction, and the dealing below keeps the shipped models' folds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.core.errors import ConfigError, InputError
from pipeline.training.patch_files import PatchRecord


def kfold_indices(masks_positive: Sequence[float], folds: int, seed: int) -> list[list[int]]:
    """Held-out patch indices of each fold, stratified by landslide fraction.

    Patches are sorted by landslide fraction; each run of ``folds`` neighbours
    is dealt to the folds in a seeded random order, so every fold gets a
    similar mix of landslide-rich and landslide-free patches.
    """
    n = len(masks_positive)
    if folds > n:
        raise ConfigError(f"cv.folds: {folds} folds need at least {folds} patches, found {n}")
    rng = np.random.default_rng(seed)
    order = np.argsort(np.asarray(masks_positive, dtype=float), kind="stable")
    out: list[list[int]] = [[] for _ in range(folds)]
    for start in range(0, n, folds):
        block = order[start : start + folds]
        slots = rng.permutation(folds)[: len(block)]
        for idx, slot in zip(block, slots, strict=True):
            out[int(slot)].append(int(idx))
    return [sorted(f) for f in out]


def shared_folds(records: Sequence[PatchRecord], folds: int, seed: int) -> list[list[int]]:
    """The k folds every compared method uses (stratified by landslide fraction)."""
    from pipeline.training.patch_readers import read_mask

    fractions = []
    for r in records:
        if r.mask is None:
            raise InputError(f"{r.image}: patch has no mask; evaluation needs labelled patches")
        fractions.append(float(read_mask(r.mask)[0].mean()))
    return kfold_indices(fractions, folds, seed)

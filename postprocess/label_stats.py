"""Per-label pixel statistics of one block, and how they combine across blocks.

A block reports, for each of its local labels ``1..n``, the pixel count, the
first pixel in row-major order of the whole array, and the sum, count and
maximum of the finite values of every value layer (:func:`pixel_stats`). The
name of a statistic says how it reduces across the pieces of one component
(:func:`reduction_of`, :func:`reduce_by`). :func:`stat_mean` and
:func:`stat_max` turn the reduced tables into per-object means and maxima.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

Reduction = Literal["sum", "min", "max"]

_INT64_MAX = np.iinfo(np.int64).max


def pixel_stats(
    lab: np.ndarray,
    n: int,
    values: Mapping[str, np.ndarray] | None = None,
    *,
    origin: tuple[int, int] = (0, 0),
    width: int | None = None,
    first: bool = False,
) -> dict[str, np.ndarray]:
    """Per-label pixel statistics of one block, arrays of length ``n`` (labels 1..n).

    Always ``count``. With ``first``: ``first``, the smallest row-major index
    ``row * width + col`` of the label's pixels in the whole array. For each
    value array ``v``: ``v_sum`` and ``v_n`` (sum and number of finite values,
    float64) and ``v_max`` (``-inf`` when no finite value).
    Reductions across blocks are given by :func:`reduction_of`.
    """
    flat = lab.ravel()
    if not first and not values:  # counts only: no need to find the labelled pixels
        return {"count": np.bincount(flat, minlength=n + 1)[1:n + 1].astype(np.int64)}
    idx = np.flatnonzero(flat)
    keys = flat[idx]
    count = np.bincount(keys, minlength=n + 1)[1:].astype(np.int64)
    out: dict[str, np.ndarray] = {"count": count}
    if first:
        out["first"] = _first_pixels(lab, n, idx, keys, origin, lab.shape[1] if width is None else width)
    for name, arr in (values or {}).items():
        out.update(_value_stats(name, np.asarray(arr).ravel()[idx], keys, count, n))
    return out


def _first_pixels(lab: np.ndarray, n: int, idx: np.ndarray, keys: np.ndarray, origin: tuple[int, int],
                  width: int) -> np.ndarray:
    """The smallest row-major index in the whole array (``width`` columns) of each label's pixels."""
    # the block's row-major order of pixels is their order in the whole array as well:
    # a label's first pixel in the block is its smallest index there, converted once
    local = np.full(n + 1, _INT64_MAX, dtype=np.int64)
    np.minimum.at(local, keys, idx)
    local = local[1:]
    present = local != _INT64_MAX
    rows, cols = np.divmod(local[present], lab.shape[1])
    fst = np.full(n, _INT64_MAX, dtype=np.int64)
    fst[present] = (rows + origin[0]) * width + cols + origin[1]
    return fst


def _value_stats(name: str, pixels: np.ndarray, keys: np.ndarray, count: np.ndarray,
                 n: int) -> dict[str, np.ndarray]:
    """``<name>_sum``, ``_n`` and ``_max`` of the labelled ``pixels`` (label ``keys``)."""
    # float64 sums and maxima (ufunc.at has its fast path only for matching types)
    v = pixels.astype(np.float64)
    fin = np.isfinite(v)
    if fin.all():  # the usual case: no mask to apply, the counts are the pixel counts
        k, vf, n_fin = keys, v, count.copy()
    else:
        k, vf = keys[fin], v[fin]
        n_fin = np.bincount(k, minlength=n + 1)[1:].astype(np.int64)
    mx = np.full(n + 1, -np.inf)
    np.maximum.at(mx, k, vf)
    return {f"{name}_sum": np.bincount(k, weights=vf, minlength=n + 1)[1:], f"{name}_n": n_fin,
            f"{name}_max": mx[1:]}


def reduction_of(name: str) -> Reduction:
    """How a statistic named by :func:`pixel_stats` combines across blocks."""
    if name == "first" or name.endswith("_min"):
        return "min"
    if name.endswith("_max") or name.startswith("touches_"):
        return "max"
    return "sum"


def border_labels(lab: np.ndarray, n: int, origin: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Boolean per label 1..n: does the label touch the edge of the whole array?"""
    touches = np.zeros(n + 1, dtype=bool)
    r0, c0 = origin
    h, w = lab.shape
    if r0 == 0:
        touches[lab[0, :]] = True
    if r0 + h == shape[0]:
        touches[lab[-1, :]] = True
    if c0 == 0:
        touches[lab[:, 0]] = True
    if c0 + w == shape[1]:
        touches[lab[:, -1]] = True
    return touches[1:]


def reduce_by(comp: np.ndarray, ncomp: int, values: np.ndarray, name: str) -> np.ndarray:
    """Reduce node values to components (sum, min or max by :func:`reduction_of`)."""
    how = reduction_of(name)
    if values.dtype == bool:
        return reduce_by(comp, ncomp, values.astype(np.int8), name).astype(bool)
    if how == "sum":
        if values.dtype.kind == "f":
            return np.bincount(comp, weights=values, minlength=ncomp)
        acc = np.zeros(ncomp, dtype=values.dtype)
        np.add.at(acc, comp, values)
        return acc
    if values.dtype.kind == "f":
        init = np.inf if how == "min" else -np.inf
    else:
        info = np.iinfo(values.dtype)
        init = info.max if how == "min" else info.min
    acc = np.full(ncomp, init, dtype=values.dtype)
    (np.minimum if how == "min" else np.maximum).at(acc, comp, values)
    return acc


def stat_mean(stats: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """Per-object mean of value layer ``name`` over its finite pixels (NaN when none)."""
    s, n = stats[f"{name}_sum"], stats[f"{name}_n"]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, s / np.maximum(n, 1), np.nan)


def stat_max(stats: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """Per-object maximum of value layer ``name`` (NaN when no finite pixel)."""
    m = stats[f"{name}_max"]
    return np.where(np.isfinite(m), m, np.nan)

"""Input normalization: the one place where model inputs are scaled.

Training and inference both call :func:`normalize` with the ``normalization``
dictionary stored in the model artefact, so a model always sees inputs scaled
the way it was trained. Inputs are in physical units (reflectance, degrees,
metres; see :mod:`pipeline.core.channels`), so the statistics of one artefact hold
for every scene and for the training patches alike.

Methods (``spec["method"]``):

``fixed``
    ``(x - mean[c]) / std[c]`` with per-channel ``mean`` and ``std`` lists,
    optionally clipped (``clip``); invalid pixels are set to 0. Training
    writes the median and interquartile range of its patches' valid pixels
    (:func:`band_stats`) here, with their provenance in ``source``. A pixel's
    normalized value depends on that pixel alone, never on what else is in
    the scene. In a training config ``mean``/``std`` may be left out: the
    training patches supply them. ``levels`` may hold the ``mean``/``std``
    that apply to another Sentinel-2 processing level (``{"L2A": {...}}``):
    the same normalization after the level's radiometry is brought back to
    the training level's (:func:`add_level`, :func:`level_spec`).

``none``
    Values pass through unchanged, except that invalid and non-finite pixels
    are set to 0 so that no NaN reaches a model.

Content-dependent methods (``scene_robust``: one median/IQR per scene;
``patch_robust``: per window) are refused: a scene full of landslides, sea or
cloud would shift its own statistics and with them every prediction.

Inputs are ``(N, C, H, W)`` float arrays (numpy or torch, any device) and a
``(N, H, W)`` boolean valid mask; the output has the input's type, device
and shape and is float32.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from pipeline.core.errors import ModelError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("fixed", "none")
#: Refused methods whose statistics come from the scene or window being predicted.
RETIRED_METHODS: tuple[str, ...] = ("patch_robust", "scene_robust")
#: The training default: fixed statistics taken from the training patches.
DEFAULT_SPEC: dict[str, Any] = {"method": "fixed", "clip": 10.0}
RETRAIN_HINT = (
    "retrain it with fixed statistics in physical units (normalization: {method: fixed} in the "
    "training config, as in configs/train_default.yaml): python -m pipeline train configs/train_default.yaml"
)

#: Floors of the robust scale: max(IQR, REL_FLOOR * |median|, ABS_FLOOR).
REL_FLOOR = 1e-3
ABS_FLOOR = 1e-6

ArrayT = TypeVar("ArrayT", np.ndarray, "torch.Tensor")


def validate_spec(
    spec: Mapping[str, Any] | None, n_channels: int | None = None, *, resolved: bool = True
) -> dict[str, Any]:
    """Return a complete, checked copy of a normalization ``spec``.

    ``None`` gives the training default (``fixed`` from the training
    patches). With ``resolved=True`` (artefacts, inference) a ``fixed`` spec
    must carry its ``mean``/``std``; training configs pass ``resolved=False``
    and may leave them to the training patches. Raises :class:`ModelError`
    naming the offending key when the spec is malformed, uses a retired
    content-dependent method, or has statistics of the wrong length.
    """
    if spec is None:
        spec = DEFAULT_SPEC
    if not isinstance(spec, Mapping):
        raise ModelError(f"normalization must be a mapping with a 'method' key, got {type(spec).__name__}")
    method = spec.get("method", "fixed")
    if method in RETIRED_METHODS:
        raise ModelError(
            f"normalization.method {method!r} took its statistics from the scene being predicted, so a "
            f"detection depended on what else was in the scene; it is no longer supported: {RETRAIN_HINT}"
        )
    if method not in METHODS:
        raise ModelError(f"normalization.method: unknown method {method!r}; expected one of {', '.join(METHODS)}")
    allowed = {"fixed": {"method", "mean", "std", "clip", "source", "levels"}, "none": {"method"}}
    extra = sorted(set(spec) - allowed[method])
    if extra:
        raise ModelError(f"normalization: unknown key(s) {', '.join(extra)} for method {method!r}")
    out: dict[str, Any] = {"method": method}
    if method == "fixed":
        given = [key for key in ("mean", "std") if key in spec]
        if len(given) == 1:
            raise ModelError(f"normalization: {given[0]} given without {'std' if given[0] == 'mean' else 'mean'}")
        if given:
            out.update(_statistics(spec, n_channels))
        elif resolved:
            raise ModelError(
                "normalization.mean/std: required for method 'fixed' (one value per channel, physical units)"
            )
        if spec.get("clip") is not None:
            out["clip"] = _clip_value(spec["clip"])
        if spec.get("source") is not None:
            out["source"] = str(spec["source"])
        levels = spec.get("levels")
        if levels is not None:
            if not isinstance(levels, Mapping) or not set(levels) <= {"L1C", "L2A"}:
                raise ModelError(f"normalization.levels: expected a mapping of L1C/L2A to mean/std, got {levels!r}")
            n = len(out["mean"]) if "mean" in out else n_channels
            out["levels"] = {k: _statistics(v, n) for k, v in levels.items()}
    return out


def add_level(spec: Mapping[str, Any], level: str, path: Sequence[float], gain: Sequence[float]) -> dict[str, Any]:
    """``spec`` with the statistics for inputs of ``level`` whose radiometry is ``x' = gain * (x - path)``
    of the training level's: normalizing ``x'`` with them gives what ``spec`` gives for ``x``."""
    out = validate_spec(spec)
    g = np.asarray(gain, np.float64)
    mean = g * (np.asarray(out["mean"], np.float64) - np.asarray(path, np.float64))
    out["levels"] = {**out.get("levels", {}), level: {"mean": mean.tolist(), "std": (g * out["std"]).tolist()}}
    return validate_spec(out)


def level_spec(spec: Mapping[str, Any], level: str | None) -> dict[str, Any]:
    """The spec to apply to inputs of processing ``level`` (its own statistics when it has them)."""
    out = validate_spec(spec)
    levels = out.pop("levels", {})
    if level in levels:
        out.update(levels[level])
    return out


def is_resolved(spec: Mapping[str, Any]) -> bool:
    """True when ``spec`` can be applied as it is (``none``, or ``fixed`` with its statistics)."""
    return spec.get("method") == "none" or "mean" in spec


def _statistics(spec: Mapping[str, Any], n_channels: int | None) -> dict[str, list[float]]:
    try:
        mean = [float(v) for v in spec["mean"]]
        std = [float(v) for v in spec["std"]]
    except (TypeError, ValueError):
        raise ModelError("normalization.mean/std: expected lists of numbers, one per channel") from None
    if len(mean) != len(std):
        raise ModelError(f"normalization: mean has {len(mean)} values but std has {len(std)}")
    if any(not math.isfinite(m) for m in mean):
        raise ModelError("normalization.mean: every value must be finite")
    if any(not (s > 0 and math.isfinite(s)) for s in std):
        raise ModelError("normalization.std: every value must be positive and finite")
    if n_channels is not None and len(mean) != n_channels:
        raise ModelError(
            f"normalization.mean/std: {len(mean)} values given but the model has {n_channels} channels"
        )
    return {"mean": mean, "std": std}


def _clip_value(value: Any) -> float | None:
    if value is None:
        return None
    clip = float(value)
    if not clip > 0:
        raise ModelError(f"normalization.clip: must be positive or null, got {value!r}")
    return clip


@dataclass(frozen=True)
class BandStats:
    """Per-channel median and robust scale of a patch set (the training patches)."""

    channels: tuple[str, ...]
    median: tuple[float, ...]
    scale: tuple[float, ...]
    n_pixels: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_pixels": self.n_pixels,
            "median": dict(zip(self.channels, self.median, strict=True)),
            "scale": dict(zip(self.channels, self.scale, strict=True)),
        }


def band_stats(values: np.ndarray, channels: Sequence[str]) -> BandStats:
    """Median and robust scale, ``max(IQR, 1e-3 |median|, 1e-6)``, of each row of ``values`` (C, N).

    ``values`` holds the valid pixels of the patches, one row per channel;
    non-finite values are ignored. Without a single valid pixel the result
    is median 0 and scale 1.
    """
    vals = np.asarray(values, dtype=np.float32)
    if vals.ndim != 2 or vals.shape[0] != len(channels):
        raise ModelError(f"band_stats expects ({len(channels)}, N) values, got shape {vals.shape}")
    keep = np.isfinite(vals).all(axis=0)
    vals = vals[:, keep]
    if vals.shape[1] == 0:
        c = len(channels)
        return BandStats(tuple(channels), (0.0,) * c, (1.0,) * c, 0)
    q25, q50, q75 = np.percentile(vals, [25, 50, 75], axis=1)
    scale = _robust_scale_np(q25, q50, q75)
    return BandStats(
        tuple(channels), tuple(float(v) for v in q50), tuple(float(v) for v in scale), int(vals.shape[1])
    )


def fixed_spec(stats: BandStats, clip: float | None = 10.0, source: str | None = None) -> dict[str, Any]:
    """A ``fixed`` spec with ``stats``' medians as ``mean`` and robust scales as ``std``."""
    spec: dict[str, Any] = {"method": "fixed", "mean": list(stats.median), "std": list(stats.scale)}
    if clip is not None:
        spec["clip"] = float(clip)
    if source is not None:
        spec["source"] = source
    return validate_spec(spec, n_channels=len(stats.channels))


def normalize(
    x: ArrayT, valid: ArrayT | None, spec: Mapping[str, Any] | None = None, *, copy: bool = True,
    finite: bool = False,
) -> ArrayT:
    """Normalize a batch ``x`` of shape (N, C, H, W) with ``valid`` (N, H, W).

    ``valid=None`` means every pixel is valid. Returns float32 of the same
    type (numpy or torch, same device) and shape; the input is not modified
    unless ``copy=False`` is given for a float32 numpy array (then it is
    normalized in place, saving a copy in the inference hot path).
    ``finite=True`` tells that every channel is finite wherever ``valid`` is
    true (the inference derives ``valid`` from that): the check, a full pass
    over the batch, is skipped (numpy input with a mask).
    """
    full = validate_spec(spec, n_channels=int(x.shape[1]) if x.ndim == 4 else None)
    if x.ndim != 4:
        raise ModelError(f"normalize expects (N, C, H, W) input, got shape {tuple(x.shape)}")
    if valid is not None and tuple(valid.shape) != (x.shape[0], x.shape[2], x.shape[3]):
        raise ModelError(
            f"normalize: valid mask shape {tuple(valid.shape)} does not match input {tuple(x.shape)}"
        )
    # a tensor means PyTorch is imported; numpy input never needs it. PyTorch may be half-way through
    # its import in another thread (a worker's first tasks): then it has no Tensor yet, and ``x``,
    # made before, is not one
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)
    if tensor is not None and isinstance(x, tensor):
        torch = sys.modules["torch"]
        v = None if valid is None else torch.as_tensor(valid, device=x.device).bool()
        return _normalize_torch(x, v, full)
    v_np = None if valid is None else np.asarray(valid, dtype=bool)
    return _normalize_numpy(np.asarray(x), v_np, full, copy=copy, finite=finite)


# -- numpy ------------------------------------------------------------------
def _zero_invalid(x: np.ndarray, mask: np.ndarray) -> None:
    if not mask.all():
        np.copyto(x, np.float32(0.0), where=~mask[:, None])


def _normalize_numpy(x: np.ndarray, valid: np.ndarray | None, spec: dict[str, Any], copy: bool,
                     finite: bool = False) -> np.ndarray:
    x = x.astype(np.float32, copy=copy)
    if finite and valid is not None:
        mask = valid
    else:
        is_finite = np.isfinite(x).all(axis=1)
        mask = is_finite if valid is None else (valid & is_finite)
    if spec["method"] == "none":
        _zero_invalid(x, mask)
        return x
    x -= np.asarray(spec["mean"], np.float32)[None, :, None, None]
    x /= np.asarray(spec["std"], np.float32)[None, :, None, None]
    clip = spec.get("clip")
    if clip is not None:
        np.clip(x, -clip, clip, out=x)
    _zero_invalid(x, mask)
    return x


def _robust_scale_np(q25: np.ndarray, q50: np.ndarray, q75: np.ndarray) -> np.ndarray:
    scale = np.maximum(q75 - q25, REL_FLOOR * np.abs(q50))
    return np.maximum(scale, ABS_FLOOR).astype(np.float32)


# -- torch ------------------------------------------------------------------
def _normalize_torch(x: torch.Tensor, valid: torch.Tensor | None, spec: dict[str, Any]) -> torch.Tensor:
    import torch

    x = x.detach().to(torch.float32).clone()
    finite = torch.isfinite(x).all(dim=1)
    mask = finite if valid is None else (valid & finite)
    if spec["method"] == "none":
        return torch.where(mask[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    mean = torch.tensor(spec["mean"], dtype=torch.float32, device=x.device)[None, :, None, None]
    std = torch.tensor(spec["std"], dtype=torch.float32, device=x.device)[None, :, None, None]
    x = (x - mean) / std
    clip = spec.get("clip")
    if clip is not None:
        x = x.clamp(-clip, clip)
    return torch.where(mask[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))

"""Tiled inference: a stacked scene -> a landslide probability raster.

:func:`predict` builds a lazy Dask graph over output blocks. Every window of
the global window grid (:class:`tiling.windows.WindowGrid`) runs exactly
once, in the block that holds its origin: that task reads the block plus the
strip its last windows reach into (less than a tile below and to the right),
and sums the weighted window predictions (:mod:`tiling.stitch`) over that
extent. The parts that fall on later blocks are cut off and added to those
blocks, which then divide by the summed weights. Because the window grid is
global, the result does not depend on the block layout; memory depends on
the block size, not the scene size.

Per window: the model's channels are picked by name, normalized with the
artefact's own spec (:func:`pipeline.model.normalization.normalize`), batched
through the network (optionally with test-time augmentation: flips and 90
degree rotations, averaged), and turned into probabilities with a sigmoid.
Ensembles combine members by weighted mean or weighted vote
(:func:`pipeline.model.artefact.ensemble_probability`). Windows without a single
valid pixel are never sent to a model. The output is float32 in [0, 1],
NaN where the input is not valid.

Model instances are cached per process (keyed by the artefact's SHA-256 and
the device): the threaded scheduler shares one instance, and each
distributed worker process loads the artefact from its path once.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import dask
import dask.array as da
import numpy as np
import xarray as xr
from rasterio.windows import Window

from tiling.stitch import add_window, default_margin, finalize, window_weights
from tiling.windows import WindowGrid, block_spans, round_block_size, valid_counts

from pipeline.model.artefact import (
    ModelArtefact,
    check_ensemble,
    ensemble_probability,
    ensemble_threshold,
    load_artefact,
)
from pipeline.core.errors import ConfigError, GridError, InputError, ModelError
from pipeline.core.grid import Grid
from pipeline.model.normalization import level_spec, normalize, validate_spec

if TYPE_CHECKING:
    import torch

    from pipeline.core.config import ModelSection
    from pipeline.model.device import BatchLimit, Precision

# PyTorch and the device helpers are imported by the functions that run the model (in the worker
# processes): building the graph in the main process needs neither.

log = logging.getLogger(__name__)

#: Test-time augmentations: name -> (forward, inverse) on (..., H, W) tensors.
TTA_TRANSFORMS: dict[str, tuple[Any, Any]] = {
    "identity": (lambda t: t, lambda t: t),
    "hflip": (lambda t: t.flip(-1), lambda t: t.flip(-1)),
    "vflip": (lambda t: t.flip(-2), lambda t: t.flip(-2)),
    "rot90": (lambda t: t.rot90(1, (-2, -1)), lambda t: t.rot90(-1, (-2, -1))),
    "rot180": (lambda t: t.rot90(2, (-2, -1)), lambda t: t.rot90(-2, (-2, -1))),
    "rot270": (lambda t: t.rot90(3, (-2, -1)), lambda t: t.rot90(-3, (-2, -1))),
    "transpose": (lambda t: t.transpose(-2, -1), lambda t: t.transpose(-2, -1)),
}
DEFAULT_TTA: tuple[str, ...] = ("identity", "hflip", "vflip", "rot90")


@dataclass(frozen=True)
class InferenceOptions:
    """How :func:`predict` runs. Build it from the YAML with :meth:`from_config`.

    device: auto (CUDA, then MPS, then CPU), cpu, cuda, mps.
    batch_size: windows per forward pass, or auto (device policy); halved on CUDA out-of-memory.
    overlap: pixels shared by neighbouring windows (< tile size); 0 for the fastest run.
    precision: auto (fp16 autocast on CUDA, fp32 elsewhere), fp32, bf16, fp16.
    channels_last: NHWC convolutions; auto follows the device policy.
    tta / tta_transforms: average the model over flips and rotations (names in TTA_TRANSFORMS).
    uncertainty: also return the std across TTA variants and ensemble members.
    ensemble / weights: combine several models by weighted mean or weighted vote.
    block_size: output block edge in pixels (rounded down to a multiple of the stride).
    blend_margin: zero-weight pixels at interior window edges (default overlap // 4).
    torch_threads: set torch's intra-op threads once per process (default: leave as is).
    """

    device: str = "auto"
    batch_size: int | Literal["auto"] = "auto"
    overlap: int = 32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"
    tta: bool = False
    tta_transforms: tuple[str, ...] = DEFAULT_TTA
    uncertainty: bool = False
    ensemble: Literal["mean", "vote"] = "mean"
    weights: tuple[float, ...] | None = None
    block_size: int = 2048
    blend_margin: int | None = None
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        if self.overlap < 0:
            raise ConfigError(f"model.overlap must be >= 0, got {self.overlap}")
        if self.batch_size != "auto" and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ConfigError(f"model.batch_size must be a positive integer or 'auto', got {self.batch_size!r}")
        if self.block_size < 1:
            raise ConfigError(f"grid.block_size must be positive, got {self.block_size}")
        unknown = [t for t in self.tta_transforms if t not in TTA_TRANSFORMS]
        if unknown or not self.tta_transforms:
            raise ConfigError(
                f"test-time augmentations {unknown or '(none)'} are not known; use {', '.join(TTA_TRANSFORMS)}"
            )
        if self.ensemble not in ("mean", "vote"):
            raise ConfigError(f"model.ensemble must be mean or vote, got {self.ensemble!r}")

    @classmethod
    def from_config(cls, section: ModelSection, block_size: int = 2048, **overrides: Any) -> InferenceOptions:
        """Options from the ``model`` section of a scene YAML (and ``grid.block_size``)."""
        values: dict[str, Any] = {
            "device": section.device,
            "batch_size": section.batch_size,
            "overlap": section.overlap,
            "precision": section.precision,
            "tta": section.tta,
            "uncertainty": section.uncertainty,
            "ensemble": section.ensemble,
            "weights": tuple(section.weights) if section.weights is not None else None,
            "block_size": block_size,
        }
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class Prediction:
    """The inference stage's output on ``grid``."""

    probability: xr.DataArray  # (y, x) float32 dask, [0, 1], NaN where no valid input
    uncertainty: xr.DataArray | None  # (y, x) float32 std across members/augmentations
    grid: Grid
    threshold: float = 0.5  # decision threshold of the (combined) model
    windows: int = 0  # windows in the global grid (including skipped ones)
    #: input channels passed through unchanged (``keep`` of :func:`predict`), same graph as the probability
    layers: dict[str, xr.DataArray] = field(default_factory=dict)
    #: label under which the block tasks report the time spent in the model's forward pass to Dask's
    #: performance metrics (:func:`forward_seconds`); unique per prediction
    meter: str = "model-forward"
    #: :func:`predict`'s ``coarse``: (channels, rows // factor, cols // factor) means, or None
    coarse: da.Array | None = None
    coarse_factor: int = 0


# -- model cache (one instance per process) -------------------------------------
@dataclass
class _ModelRef:
    """What a block task needs to find or load one model; cheap to pickle when saved to a file."""

    key: str
    path: str | None
    channel_index: tuple[int, ...]
    normalization: dict[str, Any]
    threshold: float
    module: torch.nn.Module | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if state["path"] is not None:
            state["module"] = None  # workers load the file; weights never travel in the graph
        return state


@dataclass
class _Runtime:
    device: torch.device
    precision: Precision
    channels_last: bool
    limit: BatchLimit


_CACHE: dict[tuple[str, str, bool], torch.nn.Module] = {}
_RUNTIMES: dict[tuple[Any, ...], _Runtime] = {}
_LOCK = threading.Lock()
_PREPARE_LOCK = threading.Lock()
_THREADS_SET: set[int] = set()


def clear_model_cache() -> None:
    """Forget cached model instances in this process."""
    with _LOCK:
        _CACHE.clear()
        _RUNTIMES.clear()


def _prepare(module: torch.nn.Module, rt: _Runtime) -> torch.nn.Module:
    """Eval mode on the runtime's device and memory format (done once per module and runtime)."""
    import torch

    tag = (str(rt.device), rt.channels_last)
    if getattr(module, "_inference_prepared", None) == tag:
        return module
    with _PREPARE_LOCK:
        if getattr(module, "_inference_prepared", None) != tag:
            module = module.eval().to(rt.device)
            if rt.channels_last:
                module = module.to(memory_format=torch.channels_last)
            object.__setattr__(module, "_inference_prepared", tag)
    return module


def _module_for(ref: _ModelRef, rt: _Runtime) -> torch.nn.Module:
    if ref.path is None:
        # in-memory module (not saved): used as given, never cached under a reusable id
        if ref.module is None:
            raise ModelError(f"model {ref.key}: neither a loaded module nor a file to load")
        return _prepare(ref.module, rt)
    cache_key = (ref.key, str(rt.device), rt.channels_last)
    with _LOCK:
        module = _CACHE.get(cache_key)
        if module is not None:
            return module
        if ref.module is not None:  # already loaded in this process
            module = ref.module
        else:
            art = load_artefact(ref.path, device=rt.device)
            if art.sha256 != ref.key:
                raise ModelError(f"{ref.path}: file changed since the run started (checksum differs)")
            module = art.module
            assert module is not None
            log.info("worker pid %d loaded model %s", os.getpid(), ref.path)
        module = _prepare(module, rt)
        _CACHE[cache_key] = module
        return module


def _runtime(opts: InferenceOptions, tile: int) -> _Runtime:
    import torch

    from pipeline.model.device import BatchLimit, auto_batch_size, resolve_device, resolve_precision, use_channels_last

    key = (opts.device, opts.precision, opts.channels_last, opts.batch_size, tile)
    with _LOCK:
        rt = _RUNTIMES.get(key)
        if rt is None:
            device = resolve_device(opts.device)
            precision = resolve_precision(opts.precision, device)
            cl = use_channels_last(device, precision) if opts.channels_last == "auto" else bool(opts.channels_last)
            size = opts.batch_size if opts.batch_size != "auto" else auto_batch_size(device, tile)
            rt = _Runtime(device, precision, cl, BatchLimit(int(size)))
            _RUNTIMES[key] = rt
        if opts.torch_threads and os.getpid() not in _THREADS_SET:
            torch.set_num_threads(opts.torch_threads)
            _THREADS_SET.add(os.getpid())
        return rt


# -- the block task ------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """Everything a block task needs besides its pixels (shared by all blocks)."""

    windows: WindowGrid
    margin: int
    refs: tuple[_ModelRef, ...]
    weights: tuple[float, ...]
    options: InferenceOptions
    with_uncertainty: bool
    keep_index: tuple[int, ...] = ()  # input channels copied to the output after the probability
    meter: str = "model-forward"  # label of the forward-pass time in Dask's performance metrics
    coarse_index: tuple[int, ...] = ()  # input channels averaged onto a coarse grid (:func:`predict`'s ``coarse``)
    coarse_factor: int = 0


def _forward_probs(
    module: torch.nn.Module, x: np.ndarray, rt: _Runtime, transforms: Sequence[str], meter: str = "model-forward",
) -> np.ndarray:
    """Probabilities (T, B, H, W) of ``module`` on normalized ``x`` (B, C, H, W) for each transform.

    The time of each forward pass (device transfer, model, sigmoid, copy back) is reported to
    Dask's performance metrics under ``meter`` when this runs in a Dask worker (a no-op elsewhere).
    """
    import torch
    from distributed.metrics import context_meter

    from pipeline.model.device import autocast, run_batched

    xt = torch.from_numpy(x)
    batch = torch.cat([TTA_TRANSFORMS[name][0](xt) for name in transforms], dim=0) if len(transforms) > 1 else xt

    def fwd(chunk: torch.Tensor) -> torch.Tensor:
        with context_meter.meter(meter):
            chunk = chunk.to(rt.device, non_blocking=True)
            if rt.channels_last:
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), autocast(rt.device, rt.precision):
                logits = module(chunk)
            return torch.sigmoid(logits[:, 0].float()).cpu()

    probs = run_batched(fwd, batch, rt.limit)
    n = x.shape[0]
    out = [TTA_TRANSFORMS[name][1](probs[i * n : (i + 1) * n]) for i, name in enumerate(transforms)]
    return torch.stack(out).numpy()


def _predict_windows(plan: _Plan, x: np.ndarray, v: np.ndarray,
                     normalized: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Combined probability (B, t, t) and optional uncertainty for a batch of windows (``normalized``:
    cut from a block that :func:`_block_normalization` normalized already)."""
    transforms = plan.options.tta_transforms if plan.options.tta else ("identity",)
    per_model = []
    members = []
    for ref in plan.refs:
        rt = _runtime(plan.options, plan.windows.tile)
        module = _module_for(ref, rt)
        xm = x[:, list(ref.channel_index)] if ref.channel_index != tuple(range(x.shape[1])) else x
        # normalize in place when this batch is ours alone (a channel subset copy, or a single model);
        # ``v`` holds only pixels where every model channel is finite (:func:`_predict_owned`)
        xn = xm if normalized else normalize(xm, v, ref.normalization, copy=not (xm is not x or len(plan.refs) == 1),
                                             finite=True)
        probs = _forward_probs(module, xn, rt, transforms, plan.meter)  # (T, B, t, t)
        per_model.append(probs[0] if len(probs) == 1 else probs.mean(axis=0))
        members.append(probs)
    if len(per_model) == 1:
        combined = per_model[0]
    else:
        thresholds = [r.threshold for r in plan.refs]
        combined = ensemble_probability(np.stack(per_model), plan.weights, thresholds, plan.options.ensemble)
    unc = np.concatenate(members).std(axis=0) if plan.with_uncertainty else None
    return combined, unc


@dataclass
class _BlockSums:
    """What a block's own windows produced, on the block plus the strip they reach into."""

    block_valid: np.ndarray  # (bh, bw) bool: the block's own pixels
    acc: np.ndarray | None  # (k, eh, ew) float64 weighted sums, None when no window ran
    wsum: np.ndarray | None  # (eh, ew) float64 summed weights
    kept: np.ndarray | None = None  # (n_keep, bh, bw) float32 input channels passed through
    coarse: np.ndarray | None = None  # (n_coarse, bh // f, bw // f) float32 means of the block's own pixels


def _coarse_means(data: np.ndarray, bh: int, bw: int, plan: _Plan) -> np.ndarray:
    """Means of the finite values of the ``plan.coarse_index`` channels of the block (starting at
    ``data``'s origin, ``bh`` x ``bw``) over cells of ``plan.coarse_factor`` pixels (NaN where a cell
    has none); the block's last rows or columns that do not fill a cell are left out, as the
    coarse grid of the whole scene leaves them out."""
    f = plan.coarse_factor
    rows, cols = bh // f, bw // f
    out = np.empty((len(plan.coarse_index), rows, cols), np.float32)
    for o, k in enumerate(plan.coarse_index):
        x = data[k, : rows * f, : cols * f]
        finite = np.isfinite(x)
        if finite.all():
            out[o] = _cell_sums(x, f) / (f * f)
            continue
        count = _cell_sums(finite, f)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[o] = np.where(count > 0, _cell_sums(np.where(finite, x, np.float32(0)), f) / count, np.nan)
    return out


def _cell_sums(x: np.ndarray, f: int) -> np.ndarray:
    """Sums of ``x`` (rows * f, cols * f) over cells of f x f: the f rows of each cell first, whole
    rows added at once (float32), then the f columns of the f times smaller result (float64): less
    than half the time of one reduction over both axes of the cells."""
    rows, cols = x.shape[0] // f, x.shape[1] // f
    by_rows = x.reshape(rows, f, cols * f).sum(axis=1, dtype=np.float32)
    return by_rows.reshape(rows, cols, f).sum(axis=2, dtype=np.float64)


def _coarse_of(owned: _BlockSums) -> np.ndarray:
    assert owned.coarse is not None
    return owned.coarse


def _block_normalization(plan: _Plan, n_channels: int) -> dict[str, Any] | None:
    """The normalization to apply to a whole block before its windows are cut, when that gives the
    windows exactly what normalizing each batch would: one model reading every channel of the
    block (every normalization method is per-pixel).
    Overlapping windows share pixels (128 px windows every 96 px: 1.8 times the block's pixels), so
    normalizing the block does a little over half the work."""
    if len(plan.refs) != 1 or plan.refs[0].channel_index != tuple(range(n_channels)):
        return None
    return validate_spec(plan.refs[0].normalization, n_channels=n_channels)


def _predict_owned(
    data: np.ndarray,
    valid: np.ndarray | None,
    rows: tuple[int, int],
    cols: tuple[int, int],
    plan: _Plan,
    own: bool = False,
) -> _BlockSums:
    """Run the windows whose origin lies in the block; ``data``/``valid`` start at the block's origin
    (``valid`` None: every pixel with values in all channels). ``own``: ``data`` is this call's to
    change (read for it alone), so a per-pixel normalization is applied to it in place."""
    wg = plan.windows
    tile = wg.tile
    n_out = 2 if plan.with_uncertainty else 1
    bh, bw = rows[1] - rows[0], cols[1] - cols[0]
    # a pixel is valid where the mask says so and every channel has a value
    # (a list index copies: the kept channels never hold the block's input alive)
    kept = np.asarray(data[list(plan.keep_index), :bh, :bw], np.float32) if plan.keep_index else None
    coarse = _coarse_means(data, bh, bw, plan) if plan.coarse_index else None
    model_bands = sorted({i for r in plan.refs for i in r.channel_index})
    if len(model_bands) == data.shape[0]:
        finite = np.isfinite(data).all(axis=0)
    else:  # channels kept for later stages only do not decide validity
        finite = np.isfinite(data[model_bands[0]])
        for i in model_bands[1:]:
            finite &= np.isfinite(data[i])
    valid = finite if valid is None else np.asarray(valid, dtype=bool) & finite
    block_valid = valid[:bh, :bw]
    wr, wc = wg.block_windows(rows, cols)
    if not len(wr) or not len(wc) or not valid.any():
        return _BlockSums(block_valid, None, None, kept, coarse)
    rr, cc = wr - rows[0], wc - cols[0]  # window origins in the slice
    counts = valid_counts(valid, rr, cc, tile)
    todo = [(int(r), int(c)) for i, r in enumerate(rr) for j, c in enumerate(cc) if counts[i, j] > 0]
    if not todo:
        return _BlockSums(block_valid, None, None, kept, coarse)
    spec = _block_normalization(plan, data.shape[0]) if own and data.dtype == np.float32 else None
    if spec is not None:  # after the kept channels were copied: those stay as read
        normalize(data[None], valid[None], spec, copy=False, finite=True)
    eh, ew = valid.shape
    # windows reach past the slice only where the scene is smaller than a tile: pad with invalid pixels
    need_h, need_w = int(rr[-1]) + tile, int(cc[-1]) + tile
    if need_h > eh or need_w > ew:
        ph, pw = max(0, need_h - eh), max(0, need_w - ew)
        data = np.pad(data, ((0, 0), (0, ph), (0, pw)))
        valid = np.pad(valid, ((0, ph), (0, pw)))

    acc = np.zeros((n_out, eh, ew), np.float64)
    wsum = np.zeros((eh, ew), np.float64)
    chunk = max(1, _runtime(plan.options, tile).limit.size)
    for start in range(0, len(todo), chunk):
        group = todo[start : start + chunk]
        x = np.stack([data[:, r : r + tile, c : c + tile] for r, c in group])
        v = np.stack([valid[r : r + tile, c : c + tile] for r, c in group])
        prob, unc = _predict_windows(plan, np.asarray(x, np.float32), v, normalized=spec is not None)
        values = prob[:, None] if unc is None else np.stack([prob, unc], axis=1)
        for k, (r, c) in enumerate(group):
            w = window_weights(tile, wg.overlap, plan.margin, r + rows[0], c + cols[0], wg.height, wg.width)
            add_window(acc, wsum, values[k], w, r, c)
    return _BlockSums(block_valid, acc, wsum, kept, coarse)


class WindowReader(Protocol):
    """Reads windows of a (band, y, x) stack: what :func:`predict` takes as ``reader``."""

    shape: tuple[int, int, int]
    names: Sequence[str]  # the bands, in the order of ``data``'s band coordinate

    def read(self, bands: Sequence[int], window: Window) -> np.ndarray:
        """(len(bands), window.height, window.width) float32 values of ``bands`` in ``window``."""
        ...


def _read_and_predict(reader: WindowReader, bands: Sequence[int], extent: tuple[tuple[int, int], tuple[int, int]],
                      valid: np.ndarray | None, rows: tuple[int, int], cols: tuple[int, int],
                      plan: _Plan) -> _BlockSums:
    """:func:`_predict_owned` on the block's whole extent, read here in one call."""
    (ry0, ry1), (rx0, rx1) = extent
    data = reader.read(list(bands), Window(rx0, ry0, rx1 - rx0, ry1 - ry0))
    return _predict_owned(data, valid, rows, cols, plan, own=True)


def _spill(owned: _BlockSums, rows: tuple[int, int], cols: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """The part of a block's window sums that falls on a later block (copies; slice coordinates)."""
    if owned.acc is None or owned.wsum is None:
        return None
    return owned.acc[:, rows[0] : rows[1], cols[0] : cols[1]].copy(), owned.wsum[rows[0] : rows[1], cols[0] : cols[1]].copy()


def _finish_block(n_out: int, owned: _BlockSums,
                  *spills: tuple[tuple[int, int], tuple[np.ndarray, np.ndarray] | None]) -> np.ndarray:
    """Output (n_out [+ kept], rows, cols) of a block: its own window sums plus what earlier blocks'
    windows left on it, then the kept input channels.

    ``spills`` are ((row, col) offset in the block, (acc, wsum) or None).
    """
    out = _blend_block(n_out, owned, spills)
    if owned.kept is None:
        return out
    return np.concatenate([out, owned.kept])


def _blend_block(n_out: int, owned: _BlockSums,
                 spills: Sequence[tuple[tuple[int, int], tuple[np.ndarray, np.ndarray] | None]]) -> np.ndarray:
    """The block's probability: its own window sums plus the strips earlier blocks left on it, divided
    by the summed weights.

    The block's own sums are read in place (they are the task's input: never modified); only the
    cells of the block that strips cover are copied and added to, each strip in the order given
    (the same sums, bit for bit, as adding every strip to a copy of the whole block).
    """
    bh, bw = owned.block_valid.shape
    if not owned.block_valid.any():
        return np.full((n_out, bh, bw), np.nan, np.float32)
    if owned.acc is not None and owned.wsum is not None:
        acc, wsum = owned.acc[:, :bh, :bw], owned.wsum[:bh, :bw]
    else:
        acc, wsum = np.zeros((n_out, bh, bw), np.float64), np.zeros((bh, bw), np.float64)
    parts = [(r, c, *part) for (r, c), part in spills if part is not None]
    out = finalize(acc, wsum, owned.block_valid)
    if not parts:
        return out
    # cells between every strip edge: each is covered by a fixed set of strips, or by none
    ys = sorted({0, bh, *(r for r, _, _, w in parts), *(r + w.shape[0] for r, _, _, w in parts)})
    xs = sorted({0, bw, *(c for _, c, _, w in parts), *(c + w.shape[1] for _, c, _, w in parts)})
    for y0, y1 in itertools.pairwise(ys):
        for x0, x1 in itertools.pairwise(xs):
            over = [(r, c, a, w) for r, c, a, w in parts
                    if r <= y0 and y1 <= r + w.shape[0] and c <= x0 and x1 <= c + w.shape[1]]
            if not over:
                continue
            cell_acc, cell_w = acc[:, y0:y1, x0:x1].copy(), wsum[y0:y1, x0:x1].copy()
            for r, c, a, w in over:
                cell_acc += a[:, y0 - r : y1 - r, x0 - c : x1 - c]
                cell_w += w[y0 - r : y1 - r, x0 - c : x1 - c]
            out[:, y0:y1, x0:x1] = finalize(cell_acc, cell_w, owned.block_valid[y0:y1, x0:x1])
    return out


# -- the graph -------------------------------------------------------------------
def inference_block_size(block_size: int, tile: int, overlap: int) -> int:
    """The block edge :func:`predict` uses: ``block_size`` rounded down to a multiple of the window stride.

    A stack chunked with this size gives each inference block exactly one
    input chunk plus thin strips of its neighbours (read at once through a
    window reader when :func:`predict` has one). An overlap outside ``[0, tile)`` is a
    :class:`ConfigError` here, where a run first meets the models' window size, before its cluster
    starts (rather than at inference).
    """
    if not 0 <= overlap < tile:
        raise ConfigError(
            f"model.overlap ({overlap}) must be at least 0 and smaller than the model's window of {tile} px"
        )
    return round_block_size(block_size, tile - overlap)


def _as_dask(arr: xr.DataArray, chunks: tuple[int, ...]) -> da.Array:
    data = arr.data
    if isinstance(data, da.Array):
        return data
    return da.from_array(np.asarray(data), chunks=chunks)


def _model_refs(
    models: Sequence[ModelArtefact], bands: Sequence[str], level: str | None = None
) -> tuple[_ModelRef, ...]:
    refs = []
    for m in models:
        index = m.check_channels(bands)
        path = str(m.path) if m.path is not None and m.sha256 else None
        if path is None and m.module is None:
            raise ModelError(f"model {m.name or m.architecture!r} is neither loaded nor saved to a file")
        spec = validate_spec(level_spec(m.normalization, level), n_channels=len(m.channels))
        refs.append(_ModelRef(m.key, path, tuple(index), spec, float(m.threshold), m.module))
    return tuple(refs)


def predict(
    data: xr.DataArray,
    valid: xr.DataArray | None,
    grid: Grid,
    models: Sequence[ModelArtefact],
    options: InferenceOptions | None = None,
    keep: Sequence[str] = (),
    level: str | None = None,
    reader: WindowReader | None = None,
    coarse: tuple[Sequence[str], int] | None = None,
) -> Prediction:
    """Lazy probability raster of ``models`` on a stacked scene.

    ``data`` is (band, y, x) float with channel names in its ``band``
    coordinate (any order, extra bands ignored), ``valid`` is (y, x) bool
    or None, both on ``grid`` (dask-backed or in memory). A pixel is
    predicted where ``valid`` is true (everywhere when None) and every
    channel a model uses has a finite value. ``models`` are loaded
    artefacts (an ensemble when several). Nothing is computed here: the
    returned arrays are dask-backed with chunks of the (stride-rounded) block
    size. Raises :class:`MissingChannelsError` when ``data`` lacks a model
    channel, :class:`GridError` when shapes disagree.

    Each model normalizes with the fixed statistics of its artefact, so a
    pixel's probability depends on its neighbourhood (the model's window)
    alone, not on what else is in the scene. ``level`` is the scene's
    Sentinel-2 processing level (``L1C``, ``L2A`` or None): an artefact
    with statistics for that level uses them (surface reflectance brought
    back to the radiometry the model was trained on).

    ``keep`` names input channels (of ``data``) to pass through unchanged in
    :attr:`Prediction.layers`, from the same block tasks: a later stage that
    needs them (terrain attributes need SLOPE and DEM) gets them without
    stacking the scene again, provided they are stored in the same
    computation as the probability (:func:`write_prediction`). Kept channels
    that the models do not use do not restrict where the models predict.

    ``coarse`` = (channels, factor) asks for those input channels averaged
    onto a grid ``factor`` times coarser (cells of factor x factor pixels,
    the mean of their finite values), from the same block tasks
    (:attr:`Prediction.coarse`; a quicklook's background without reading
    the bands again). Only when the models read those channels and the
    block size is a multiple of ``factor``; else :attr:`Prediction.coarse`
    is None.

    ``reader`` reads any window of ``data`` at once (the stack's own reader,
    :attr:`pipeline.stack.layers.Stack.reader`, same bands in the same order). Each
    block task then reads its whole extent, its windows' reach into the next
    blocks included, in one call, instead of gathering its own chunk of
    ``data`` and strips of its neighbours' chunks (up to four reads, each
    with its own file opens and resampling set-up, and a copy to join them).
    The strips are read twice, by the block and by its neighbour.
    """
    opts = options or InferenceOptions()
    if tuple(data.dims) != ("band", "y", "x"):
        raise InputError(f"inference input must have dims (band, y, x), got {tuple(data.dims)}")
    if valid is not None and tuple(valid.dims) != ("y", "x"):
        raise InputError(f"valid mask must have dims (y, x), got {tuple(valid.dims)}")
    vshape = grid.shape if valid is None else tuple(valid.shape)
    if tuple(data.shape[1:]) != grid.shape or vshape != grid.shape:
        raise GridError(
            f"scene arrays {tuple(data.shape[1:])} / mask {vshape} do not match the grid {grid.shape}"
        )
    weights = check_ensemble(models, opts.weights)
    bands = [str(b) for b in data.coords["band"].values] if "band" in data.coords else []
    refs = _model_refs(models, bands, level)
    missing = [k for k in keep if k not in bands]
    if missing:
        raise InputError(f"channels to keep {missing} are not in the stack (it has {bands})")
    tile = models[0].tile_size
    if opts.overlap >= tile:
        raise ConfigError(f"model.overlap ({opts.overlap}) must be smaller than the tile size ({tile})")
    wg = WindowGrid(grid.height, grid.width, tile, opts.overlap)
    margin = default_margin(opts.overlap) if opts.blend_margin is None else opts.blend_margin
    with_unc = bool(opts.uncertainty and (opts.tta or len(models) > 1))
    if opts.uncertainty and not with_unc:
        log.warning("uncertainty needs test-time augmentation or an ensemble; none is produced")
    # Only the bands some model uses travel through the graph.
    keep_bands = [bands.index(k) for k in keep]
    used = sorted({i for r in refs for i in r.channel_index} | set(keep_bands))
    remap = {old: new for new, old in enumerate(used)}
    refs = tuple(_with_index(r, tuple(remap[i] for i in r.channel_index)) for r in refs)
    meter = f"model-forward-{uuid.uuid4().hex[:12]}"
    block = inference_block_size(opts.block_size, tile, opts.overlap)
    coarse_index, coarse_factor = _coarse_plan(coarse, bands, remap, block)
    plan = _Plan(wg, margin, refs, tuple(float(w) for w in weights), opts, with_unc,
                 tuple(remap[i] for i in keep_bands), meter, coarse_index, coarse_factor)

    x = _as_dask(data, (-1, block, block))
    x = x[used] if used != list(range(x.shape[0])) else x
    if reader is not None and tuple(getattr(reader, "shape", ())) != tuple(data.shape):
        raise GridError(f"the window reader's shape {getattr(reader, 'shape', None)} is not the stack's {data.shape}")
    if reader is not None and [str(n) for n in getattr(reader, "names", bands)] != bands:
        raise InputError(f"the window reader's bands {list(getattr(reader, 'names', []))} are not the stack's {bands}")
    all_valid = valid is None
    if valid is None:
        v = da.ones(grid.shape, chunks=(block, block), dtype=bool)
        valid = xr.DataArray(v, dims=("y", "x"))
    else:
        v = _as_dask(valid, (block, block))
        if v.dtype != bool:
            v = v.astype(bool)

    token = _token(plan, data, valid)
    plan_d = dask.delayed(plan, pure=False, name=f"inference-plan-{token}")
    reader_d = None if reader is None else dask.delayed(reader, pure=False, name=f"inference-reader-{token}")
    n_out = 2 if with_unc else 1
    rows_spans, cols_spans = block_spans(grid.height, block), block_spans(grid.width, block)
    # Stage 1: each block runs the windows whose origin it holds (each window exactly once) and
    # sums them on its own pixels plus the strip they reach into. Stage 2: each block adds the
    # strips earlier blocks left on it and divides by the summed weights.
    owned: dict[tuple[int, int], Any] = {}
    spills: dict[tuple[int, int], list[Any]] = {(i, j): [] for i in range(len(rows_spans)) for j in range(len(cols_spans))}
    for i, rows in enumerate(rows_spans):
        for j, cols in enumerate(cols_spans):
            (ry0, ry1), (rx0, rx1) = wg.block_read_extent(rows, cols)
            vpart = None if all_valid else _copied(v[ry0:ry1, rx0:rx1])
            if reader_d is not None:
                task = dask.delayed(_read_and_predict, pure=True)(
                    reader_d, used, ((ry0, ry1), (rx0, rx1)), vpart, rows, cols, plan_d,
                    dask_key_name=f"predict-windows-{token}-{rows[0]}-{cols[0]}",
                )
            else:
                task = dask.delayed(_predict_owned, pure=True)(
                    _copied(x[:, ry0:ry1, rx0:rx1]), vpart, rows, cols, plan_d,
                    dask_key_name=f"predict-windows-{token}-{rows[0]}-{cols[0]}",
                )
            owned[i, j] = task
            for k in range(i, len(rows_spans)):
                for m in range(j, len(cols_spans)):
                    (ty0, ty1), (tx0, tx1) = rows_spans[k], cols_spans[m]
                    y0, y1, x0, x1 = max(ry0, ty0), min(ry1, ty1), max(rx0, tx0), min(rx1, tx1)
                    if (k, m) == (i, j) or y0 >= y1 or x0 >= x1:
                        continue
                    part = dask.delayed(_spill, pure=True)(
                        task, (y0 - ry0, y1 - ry0), (x0 - rx0, x1 - rx0),
                        dask_key_name=f"predict-spill-{token}-{rows[0]}-{cols[0]}-{ty0}-{tx0}",
                    )
                    spills[k, m].append(((y0 - ty0, x0 - tx0), part))
    grid_of_blocks = []
    for i, rows in enumerate(rows_spans):
        row_blocks = []
        for j, cols in enumerate(cols_spans):
            task = dask.delayed(_finish_block, pure=True)(
                n_out, owned[i, j], *spills[i, j], dask_key_name=f"predict-block-{token}-{rows[0]}-{cols[0]}",
            )
            shape = (n_out + len(keep), rows[1] - rows[0], cols[1] - cols[0])
            row_blocks.append(da.from_delayed(task, shape=shape, dtype=np.float32))
        grid_of_blocks.append(row_blocks)
    out = da.block(grid_of_blocks)
    coarse_means = None
    if coarse_index:
        f = coarse_factor
        coarse_means = da.block([[
            da.from_delayed(dask.delayed(_coarse_of, pure=True)(
                owned[i, j], dask_key_name=f"predict-coarse-{token}-{rows[0]}-{cols[0]}"),
                shape=(len(coarse_index), (rows[1] - rows[0]) // f, (cols[1] - cols[0]) // f), dtype=np.float32)
            for j, cols in enumerate(cols_spans)] for i, rows in enumerate(rows_spans)])

    coords = {k: data.coords[k] for k in ("y", "x") if k in data.coords}
    probability = _raster(out[0], coords, grid, "landslide probability")
    uncertainty = _raster(out[1], coords, grid, "landslide probability standard deviation") if with_unc else None
    layers = {name: _raster(out[n_out + k], coords, grid, name) for k, name in enumerate(keep)}
    threshold = ensemble_threshold(models, opts.weights, opts.ensemble)
    log.info(
        "inference graph: %d x %d px, %d windows of %d px (overlap %d), %d block(s) of %d px, %d model(s)%s",
        grid.height, grid.width, len(wg), tile, opts.overlap, len(rows_spans) * len(cols_spans), block,
        len(models), " with TTA" if opts.tta else "",
    )
    return Prediction(probability, uncertainty, grid, threshold, len(wg), layers, meter, coarse_means, coarse_factor)


def _coarse_plan(coarse: tuple[Sequence[str], int] | None, bands: Sequence[str], remap: dict[int, int],
                 block: int) -> tuple[tuple[int, ...], int]:
    """Channel indices (in the block tasks' data) and factor of :func:`predict`'s ``coarse``, or
    ``((), 0)`` when the block tasks cannot compute it: a channel the models do not read, or blocks
    that do not start on the coarse grid."""
    if coarse is None:
        return (), 0
    names, factor = coarse
    factor = int(factor)
    if factor < 1 or block % factor or not all(n in bands and bands.index(n) in remap for n in names):
        log.debug("coarse means of %s by %d not computed with the inference (block %d px)", list(names), factor, block)
        return (), 0
    return tuple(remap[bands.index(n)] for n in names), factor


async def _send_heartbeat(dask_worker: Any) -> None:  # runs on each worker
    await dask_worker.heartbeat()


def forward_seconds(client: Any, prediction: Prediction, *, flush: bool = False) -> float | None:
    """Seconds the workers of ``client`` spent in the model's forward pass for ``prediction``
    (summed over worker threads: with two threads fully busy, 2 s per second of wall time), from
    Dask's performance metrics; None when the scheduler has no record of it.

    Workers send their metrics with their heartbeats (every 0.5 s on a small cluster, up to a few
    seconds on a large one): read this when the prediction has been computed for a while (the run
    does it at its very end). ``flush`` asks every worker for a heartbeat first, so that the last
    tasks count as well: for a cluster of one's own, not for a shared one.
    """
    label = prediction.meter

    def collect(dask_scheduler: Any) -> float | None:  # runs on the scheduler
        values = [v for k, v in dask_scheduler.cumulative_worker_metrics.items()
                  if isinstance(k, tuple) and len(k) == 4 and k[2] == label and k[3] == "seconds"]
        return float(sum(values)) if values else None

    try:
        if flush:
            client.run(_send_heartbeat)
        return client.run_on_scheduler(collect)
    except Exception as exc:  # noqa: BLE001 - a figure for the report, never a reason to fail a run
        log.debug("no forward-pass metrics from the scheduler: %s", exc)
        return None


def _copied(arr: da.Array) -> da.Array:
    """The slice with every chunk copied out of its source chunk.

    Dask slices are numpy views: a thin halo strip would keep its whole
    source chunk (14 bands x block x block) alive until the block that needs
    it runs, so a full row of input chunks could stay in memory. Copies let
    each source chunk go as soon as its pieces are cut.
    """
    return arr.map_blocks(np.ascontiguousarray, dtype=arr.dtype)


def _with_index(ref: _ModelRef, index: tuple[int, ...]) -> _ModelRef:
    return _ModelRef(ref.key, ref.path, index, ref.normalization, ref.threshold, ref.module)


def _token(plan: _Plan, data: xr.DataArray, valid: xr.DataArray) -> str:
    from dask.base import tokenize

    opts = plan.options
    return tokenize(
        getattr(data.data, "name", id(data)), getattr(valid.data, "name", id(valid)),
        [r.key for r in plan.refs], [r.channel_index for r in plan.refs], [r.normalization for r in plan.refs],
        plan.weights, plan.margin, plan.keep_index,
        plan.windows, opts,
        plan.meter,  # unique per prediction: its tasks, and so its forward-pass metrics, are its own
    )


def _raster(arr: da.Array, coords: dict[str, Any], grid: Grid, name: str) -> xr.DataArray:
    out = xr.DataArray(arr, dims=("y", "x"), coords=coords, name=name.replace(" ", "_"))
    out.attrs["long_name"] = name
    try:
        import rioxarray  # noqa: F401

        out = out.rio.write_crs(grid.crs).rio.write_transform(grid.transform)
    except ImportError:  # pragma: no cover - rioxarray is a dependency
        pass
    return out


def write_probability(
    prediction: Prediction,
    path: str | os.PathLike[str],
    dtype: Literal["uint8", "float16", "float32"] = "uint8",
) -> Path:
    """Write the probability raster as a tiled COG (via :func:`pipeline.io.cog.write_cog`).

    ``uint8`` scales [0, 1] to 0..254 with 255 as nodata; float types keep
    NaN as nodata.
    """
    return write_prediction(prediction, path, dtype=dtype)[0]


def write_prediction(
    prediction: Prediction,
    path: str | os.PathLike[str],
    *,
    uncertainty_path: str | os.PathLike[str] | None = None,
    layers_path: str | os.PathLike[str] | None = None,
    dtype: Literal["uint8", "float16", "float32"] = "uint8",
    probability_cog: bool = True,
    also: Callable[[Any], Sequence[Any]] | None = None,
) -> Any:
    """Write the probability COG, and the uncertainty COG and kept layers when asked, in one computation.

    The model runs once for all of them (they come from the same block
    tasks; writing them one after the other would run it again for each).
    The kept layers (:attr:`Prediction.layers`, float32, one band each in
    their order, NaN as no data) go to a plain tiled GeoTIFF at
    ``layers_path``, an intermediate file for later stages of the run.
    ``probability_cog=False`` writes the probability as a plain tiled
    GeoTIFF instead (uncompressed, no overviews: for a caller that reads it
    back at once and makes the COG later, :func:`pipeline.io.cog.cog_from_tiff`).
    Returns the paths written, probability first.

    ``also`` is called with the probability as it is stored (a dask array:
    uint8 codes with 255 for no data, or floats with NaN) and returns more
    dask collections to compute in the same computation, from the same
    blocks (:func:`pipeline.io.cog.write_rasters`); the result is then
    ``(paths, their values)``.
    """
    from pipeline.io.cog import RasterOutput, write_rasters

    prob = prediction.probability
    if dtype == "uint8":
        # DataArray.round, not np.round: np.round would compute the whole lazy raster here
        scaled = xr.where(prob.isnull(), 255.0, (prob * 254.0).round())
        outputs = [RasterOutput(scaled, Path(path), "uint8", 255, tags={"scale": str(1 / 254), "offset": "0"},
                                cog=probability_cog)]
    elif dtype in ("float16", "float32"):
        outputs = [RasterOutput(prob, Path(path), dtype, float("nan"), cog=probability_cog)]
    else:
        raise ConfigError(f"probability dtype must be uint8, float16 or float32, got {dtype!r}")
    if uncertainty_path is not None:
        if prediction.uncertainty is None:
            raise ConfigError("no uncertainty to write: it needs test-time augmentation or an ensemble")
        outputs.append(RasterOutput(prediction.uncertainty, Path(uncertainty_path), "float32", float("nan")))
    if layers_path is not None and prediction.layers:
        names = list(prediction.layers)
        stacked = xr.concat([prediction.layers[n] for n in names], dim="band")
        outputs.append(RasterOutput(stacked, Path(layers_path), "float32", float("nan"), band_names=names,
                                    cog=False))
    if also is None:
        return write_rasters(outputs, prediction.grid)
    return write_rasters(outputs, prediction.grid, also=lambda stored: also(stored[0]))

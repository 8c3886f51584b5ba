"""The block task: run the windows whose origin lies in one block through the models and sum them.

A block task gets the pixels of its block plus the strip its last windows
reach into (cut from the stack's chunks, or read at once through a
:class:`WindowReader`). A pixel is valid where the mask says so and every
channel a model reads has a value; windows without a single valid pixel never
reach a model. The others go through the models in batches: each model's
channels picked by index, normalized with the artefact's own statistics
(:func:`pipeline.model.normalization.normalize`), optionally augmented
(flips and rotations, averaged), turned into probabilities with a sigmoid
(:mod:`pipeline.inference.forward`), and ensemble members combined
(:func:`pipeline.model.ensemble.ensemble_probability`; on a GPU, the same on
the device). The window predictions are summed with their blend weights into
:class:`tiling.stitch.BlockSums`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from rasterio.windows import Window

from pipeline.inference.forward import combine_on_device, combines_on_host, forward_probs
from pipeline.inference.options import InferenceOptions
from pipeline.inference.runtime import ModelRef, module_for, runtime_for
from pipeline.model.ensemble import ensemble_probability
from pipeline.model.normalization import normalize, validate_spec
from tiling.stitch import BlockSums, window_weights
from tiling.windows import Span, WindowGrid, valid_counts

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class BlockPlan:
    """Everything a block task needs besides its pixels (shared by all blocks)."""

    windows: WindowGrid
    margin: int  # zero-weight pixels at interior window edges
    refs: tuple[ModelRef, ...]
    weights: tuple[float, ...]  # ensemble member weights (sum 1)
    options: InferenceOptions
    with_uncertainty: bool
    keep_index: tuple[int, ...] = ()  # input channels copied to the output after the probability
    meter: str = "model-forward"  # label of the forward-pass time in Dask's performance metrics
    coarse_index: tuple[int, ...] = ()  # input channels averaged onto a coarse grid
    coarse_factor: int = 0

    @property
    def outputs(self) -> int:
        """Blended values per pixel: the probability, and its spread with uncertainty."""
        return 2 if self.with_uncertainty else 1


@dataclass
class BlockResult:
    """A block task's result: its window sums, and what it passes through from its input."""

    sums: BlockSums
    kept: np.ndarray | None = None  # (n_keep, bh, bw) float32 input channels passed through
    coarse: np.ndarray | None = None  # (n_coarse, bh // f, bw // f) float32 means of the block's own pixels


class WindowReader(Protocol):
    """Reads windows of a (band, y, x) stack: what :func:`pipeline.inference.tiled.predict` takes as ``reader``."""

    shape: tuple[int, int, int]
    names: Sequence[str]  # the bands, in the order of ``data``'s band coordinate

    def read(self, bands: Sequence[int], window: Window) -> np.ndarray:
        """(len(bands), window.height, window.width) float32 values of ``bands`` in ``window``."""
        ...


def read_and_predict(reader: WindowReader, bands: Sequence[int], extent: tuple[Span, Span],
                     valid: np.ndarray | None, block: tuple[Span, Span], plan: BlockPlan) -> BlockResult:
    """:func:`predict_block` on the block's whole ``extent``, read here in one call."""
    (ry0, ry1), (rx0, rx1) = extent
    data = reader.read(list(bands), Window(rx0, ry0, rx1 - rx0, ry1 - ry0))
    return predict_block(data, valid, block, plan, own=True)


def predict_block(data: np.ndarray, valid: np.ndarray | None, block: tuple[Span, Span], plan: BlockPlan,
                  own: bool = False) -> BlockResult:
    """Run the windows whose origin lies in ``block`` (rows, cols); ``data``/``valid`` start at the
    block's origin (``valid`` None: every pixel with values in all channels). ``own``: ``data`` is this
    call's to change (read for it alone), so a per-pixel normalization is applied to it in place."""
    rows, cols = block
    wg, tile = plan.windows, plan.windows.tile
    bh, bw = rows[1] - rows[0], cols[1] - cols[0]
    # a list index copies: the kept channels never hold the block's input alive
    kept = np.asarray(data[list(plan.keep_index), :bh, :bw], np.float32) if plan.keep_index else None
    coarse = _coarse_means(data, bh, bw, plan) if plan.coarse_index else None
    valid = _valid_pixels(data, valid, plan)
    block_valid = valid[:bh, :bw]
    wr, wc = wg.block_windows(rows, cols)
    rr, cc = wr - rows[0], wc - cols[0]  # window origins in the slice
    todo = _windows_to_run(valid, rr, cc, tile) if valid.any() else []
    if not todo:
        return BlockResult(BlockSums(block_valid, None, None), kept, coarse)
    spec = _block_normalization(plan, data.shape[0]) if own and data.dtype == np.float32 else None
    if spec is not None:  # after the kept channels were copied: those stay as read
        normalize(data[None], valid[None], spec, copy=False, finite=True)
    sums = BlockSums.zeros(block_valid, plan.outputs, valid.shape)
    # windows reach past the slice only where the scene is smaller than a tile: pad with invalid pixels
    need_h, need_w = int(rr[-1]) + tile, int(cc[-1]) + tile
    ph, pw = max(0, need_h - valid.shape[0]), max(0, need_w - valid.shape[1])
    if ph or pw:
        data = np.pad(data, ((0, 0), (0, ph), (0, pw)))
        valid = np.pad(valid, ((0, ph), (0, pw)))
    chunk = max(1, runtime_for(plan.options, tile).limit.size)
    for start in range(0, len(todo), chunk):
        group = todo[start : start + chunk]
        x = np.stack([data[:, r : r + tile, c : c + tile] for r, c in group])
        v = np.stack([valid[r : r + tile, c : c + tile] for r, c in group])
        prob, unc = predict_windows(plan, np.asarray(x, np.float32), v, normalized=spec is not None)
        values = prob[:, None] if unc is None else np.stack([prob, unc], axis=1)
        for k, (r, c) in enumerate(group):
            w = window_weights(tile, wg.overlap, plan.margin, r + rows[0], c + cols[0], wg.height, wg.width)
            sums.add(values[k], w, r, c)
    return BlockResult(sums, kept, coarse)


def _valid_pixels(data: np.ndarray, valid: np.ndarray | None, plan: BlockPlan) -> np.ndarray:
    """Where the mask (when given) says valid and every channel a model reads has a finite value."""
    model_bands = sorted({i for r in plan.refs for i in r.channel_index})
    if len(model_bands) == data.shape[0]:
        finite = np.isfinite(data).all(axis=0)
    else:  # channels kept for later stages only do not decide validity
        finite = np.isfinite(data[model_bands[0]])
        for i in model_bands[1:]:
            finite &= np.isfinite(data[i])
    return finite if valid is None else np.asarray(valid, dtype=bool) & finite


def _windows_to_run(valid: np.ndarray, rows: np.ndarray, cols: np.ndarray, tile: int) -> list[tuple[int, int]]:
    """Origins (row, col) in ``valid``'s coordinates of the windows with at least one valid pixel."""
    if not len(rows) or not len(cols):
        return []
    counts = valid_counts(valid, rows, cols, tile)
    return [(int(r), int(c)) for i, r in enumerate(rows) for j, c in enumerate(cols) if counts[i, j] > 0]


def _block_normalization(plan: BlockPlan, n_channels: int) -> dict[str, Any] | None:
    """The normalization to apply to a whole block before its windows are cut, when that gives the
    windows exactly what normalizing each batch would: one model reading every channel of the
    block (every normalization method is per-pixel). Overlapping windows share pixels, so
    normalizing the block once does less work than normalizing every window."""
    if len(plan.refs) != 1 or plan.refs[0].channel_index != tuple(range(n_channels)):
        return None
    return validate_spec(plan.refs[0].normalization, n_channels=n_channels)


def predict_windows(plan: BlockPlan, x: np.ndarray, v: np.ndarray,
                    normalized: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Combined probability (B, t, t) and optional uncertainty for a batch of windows ``x`` (B, C, t, t)
    with valid pixels ``v`` (``normalized``: cut from a block normalized already).

    On the CPU each model's probabilities per augmentation come back as arrays and are combined
    with numpy; on another device they are combined there and only the results come back
    (:func:`pipeline.inference.forward.combine_on_device`), all on this thread's own stream.
    """
    from pipeline.model.device import device_stream

    rt = runtime_for(plan.options, plan.windows.tile)
    on_host = combines_on_host(rt.device)
    per_model: list[Any] = []
    members: list[Any] = []
    with device_stream(rt.device):
        for ref in plan.refs:
            module = module_for(ref, rt)
            xm = x[:, list(ref.channel_index)] if ref.channel_index != tuple(range(x.shape[1])) else x
            # normalize in place when this batch is ours alone (a channel subset copy, or a single model);
            # ``v`` holds only pixels where every model channel is finite (:func:`_valid_pixels`)
            xn = xm if normalized else normalize(xm, v, ref.normalization,
                                                 copy=not (xm is not x or len(plan.refs) == 1), finite=True)
            probs = forward_probs(module, xn, rt, plan.options.transforms, plan.meter, valid=v,
                                  name=ref.name or ref.key)  # (T, B, t, t) on the device
            if on_host:
                probs = probs.numpy()
            per_model.append(probs[0] if len(probs) == 1 else (probs.mean(axis=0) if on_host else probs.mean(dim=0)))
            members.append(probs)
        if on_host:
            return _combine_on_host(plan, per_model, members)
        return _results_to_host(plan, per_model, members)


def _combine_on_host(plan: BlockPlan, per_model: list[np.ndarray],
                     members: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """The ensemble probability and the spread over all members and augmentations, with numpy."""
    if len(per_model) == 1:
        combined = per_model[0]
    else:
        thresholds = [r.threshold for r in plan.refs]
        combined = ensemble_probability(np.stack(per_model), plan.weights, thresholds, plan.options.ensemble)
    unc = np.concatenate(members).std(axis=0) if plan.with_uncertainty else None
    return combined, unc


def _results_to_host(plan: BlockPlan, per_model: list[torch.Tensor],
                     members: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray | None]:
    """The ensemble probability and spread computed on the device, copied back in one transfer."""
    import torch
    from distributed.metrics import context_meter

    thresholds = [r.threshold for r in plan.refs]
    combined, unc = combine_on_device(per_model, members, plan.weights, thresholds, plan.options.ensemble,
                                      plan.with_uncertainty)
    with context_meter.meter(plan.meter):  # waits for the device: its time counts as the forward pass's
        both = (combined[None] if unc is None else torch.stack([combined, unc])).cpu().numpy()
    return both[0], (None if unc is None else both[1])


def _coarse_means(data: np.ndarray, bh: int, bw: int, plan: BlockPlan) -> np.ndarray:
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
    rows added at once (float32), then the f columns of the f times smaller result (float64)."""
    rows, cols = x.shape[0] // f, x.shape[1] // f
    by_rows = x.reshape(rows, f, cols * f).sum(axis=1, dtype=np.float32)
    return by_rows.reshape(rows, cols, f).sum(axis=2, dtype=np.float64)

"""The block task: run the windows whose origin lies in one block through the models and sum them.

A block task gets the pixels of its block plus the strip its last windows
reach into (cut from the stack's chunks, or read through a
:class:`WindowReader` in strips of window rows, so that it never holds the
whole extent). A pixel is valid where the mask says so and every channel a
model reads has a value; windows without a single valid pixel never reach a
model. The others are cut into one reused batch buffer and go through the
models batch by batch: each model's channels picked by index, normalized with
the artefact's own statistics (:func:`pipeline.model.normalization.normalize`),
optionally augmented (flips and rotations, averaged), turned into
probabilities with a sigmoid (:mod:`pipeline.inference.forward`), and
ensemble members combined (:func:`pipeline.model.ensemble.ensemble_probability`;
on a GPU, the same on the device). The window predictions are summed with
their blend weights into :class:`tiling.stitch.RollingSums`, which keeps float64
sums only for the rows windows still reach.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
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
from tiling.stitch import BlockSums, CompactSums, RollingSums, window_weights
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

    sums: BlockSums | CompactSums  # BlockSums without sums when no window ran
    kept: np.ndarray | None = None  # (n_keep, bh, bw) float32 input channels passed through
    coarse: np.ndarray | None = None  # (n_coarse, bh // f, bw // f) float32 means of the block's own pixels


class WindowReader(Protocol):
    """Reads windows of a (band, y, x) stack: what :func:`pipeline.inference.tiled.predict` takes as ``reader``."""

    shape: tuple[int, int, int]
    names: Sequence[str]  # the bands, in the order of ``data``'s band coordinate

    def read(self, bands: Sequence[int], window: Window) -> np.ndarray:
        """(len(bands), window.height, window.width) float32 values of ``bands`` in ``window``."""
        ...


#: Input a block task holds at once, roughly: a larger read extent is read and run in strips of
#: window rows. Each pixel is read, checked and normalized on its own, and the windows run in the
#: batches of one pass over the whole extent, so the results do not depend on it.
STRIP_BYTES = 32 * 2**20


def read_and_predict(reader: WindowReader, bands: Sequence[int], extent: tuple[Span, Span],
                     valid: np.ndarray | None, block: tuple[Span, Span], plan: BlockPlan,
                     kept: bool = True) -> BlockResult:
    """:func:`predict_block` on the block's whole ``extent``, read here: in one call, or in strips
    of window rows (:func:`strip_rows`). ``kept=False``: the kept channels are not passed through
    (the caller reads them again)."""
    (ry0, ry1), (rx0, rx1) = extent
    task = _BlockTask(plan, block, (ry1 - ry0, rx1 - rx0), kept)
    strips = strip_rows(plan, block, (ry1 - ry0, rx1 - rx0), len(bands))
    # a stack's reader keeps its JPEG 2000 files open for the strips: their tiles are decoded once
    keep_open = getattr(reader, "files_open_in_thread", None) if len(strips) > 1 else None
    with keep_open() if keep_open is not None else contextlib.nullcontext():
        for y0, y1, own_end in strips:
            # read straight into the task: no name here keeps a strip alive once its windows are cut
            task.add(reader.read(list(bands), Window(rx0, ry0 + y0, rx1 - rx0, y1 - y0)),
                     None if valid is None else valid[y0:y1], y0, own_end, own=True)
    result = task.result()
    del task
    trim_heap()
    return result


def trim_heap() -> None:
    """Hand the memory freed in this process back to the system (at the end of a block task). glibc
    keeps freed allocations of up to 32 MiB (a strip, a batch, the model's activations) in the heap
    of the thread that made them, so a worker's threads would each hold on to a block task's worth.
    Not after every strip: the model's next activations would then fault their pages in again.
    No-op without glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def predict_block(data: np.ndarray, valid: np.ndarray | None, block: tuple[Span, Span], plan: BlockPlan,
                  own: bool = False) -> BlockResult:
    """Run the windows whose origin lies in ``block`` (rows, cols); ``data``/``valid`` start at the
    block's origin (``valid`` None: every pixel with values in all channels). ``own``: ``data`` is this
    call's to change (read for it alone), so a per-pixel normalization is applied to it in place."""
    task = _BlockTask(plan, block, (data.shape[1], data.shape[2]))
    task.add(data, valid, 0, data.shape[1], own)
    return task.result()


def strip_rows(plan: BlockPlan, block: tuple[Span, Span], shape: tuple[int, int],
               n_bands: int) -> list[tuple[int, int, int]]:
    """The strips :func:`read_and_predict` reads a block's extent of ``shape`` (rows, cols) in, for
    ``n_bands`` float32 bands: (first row, end row, end of its own rows) in the extent. Own rows,
    those of the windows the strip runs, come in multiples of the stride (and of the coarse cells)
    and hold about :data:`STRIP_BYTES` of input with the rows their windows reach below them."""
    (rows, cols), (eh, ew), wg = block, shape, plan.windows
    unit = math.lcm(wg.stride, plan.coarse_factor or 1)
    step = max(unit, (STRIP_BYTES // max(1, 4 * n_bands * ew) - (wg.tile - wg.stride)) // unit * unit)
    starts = list(range(0, max(1, rows[1] - rows[0]), step))
    origins = wg.block_windows(rows, cols)[0] - rows[0]
    out = []
    for y0, own_end in zip(starts, [*starts[1:], eh], strict=True):
        mine = origins[(origins >= y0) & (origins < own_end)]
        out.append((y0, min(eh, max(own_end, int(mine[-1]) + wg.tile if len(mine) else own_end)), own_end))
    return out


class _BlockTask:
    """One block's windows, fed strip by strip: consecutive rows of the read extent, each strip
    with the windows whose origin row lies in its own rows. The windows run in the order and
    batches of one pass over the whole extent; a strip is dropped once its windows are cut into
    the batch being filled."""

    def __init__(self, plan: BlockPlan, block: tuple[Span, Span], shape: tuple[int, int], kept: bool = True) -> None:
        (rows, cols), f = block, plan.coarse_factor
        self.keep_index = plan.keep_index if kept else ()
        self.plan, self.origin, self.shape = plan, (rows[0], cols[0]), shape
        self.bh, self.bw = rows[1] - rows[0], cols[1] - cols[0]
        wr, wc = plan.windows.block_windows(rows, cols)
        self.rr, self.cc = wr - rows[0], wc - cols[0]  # window origins in the extent
        self.block_valid = np.zeros((self.bh, self.bw), bool)
        self.kept = np.empty((len(self.keep_index), self.bh, self.bw), np.float32) if self.keep_index else None
        self.coarse = (np.empty((len(plan.coarse_index), self.bh // f, self.bw // f), np.float32)
                       if plan.coarse_index else None)
        self.sums: RollingSums | None = None
        self.batch: _Batch | None = None
        self.normalized = False

    def add(self, data: np.ndarray, valid: np.ndarray | None, y0: int, own_end: int, own: bool) -> None:
        """Rows ``y0`` onwards of the extent: pass its own rows through, cut and run its windows."""
        plan, tile = self.plan, self.plan.windows.tile
        rows = min(own_end, self.bh) - y0  # of the block's own pixels
        for o, k in enumerate(self.keep_index):  # copies: the kept channels never hold the input alive
            self.kept[o, y0 : y0 + rows] = data[k, :rows, : self.bw]  # type: ignore[index]
        if self.coarse is not None:
            f = plan.coarse_factor
            self.coarse[:, y0 // f : (y0 + rows) // f] = _coarse_means(data, rows, self.bw, plan)
        valid = _valid_pixels(data, valid, plan)
        self.block_valid[y0 : y0 + rows] = valid[:rows, : self.bw]
        rr = self.rr[(self.rr >= y0) & (self.rr < own_end)] - y0
        todo = _windows_to_run(valid, rr, self.cc, tile) if valid.any() else []
        if not todo:
            return
        spec = _block_normalization(plan, data.shape[0]) if own and data.dtype == np.float32 else None
        if spec is not None:  # after the kept channels were copied: those stay as read
            normalize(data[None], valid[None], spec, copy=False, finite=True)
        self.normalized = spec is not None
        if self.sums is None:  # the first rows and columns that earlier blocks' windows reach
            wg = plan.windows
            top = _reach(wg.row_starts, self.origin[0], tile, wg.height)
            self.sums = RollingSums(self.block_valid, plan.outputs, self.shape, top,
                                    _reach(wg.col_starts, self.origin[1], tile, wg.width))
        # windows reach past the extent only where the scene is smaller than a tile: pad with invalid pixels
        ph, pw = max(0, int(rr[-1]) + tile - valid.shape[0]), max(0, int(self.cc[-1]) + tile - valid.shape[1])
        if ph or pw:
            data = np.pad(data, ((0, 0), (0, ph), (0, pw)))
            valid = np.pad(valid, ((0, ph), (0, pw)))
        self.sums.reach(y0 + max(r for r, _ in todo) + tile)
        self._cut(data, valid, y0, todo)
        # rows before the next window to run, and before the next strip's windows, are complete
        assert self.batch is not None
        self.sums.settle(self.batch.origins[0][0] if self.batch.origins else own_end)

    def _cut(self, data: np.ndarray, valid: np.ndarray, y0: int, todo: Sequence[tuple[int, int]]) -> None:
        """Cut the windows ``todo`` of a strip (origins in it; its row ``y0`` in the extent) into the
        batch, running the batch whenever it is full."""
        if self.batch is None:  # the batch limit when the block's first windows run, for the whole block
            rt = runtime_for(self.plan.options, self.plan.windows.tile)
            self.batch = _Batch(max(1, rt.limit.size), data.shape[0], self.plan.windows.tile,
                                rt.channels_last and rt.device.type == "cpu")
        for r, c in todo:
            if self.batch.cut(data, valid, r, c, y0):
                self._run_batch()

    def _run_batch(self) -> None:
        batch = self.batch
        if batch is None or not batch.origins:
            return
        n = len(batch.origins)
        prob, unc = predict_windows(self.plan, batch.x[:n], batch.v[:n], normalized=self.normalized)
        assert self.sums is not None
        _add_windows(self.sums, self.plan, prob, unc, batch.origins, self.origin)
        batch.origins = []

    def result(self) -> BlockResult:
        self._run_batch()  # the last, shorter batch
        sums = self.sums.result() if self.sums is not None else BlockSums(self.block_valid, None, None)
        return BlockResult(sums, self.kept, self.coarse)


class _Batch:
    """The batch being filled, in buffers reused for every batch of a block: values (size, C, tile,
    tile) float32, valid pixels (size, tile, tile) and the windows' origins in the extent. ``nhwc``:
    the values in the channels-last layout the model reads, in memory from PyTorch's allocator,
    which the forward pass would otherwise copy them into."""

    def __init__(self, size: int, channels: int, tile: int, nhwc: bool) -> None:
        if nhwc:
            import torch

            self.x = torch.empty((size, tile, tile, channels), dtype=torch.float32).numpy().transpose(0, 3, 1, 2)
        else:
            self.x = np.empty((size, channels, tile, tile), np.float32)
        self.v = np.empty((size, tile, tile), bool)
        self.origins: list[tuple[int, int]] = []
        self.tile = tile

    def cut(self, data: np.ndarray, valid: np.ndarray, r: int, c: int, y0: int) -> bool:
        """Add the window at (r, c) of ``data``/``valid`` (row ``y0 + r`` of the extent); True once full."""
        n, t = len(self.origins), self.tile
        self.x[n] = data[:, r : r + t, c : c + t]
        self.v[n] = valid[r : r + t, c : c + t]
        self.origins.append((y0 + r, c))
        return len(self.origins) == len(self.v)


def _reach(starts: np.ndarray, start: int, tile: int, length: int) -> int:
    """How far past ``start`` the windows starting before it reach (0 when none does)."""
    before = starts[starts < start]
    return max(0, min(int(before[-1]) + tile, length) - start) if len(before) else 0


def _add_windows(sums: RollingSums, plan: BlockPlan, prob: np.ndarray, unc: np.ndarray | None,
                 group: Sequence[tuple[int, int]], origin: tuple[int, int]) -> None:
    """Add a batch's predictions with their blend weights; ``origin``: the block's (row, col) in the scene."""
    wg, tile = plan.windows, plan.windows.tile
    values = prob[:, None] if unc is None else np.stack([prob, unc], axis=1)
    for k, (r, c) in enumerate(group):
        w = window_weights(tile, wg.overlap, plan.margin, r + origin[0], c + origin[1], wg.height, wg.width)
        sums.add(values[k], w, r, c)


def _valid_pixels(data: np.ndarray, valid: np.ndarray | None, plan: BlockPlan) -> np.ndarray:
    """Where the mask (when given) says valid and every channel a model reads has a finite value."""
    # one band at a time: no (bands, rows, cols) temporary; channels kept for later stages only do
    # not decide validity
    model_bands = sorted({i for r in plan.refs for i in r.channel_index})
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

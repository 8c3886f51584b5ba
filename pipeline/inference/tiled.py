"""Tiled inference: a stacked scene -> a lazy landslide probability raster.

:func:`predict` builds a Dask graph over output blocks. Every window of the
global window grid (:class:`tiling.windows.WindowGrid`) runs exactly once,
in the block that holds its origin: that task (:mod:`pipeline.inference.blocks`)
reads the block plus the strip its last windows reach into (less than a tile
below and to the right) and sums the weighted window predictions over that
extent (:class:`tiling.stitch.RollingSums`). The parts that fall on later
blocks are cut off and added to those blocks, which then divide by the
summed weights (:func:`tiling.stitch.blend_block`). Because the window grid
is global, the result does not depend on the block layout; memory depends on
the block size, not the scene size. A block read in strips hands back its
divided values and the sums other blocks still need, not its input: its
kept channels are read again where the block is finished. The output is
float32 in [0, 1], NaN where the input is not valid.

Each model normalizes with the fixed statistics of its artefact, so a pixel's
probability depends on its neighbourhood (the model's window) alone, not on
what else is in the scene; statistics for the scene's processing level bring
surface reflectance back to the radiometry the model was trained on.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from rasterio.windows import Window

from pipeline.core.arrays import as_dask
from pipeline.core.errors import ConfigError, GridError, InputError
from pipeline.core.grid import Grid
from pipeline.inference.blocks import (
    BlockPlan,
    BlockResult,
    WindowReader,
    predict_block,
    read_and_predict,
    strip_rows,
    trim_heap,
)
from pipeline.inference.forward import forward_seconds, precision_figures  # noqa: F401 - the run imports them from here
from pipeline.inference.options import InferenceOptions, Prediction, inference_block_size, planned_precision
from pipeline.inference.runtime import model_refs
from pipeline.model.artefact import ModelArtefact
from pipeline.model.ensemble import check_ensemble, ensemble_threshold
from tiling.stitch import Strip, blend_block, default_margin
from tiling.windows import Span, WindowGrid, block_spans

log = logging.getLogger(__name__)


def predict(
    data: xr.DataArray,
    valid: xr.DataArray | None,
    grid: Grid,
    models: Sequence[ModelArtefact],
    options: InferenceOptions | None = None,
    *,
    keep: Sequence[str] = (),
    level: str | None = None,
    reader: WindowReader | None = None,
    coarse: tuple[Sequence[str], int] | None = None,
) -> Prediction:
    """Lazy probability raster of ``models`` on a stacked scene; nothing is computed here.

    ``data`` is (band, y, x) float with channel names in its ``band`` coordinate (any order, extra
    bands ignored), ``valid`` is (y, x) bool or None, both on ``grid`` (dask-backed or in memory).
    A pixel is predicted where ``valid`` is true (everywhere when None) and every channel a model
    uses has a finite value. ``models`` are loaded artefacts (an ensemble when several). The
    returned arrays are dask-backed with chunks of the (stride-rounded) block size. Raises
    :class:`MissingChannelsError` when ``data`` lacks a model channel, :class:`GridError` when
    shapes disagree.

    ``level``: the scene's Sentinel-2 processing level (``L1C``, ``L2A`` or None); an artefact with
    statistics for that level uses them. ``keep``: input channels passed through unchanged in
    :attr:`Prediction.layers` from the same block tasks (SLOPE and DEM for the terrain rules,
    without stacking the scene again; stored in the same computation by
    :func:`pipeline.inference.write.write_prediction`); they do not restrict where the models
    predict. ``coarse`` = (channels, factor): those channels' means over cells of factor x factor
    pixels (finite values only) in :attr:`Prediction.coarse`, when the models read them and the
    block size is a multiple of ``factor`` (else None). ``reader``: reads any window of ``data``
    (:attr:`pipeline.stack.layers.Stack.reader`, same bands in the same order), so that each block
    task reads its whole extent in one call instead of its chunk and strips of its neighbours'.
    """
    opts = options or InferenceOptions()
    _check_shapes(data, valid, grid)
    bands = [str(b) for b in data.coords["band"].values] if "band" in data.coords else []
    plan, used, block = _block_plan(models, opts, grid, bands, keep, level, coarse)
    x = as_dask(data, (-1, block, block), rechunk=False)
    x = x[used] if used != list(range(x.shape[0])) else x
    _check_reader(reader, data, bands)
    v = None if valid is None else as_dask(valid, (block, block), rechunk=False)
    v = v if v is None or v.dtype == bool else v.astype(bool)
    token = _token(plan, data, da.ones(grid.shape, chunks=(block, block), dtype=bool) if valid is None else valid.data)
    graph = _BlockGraph(plan, _Inputs(x, v, reader, used), block_spans(grid.height, block),
                        block_spans(grid.width, block), token)
    out, coarse_means = graph.build()
    coords = {k: data.coords[k] for k in ("y", "x") if k in data.coords}
    probability = _raster(out[0], coords, grid, "landslide probability")
    uncertainty = (_raster(out[1], coords, grid, "landslide probability standard deviation")
                   if plan.with_uncertainty else None)
    layers = {name: _raster(out[plan.outputs + k], coords, grid, name) for k, name in enumerate(keep)}
    log.info(
        "inference graph: %d x %d px, %d windows of %d px (overlap %d), %d block(s) of %d px, %d model(s)%s",
        grid.height, grid.width, len(plan.windows), plan.windows.tile, opts.overlap,
        len(graph.rows) * len(graph.cols), block, len(models), " with TTA" if opts.tta else "",
    )
    threshold = ensemble_threshold(models, opts.weights, opts.ensemble)
    return Prediction(probability, uncertainty, grid, threshold, len(plan.windows), layers, plan.meter,
                      coarse_means, plan.coarse_factor, planned_precision(opts))


def _check_shapes(data: xr.DataArray, valid: xr.DataArray | None, grid: Grid) -> None:
    if tuple(data.dims) != ("band", "y", "x"):
        raise InputError(f"inference input must have dims (band, y, x), got {tuple(data.dims)}")
    if valid is not None and tuple(valid.dims) != ("y", "x"):
        raise InputError(f"valid mask must have dims (y, x), got {tuple(valid.dims)}")
    vshape = grid.shape if valid is None else tuple(valid.shape)
    if tuple(data.shape[1:]) != grid.shape or vshape != grid.shape:
        raise GridError(
            f"scene arrays {tuple(data.shape[1:])} / mask {vshape} do not match the grid {grid.shape}"
        )


def _check_reader(reader: WindowReader | None, data: xr.DataArray, bands: list[str]) -> None:
    if reader is not None and tuple(getattr(reader, "shape", ())) != tuple(data.shape):
        raise GridError(f"the window reader's shape {getattr(reader, 'shape', None)} is not the stack's {data.shape}")
    if reader is not None and [str(n) for n in getattr(reader, "names", bands)] != bands:
        raise InputError(f"the window reader's bands {list(getattr(reader, 'names', []))} are not the stack's {bands}")


def _block_plan(models: Sequence[ModelArtefact], opts: InferenceOptions, grid: Grid, bands: list[str],
                keep: Sequence[str], level: str | None,
                coarse: tuple[Sequence[str], int] | None) -> tuple[BlockPlan, list[int], int]:
    """The block tasks' plan, the stack's bands they read (what some model uses or ``keep`` names),
    and the block edge."""
    weights = check_ensemble(models, opts.weights)
    refs = model_refs(models, bands, level)
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
    refs = tuple(r.with_index(tuple(remap[i] for i in r.channel_index)) for r in refs)
    meter = f"model-forward-{uuid.uuid4().hex[:12]}"
    block = inference_block_size(opts.block_size, tile, opts.overlap)
    coarse_index, coarse_factor = _coarse_plan(coarse, bands, remap, block)
    plan = BlockPlan(wg, margin, refs, tuple(float(w) for w in weights), opts, with_unc,
                     tuple(remap[i] for i in keep_bands), meter, coarse_index, coarse_factor)
    return plan, used, block


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


@dataclass(frozen=True)
class _Inputs:
    """Where the block tasks get their pixels."""

    x: da.Array  # (used bands, y, x) of the stack
    valid: da.Array | None  # (y, x) bool; None: every pixel with values in all channels
    reader: WindowReader | None  # reads a block's whole extent at once (then ``x`` is not read)
    bands: list[int]  # the stack's bands in ``x``, for the reader


@dataclass(frozen=True)
class _BlockGraph:
    """The two stages of the graph over ``rows`` x ``cols`` blocks.

    Stage 1: each block runs the windows whose origin it holds (each window exactly once) and sums
    them on its own pixels plus the strip they reach into. Stage 2: each block adds the strips
    earlier blocks left on it and divides by the summed weights.
    """

    plan: BlockPlan
    inputs: _Inputs
    rows: list[Span]
    cols: list[Span]
    token: str

    def build(self) -> tuple[da.Array, da.Array | None]:
        """The (outputs + kept, y, x) float32 array, and the coarse means or None."""
        plan_d = dask.delayed(self.plan, pure=False, name=f"inference-plan-{self.token}")
        reader = self.inputs.reader
        reader_d = None if reader is None else dask.delayed(reader, pure=False, name=f"inference-reader-{self.token}")
        owned: dict[tuple[int, int], Any] = {}
        strips: dict[tuple[int, int], list[Any]] = {(i, j): [] for i in range(len(self.rows))
                                                    for j in range(len(self.cols))}
        reread: dict[tuple[int, int], Any] = {}
        for i, rows in enumerate(self.rows):
            for j, cols in enumerate(self.cols):
                extent = self.plan.windows.block_read_extent(rows, cols)
                reread[i, j] = self._reread(reader_d, extent, (rows, cols))
                owned[i, j] = self._owned(plan_d, reader_d, extent, (rows, cols), reread[i, j] is None)
                for (k, m), strip in self._strips(owned[i, j], extent, i, j):
                    strips[k, m].append(strip)
        n_keep = len(self.plan.keep_index)
        out = da.block([[self._block(owned[i, j], strips[i, j], (rows, cols), n_keep, reread[i, j])
                         for j, cols in enumerate(self.cols)] for i, rows in enumerate(self.rows)])
        return out, self._coarse(owned) if self.plan.coarse_index else None

    def _reread(self, reader_d: Any, extent: tuple[Span, Span], block: tuple[Span, Span]) -> Any:
        """(reader, bands, window) for a block whose second stage reads its kept channels again
        (:func:`rereads_kept`), else None."""
        if not rereads_kept(self.plan, reader_d is not None, len(self.inputs.bands), extent, block):
            return None
        rows, cols = block
        return (reader_d, [self.inputs.bands[k] for k in self.plan.keep_index],
                Window(cols[0], rows[0], cols[1] - cols[0], rows[1] - rows[0]))

    def _owned(self, plan_d: Any, reader_d: Any, extent: tuple[Span, Span], block: tuple[Span, Span],
               kept: bool) -> Any:
        """Stage 1 of one block: its window sums over its read extent (a :class:`BlockResult`), with
        the kept channels when ``kept``."""
        (ry0, ry1), (rx0, rx1) = extent
        (rows, cols) = block
        v = self.inputs.valid
        vpart = None if v is None else _copied(v[ry0:ry1, rx0:rx1])
        name = f"predict-windows-{self.token}-{rows[0]}-{cols[0]}"
        if reader_d is not None:
            return dask.delayed(read_and_predict, pure=True)(
                reader_d, self.inputs.bands, extent, vpart, block, plan_d, kept, dask_key_name=name)
        x = _copied(self.inputs.x[:, ry0:ry1, rx0:rx1])
        return dask.delayed(predict_block, pure=True)(x, vpart, block, plan_d, dask_key_name=name)

    def _strips(self, task: Any, extent: tuple[Span, Span], i: int, j: int) -> list[tuple[tuple[int, int], Any]]:
        """The parts of block (i, j)'s sums that fall on later blocks: ((k, m), (offset in block
        (k, m), delayed strip))."""
        (ry0, ry1), (rx0, rx1) = extent
        rows, cols = self.rows[i], self.cols[j]
        out = []
        for k in range(i, len(self.rows)):
            for m in range(j, len(self.cols)):
                (ty0, ty1), (tx0, tx1) = self.rows[k], self.cols[m]
                y0, y1, x0, x1 = max(ry0, ty0), min(ry1, ty1), max(rx0, tx0), min(rx1, tx1)
                if (k, m) == (i, j) or y0 >= y1 or x0 >= x1:
                    continue
                part = dask.delayed(_strip, pure=True)(
                    task, (y0 - ry0, y1 - ry0), (x0 - rx0, x1 - rx0),
                    dask_key_name=f"predict-spill-{self.token}-{rows[0]}-{cols[0]}-{ty0}-{tx0}",
                )
                out.append(((k, m), ((y0 - ty0, x0 - tx0), part)))
        return out

    def _block(self, owned: Any, strips: list[Any], block: tuple[Span, Span], n_keep: int, reread: Any) -> da.Array:
        """Stage 2 of one block: (outputs + kept, rows, cols) float32."""
        rows, cols = block
        task = dask.delayed(_finish_block, pure=True)(
            self.plan.outputs, owned, reread, *strips, dask_key_name=f"predict-block-{self.token}-{rows[0]}-{cols[0]}",
        )
        shape = (self.plan.outputs + n_keep, rows[1] - rows[0], cols[1] - cols[0])
        return da.from_delayed(task, shape=shape, dtype=np.float32)

    def _coarse(self, owned: dict[tuple[int, int], Any]) -> da.Array:
        """The blocks' coarse means, one (channels, rows // f, cols // f) chunk each."""
        f, n = self.plan.coarse_factor, len(self.plan.coarse_index)
        return da.block([[
            da.from_delayed(dask.delayed(_coarse_of, pure=True)(
                owned[i, j], dask_key_name=f"predict-coarse-{self.token}-{rows[0]}-{cols[0]}"),
                shape=(n, (rows[1] - rows[0]) // f, (cols[1] - cols[0]) // f), dtype=np.float32)
            for j, cols in enumerate(self.cols)] for i, rows in enumerate(self.rows)])


def _strip(owned: BlockResult, rows: Span, cols: Span) -> tuple[np.ndarray, np.ndarray] | None:
    """The part of a block's window sums that falls on a later block (copies; slice coordinates)."""
    return owned.sums.strip(rows, cols)


def rereads_kept(plan: BlockPlan, has_reader: bool, n_bands: int, extent: tuple[Span, Span],
                 block: tuple[Span, Span]) -> bool:
    """Whether a block's kept channels are read again by its second stage rather than handed on by its
    task: for a block the task reads in strips (a large one), whose result then holds its sums only."""
    (ry0, ry1), (rx0, rx1) = extent
    return bool(has_reader and plan.keep_index
                and len(strip_rows(plan, block, (ry1 - ry0, rx1 - rx0), n_bands)) > 1)


def _finish_block(n_out: int, owned: BlockResult, reread: tuple[WindowReader, list[int], Window] | None,
                  *strips: Strip) -> np.ndarray:
    """Output (n_out [+ kept], rows, cols) of a block: its blended window sums, then the kept input
    channels, from its task or read here (``reread``: reader, bands, the block's window)."""
    n_keep = len(reread[1]) if reread is not None else 0 if owned.kept is None else len(owned.kept)
    out = np.empty((n_out + n_keep, *owned.sums.block_valid.shape), np.float32)
    blend_block(n_out, owned.sums, strips, out=out[:n_out])
    if reread is not None:
        reader, bands, window = reread
        if "out" in inspect.signature(reader.read).parameters:  # a stack's reader: straight into the output
            reader.read(bands, window, out=out[n_out:])
        else:
            out[n_out:] = reader.read(bands, window)
    elif owned.kept is not None:
        out[n_out:] = owned.kept
    trim_heap()
    return out


def _coarse_of(owned: BlockResult) -> np.ndarray:
    assert owned.coarse is not None
    return owned.coarse


def _copied(arr: da.Array) -> da.Array:
    """The slice with every chunk copied out of its source chunk.

    Dask slices are numpy views: a thin halo strip would keep its whole
    source chunk (14 bands x block x block) alive until the block that needs
    it runs, so a full row of input chunks could stay in memory. Copies let
    each source chunk go as soon as its pieces are cut.
    """
    return arr.map_blocks(np.ascontiguousarray, dtype=arr.dtype)


def _token(plan: BlockPlan, data: xr.DataArray, valid: Any) -> str:
    from dask.base import tokenize

    return tokenize(
        getattr(data.data, "name", id(data)), getattr(valid, "name", id(valid)),
        [r.key for r in plan.refs], [r.channel_index for r in plan.refs], [r.normalization for r in plan.refs],
        plan.weights, plan.margin, plan.keep_index,
        plan.windows, plan.options,
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

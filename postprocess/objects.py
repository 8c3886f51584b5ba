"""From a probability raster to labelled landslide objects with their statistics, block by block.

Steps, all parameters in metres and square metres (converted with the grid's
pixel size):

1. threshold: ``probability >= threshold`` on valid pixels;
2. opening, then closing, with disks of the given radii
   (:mod:`postprocess.morphology`);
3. removal of objects smaller than ``min_area_m2``;
4. filling of holes smaller than ``max_hole_m2`` (both in :mod:`postprocess.areas`);
5. optional terrain rules (:mod:`postprocess.terrain_rules`).

Every step runs per dask block and gives exactly the result of the same step
on the whole array. Each global pass needs the mask of the step before: the
opened and closed mask, and the mask after the size and hole steps, are
computed once and kept bit-packed (:func:`postprocess.packed_mask.persist_mask`),
so the morphology and the labelling are not redone by every later pass or by
the writer of the mask raster.

Objects are 4-connected; pixels without data are never part of one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np

from pipeline.core.arrays import as_dask
from pipeline.core.config import PostprocessSection
from pipeline.core.grid import Grid
from postprocess import morphology
from postprocess.areas import OpenedSummaries, sizes_and_holes
from postprocess.label_stats import pixel_stats, stat_mean
from postprocess.labels import (
    BlockLayout,
    BlockSummary,
    Components,
    apply_block_luts,
    faces_of,
    label_local,
    order_by_first_pixel,
    resolve,
    run_blocks,
)
from postprocess.packed_mask import persist_mask
from postprocess.terrain_rules import ndvi, ndwi, terrain_keep

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObjectLayers:
    """Optional (y, x) layers on the probability's grid (dask, xarray or numpy), for the terrain
    rules and the per-object statistics: slope in degrees (the slope rule), elevation in metres,
    B04 ``red`` and B08 ``nir`` reflectance (the NDVI rule), B03 ``green`` (with B08: the NDWI
    rule) and the inference uncertainty."""

    slope: Any = None
    dem: Any = None
    red: Any = None
    nir: Any = None
    green: Any = None
    uncertainty: Any = None


@dataclass(frozen=True)
class OpenedMask:
    """Steps 1 and 2 computed by the caller: ``mask`` is :func:`postprocess.morphology.opened_mask`
    of the same probability, known pixels and threshold (in any chunks), ``summaries`` its
    :func:`postprocess.areas.opened_summaries` (used when made in the chunks the objects are
    processed in)."""

    mask: da.Array
    summaries: OpenedSummaries | None = None


@dataclass
class CleanedObjects:
    """The result of :func:`clean_objects`.

    ``labels`` is lazy (int32, 0 = background, objects 1..N in row-major order
    of their first pixel). ``stats`` holds per-object arrays indexed by
    ``id - 1`` (``count``, ``first``, and ``<name>_sum/_n/_max`` for every value
    layer). ``pieces`` maps id -> polygon pieces in pixel coordinates when
    requested.
    """

    labels: da.Array
    stats: dict[str, np.ndarray]
    grid: Grid
    pieces: dict[int, list[Any]] | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    #: The mask the objects were labelled from, when every object in it was kept.
    kept: da.Array | None = None

    @property
    def mask(self) -> da.Array:
        """Lazy boolean mask of the kept objects (without labelling again when none was dropped)."""
        return self.kept if self.kept is not None else self.labels > 0

    @property
    def count(self) -> int:
        """Number of objects."""
        return int(self.stats["count"].size)


def clean_objects(
    probability: Any,
    valid: Any,
    grid: Grid,
    params: PostprocessSection,
    *,
    threshold: float,
    layers: ObjectLayers | None = None,
    with_pieces: bool = False,
    opened: OpenedMask | None = None,
) -> CleanedObjects:
    """Threshold, morphology, min-area, holes and terrain rules; labelled objects with statistics.

    ``probability``, ``valid`` and the ``layers`` are 2-D arrays (dask, xarray
    or numpy) on ``grid``; they are processed in ``probability``'s chunks.
    Per-object sums, counts and maxima are computed of the probability
    (``prob``) and, when given, of ``slope``, ``ndvi``, ``ndwi``, ``elev``
    (the DEM) and ``uncertainty``. ``with_pieces`` also returns each object's
    polygon pieces. ``opened``: the first two steps when the caller has them.
    """
    prob = getattr(probability, "data", probability)
    if not isinstance(prob, da.Array):
        prob = da.from_array(np.asarray(prob), chunks="auto")
    if prob.ndim != 2 or prob.shape != grid.shape:
        raise ValueError(f"probability must have the grid's shape {grid.shape}, got {prob.shape}")
    known = as_dask(valid, prob.chunks).astype(bool)
    values = _value_layers(prob, layers or ObjectLayers(), params)
    mask = _cleaned_mask(prob, known, grid, params, threshold, opened)
    layout = BlockLayout.of(mask)
    names = tuple(values)
    summaries = run_blocks(
        _final_block, [mask, *values.values()], layout, names=names, with_pieces=with_pieces
    )
    comps = resolve(summaries, layout, 4)
    return _finish(comps, summaries, mask, grid, params, names, with_pieces)


def _value_layers(prob: da.Array, layers: ObjectLayers, params: PostprocessSection) -> dict[str, da.Array]:
    """The layers whose per-object statistics are computed, by name, in ``prob``'s chunks; a
    warning for each terrain rule that lacks its layers."""
    chunks = prob.chunks
    out: dict[str, da.Array] = {"prob": prob}
    if layers.slope is not None:
        out["slope"] = as_dask(layers.slope, chunks)
    elif params.min_mean_slope_deg is not None:
        log.warning("postprocess.min_mean_slope_deg is set but no slope layer was given: rule skipped")
    if layers.red is not None and layers.nir is not None:
        out["ndvi"] = ndvi(as_dask(layers.red, chunks), as_dask(layers.nir, chunks))
    elif params.max_mean_ndvi is not None:
        log.warning("postprocess.max_mean_ndvi is set but B04/B08 were not given: rule skipped")
    if layers.green is not None and layers.nir is not None:
        out["ndwi"] = ndwi(as_dask(layers.green, chunks), as_dask(layers.nir, chunks))
    elif params.max_mean_ndwi is not None:
        log.warning("postprocess.max_mean_ndwi is set but B03/B08 were not given: rule skipped")
    for name, layer in (("elev", layers.dem), ("uncertainty", layers.uncertainty)):
        if layer is not None:
            out[name] = as_dask(layer, chunks)
    return out


def _cleaned_mask(prob: da.Array, known: da.Array, grid: Grid, params: PostprocessSection, threshold: float,
                  opened: OpenedMask | None) -> da.Array:
    """Steps 1 to 4, computed and kept bit-packed, in ``prob``'s chunks."""
    if opened is not None:
        if opened.mask.shape != prob.shape:
            raise ValueError(f"opened mask has shape {opened.mask.shape}, the probability {prob.shape}")
        stored = opened.mask.chunks == prob.chunks  # the caller's mask is computed already (kept bits)
        start = opened.mask if stored else opened.mask.rechunk(prob.chunks)
        summaries = opened.summaries
    else:
        start = morphology.opened_mask(prob, known, grid, params, threshold)
        stored, summaries = False, None
        # the size and hole passes both start from the morphology: compute it once
        if params.min_area_m2 > 0 or params.max_hole_m2 > 0:
            start, stored = persist_mask(start), True
    mask = sizes_and_holes(start, known, params, grid.pixel_area, summaries)
    if mask is not start or not stored:
        # the final pass and the mask raster both start from here
        mask = persist_mask(mask)
    return mask


def _final_block(
    mask: np.ndarray,
    *values: np.ndarray,
    names: tuple[str, ...],
    with_pieces: bool,
    index: tuple[int, int],
    origin: tuple[int, int],
    shape: tuple[int, int],
) -> BlockSummary:
    lab, n = label_local(mask, 4)
    stats = pixel_stats(lab, n, dict(zip(names, values, strict=True)), origin=origin, width=shape[1], first=True)
    pieces = None
    if with_pieces and n:
        from postprocess.vectorize import block_pieces

        pieces = block_pieces(lab, origin)
    return BlockSummary(index, n, faces_of(lab), stats, pieces)


def _final_labels(mask: np.ndarray, lut: np.ndarray) -> np.ndarray:
    lab, _ = label_local(mask, 4)
    return lut[lab]


def _finish(comps: Components, summaries: list[BlockSummary], mask: da.Array, grid: Grid,
            params: PostprocessSection, names: tuple[str, ...], with_pieces: bool) -> CleanedObjects:
    """Step 5 on the resolved objects, then their ids, statistics, labels and pieces."""
    ids, dropped = _object_ids(comps, params)
    if comps.n_components:
        kept = np.flatnonzero(ids)
        order = kept[np.argsort(ids[kept])]  # per-object tables, ordered by id
        table = {k: v[order] for k, v in comps.stats.items()}
    else:
        table = _empty_stats(names)
    luts = {ix: comps.block_lut(ix, ids, 0).astype(np.int32) for ix in comps.layout.indices()}
    labels = apply_block_luts(_final_labels, [mask], luts, comps.layout, np.int32)
    pieces = _pieces_by_id(summaries, luts) if with_pieces else None
    unchanged = mask if not dropped.get("terrain") else None
    return CleanedObjects(labels, table, grid, pieces, dropped, unchanged)


def _object_ids(comps: Components, params: PostprocessSection) -> tuple[np.ndarray, dict[str, int]]:
    """Ids 1..N of the objects the terrain rules keep (0 for the others), and how many each step
    dropped."""
    n = comps.n_components
    if not n:
        return np.zeros(0, dtype=np.int32), {}
    stats = comps.stats

    def mean(name: str) -> np.ndarray | None:
        return stat_mean(stats, name) if f"{name}_sum" in stats else None

    keep = np.ones(n, dtype=bool)
    dropped: dict[str, int] = {}
    rule = terrain_keep(mean("slope"), mean("ndvi"), params, mean("ndwi"))
    if rule is not None:
        dropped["terrain"] = int((~rule).sum())
        keep &= rule
        log.info("terrain rules: %d of %d objects dropped", dropped["terrain"], n)
    return order_by_first_pixel(stats["first"], keep), dropped


def _pieces_by_id(summaries: list[BlockSummary],
                  luts: dict[tuple[int, int], np.ndarray]) -> dict[int, list[Any]]:
    """The polygon pieces of every block, by object id (objects dropped have none)."""
    pieces: dict[int, list[Any]] = {}
    for summary in summaries:
        if not summary.extra:
            continue
        local_ids, geoms = summary.extra
        lut = luts[summary.index]
        for local, geom in zip(local_ids, geoms, strict=True):
            gid = int(lut[local])
            if gid:
                pieces.setdefault(gid, []).append(geom)
    return pieces


def _empty_stats(names: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {"count": np.zeros(0, np.int64), "first": np.zeros(0, np.int64)}
    for name in names:
        out[f"{name}_sum"] = np.zeros(0)
        out[f"{name}_n"] = np.zeros(0, np.int64)
        out[f"{name}_max"] = np.zeros(0)
    return out

"""Steps 3 and 4 of the cleaning: small objects removed, small holes filled.

Objects smaller than ``min_area_m2`` are removed, holes smaller than
``max_hole_m2`` filled.

Object and hole sizes are not local: both steps use the global connected-component
labelling of :mod:`postprocess.labels` (label per block, union-find over block
faces, block-wise reductions keyed by label), so the result does not depend on
the block layout.

Objects are 4-connected, background (holes) 8-connected. A hole is a
background component that touches neither the raster edge nor any pixel
without data: what lies beyond the data is not known to be enclosed.
"Smaller than" is strict: an object of exactly ``min_area_m2`` stays.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np

from pipeline.core.arrays import as_dask
from pipeline.core.config import PostprocessSection
from postprocess.label_stats import border_labels, pixel_stats
from postprocess.labels import (
    BlockLayout,
    BlockSummary,
    Components,
    apply_block_luts,
    block_tasks,
    faces_of,
    label_local,
    resolve,
    run_blocks,
)

log = logging.getLogger(__name__)


def _object_sizes(mask: np.ndarray, *, index: tuple[int, int], origin: Any, shape: Any) -> BlockSummary:
    lab, n = label_local(mask, 4)
    return BlockSummary(index, n, faces_of(lab), pixel_stats(lab, n))


def _keep_objects(mask: np.ndarray, lut: np.ndarray) -> np.ndarray:
    lab, _ = label_local(mask, 4)
    return lut[lab]


def remove_small_objects(mask: da.Array, min_area_m2: float, pixel_area: float) -> da.Array:
    """Drop 4-connected objects whose area is smaller than ``min_area_m2`` (``mask`` itself when
    none is)."""
    if min_area_m2 <= 0:
        return mask
    layout = BlockLayout.of(mask)
    comps = resolve(run_blocks(_object_sizes, [mask], layout), layout, 4)
    return _without_small_objects(mask, comps, layout, min_area_m2, pixel_area)


def _without_small_objects(mask: da.Array, comps: Components, layout: BlockLayout, min_area_m2: float,
                           pixel_area: float) -> da.Array:
    keep = comps.stats.get("count", np.zeros(0, np.int64)) * pixel_area >= min_area_m2
    log.info("min-area: %d of %d objects kept", int(keep.sum()), comps.n_components)
    if keep.all():
        return mask
    luts = {ix: comps.block_lut(ix, keep, False) for ix in layout.indices()}
    return apply_block_luts(_keep_objects, [mask], luts, layout, bool)


def _background(
    mask: np.ndarray, known: np.ndarray, *, index: tuple[int, int], origin: tuple[int, int], shape: tuple[int, int]
) -> BlockSummary:
    lab, n = label_local(~mask, 8)
    stats = pixel_stats(lab, n)
    stats["touches_border"] = border_labels(lab, n, origin, shape)
    unknown = ~known.astype(bool)
    stats["unknown"] = np.bincount(lab[unknown], minlength=n + 1)[1:].astype(np.int64)
    return BlockSummary(index, n, faces_of(lab), stats)


def _fill_holes(mask: np.ndarray, lut: np.ndarray) -> np.ndarray:
    lab, _ = label_local(~mask, 8)
    return mask | lut[lab]


def fill_small_holes(mask: da.Array, known: da.Array, max_hole_m2: float, pixel_area: float) -> da.Array:
    """Fill 8-connected background components enclosed by the mask and smaller than ``max_hole_m2``
    (``mask`` itself when there is none)."""
    if max_hole_m2 <= 0:
        return mask
    layout = BlockLayout.of(mask)
    comps = resolve(run_blocks(_background, [mask, known], layout), layout, 8)
    return _with_small_holes_filled(mask, comps, layout, max_hole_m2, pixel_area)


def _with_small_holes_filled(mask: da.Array, comps: Components, layout: BlockLayout, max_hole_m2: float,
                             pixel_area: float) -> da.Array:
    if comps.n_components == 0:
        return mask
    hole = (
        ~comps.stats["touches_border"]
        & (comps.stats["unknown"] == 0)
        & (comps.stats["count"] * pixel_area < max_hole_m2)
    )
    log.info("holes: %d filled", int(hole.sum()))
    if not hole.any():
        return mask
    luts = {ix: comps.block_lut(ix, hole, False) for ix in layout.indices()}
    return apply_block_luts(_fill_holes, [mask], luts, layout, bool)


@dataclass(frozen=True)
class OpenedSummaries:
    """What the size and hole steps need to know of the opened (and closed) mask, per block: its
    4-connected objects and its 8-connected background (:func:`opened_summaries`)."""

    layout: BlockLayout
    objects: list[BlockSummary]
    background: list[BlockSummary]

    @classmethod
    def collect(cls, chunks: tuple[tuple[int, ...], tuple[int, ...]], computed: np.ndarray) -> OpenedSummaries:
        """From the computed :func:`opened_summaries` of a mask in ``chunks``."""
        layout = BlockLayout(tuple(chunks[0]), tuple(chunks[1]))
        pairs = list(computed)
        if len(pairs) != len(layout.indices()) or [p[0].index for p in pairs] != layout.indices():
            raise ValueError(f"{len(pairs)} block summaries do not match a layout of {layout.nblocks} blocks")
        return cls(layout, [p[0] for p in pairs], [p[1] for p in pairs])


def _opened_block(mask: np.ndarray, known: np.ndarray, *, index: tuple[int, int], origin: tuple[int, int],
                  shape: tuple[int, int]) -> np.ndarray:
    out = np.empty(1, dtype=object)
    out[0] = (_object_sizes(mask, index=index, origin=origin, shape=shape),
              _background(mask, known, index=index, origin=origin, shape=shape))
    return out


def opened_summaries(opened: da.Array, known: da.Array) -> da.Array:
    """The block summaries of the size and hole steps over ``opened``
    (:func:`postprocess.morphology.opened_mask`; ``known`` in the same chunks): a lazy 1-D object
    array, one entry per block in row-major order, for :meth:`OpenedSummaries.collect`.

    A caller that computes the opened mask anyway computes these in the same
    computation, block by block, and hands them to
    :func:`postprocess.objects.clean_objects` (with the mask), which then skips
    its passes over the mask for the size and hole steps, and skips the steps
    entirely when they change nothing. (An array, not a delayed object:
    ``dask.compute`` keeps the order of its arguments only among collections of
    one kind.)
    """
    layout = BlockLayout.of(opened)
    known = as_dask(known, opened.chunks).astype(bool)
    tasks = block_tasks(_opened_block, [opened, known], layout)
    return da.concatenate([da.from_delayed(t, shape=(1,), dtype=object) for t in tasks])


def sizes_and_holes(mask: da.Array, known: da.Array, params: PostprocessSection, pixel_area: float,
                    summaries: OpenedSummaries | None = None) -> da.Array:
    """Steps 3 and 4 on the opened mask.

    With the mask's :func:`opened_summaries` made in its chunks, no pass over
    the mask is made unless a step changes it; the hole step's summaries are
    recomputed when the size step removed objects. Summaries in other chunks
    are not used.
    """
    if summaries is None or summaries.layout != BlockLayout.of(mask):
        smaller = remove_small_objects(mask, params.min_area_m2, pixel_area)
        return fill_small_holes(smaller, known, params.max_hole_m2, pixel_area)
    layout = summaries.layout
    if params.min_area_m2 > 0:
        objects = resolve(summaries.objects, layout, 4)
        smaller = _without_small_objects(mask, objects, layout, params.min_area_m2, pixel_area)
        if smaller is not mask:  # the background grew: its summaries no longer hold
            return fill_small_holes(smaller, known, params.max_hole_m2, pixel_area)
    if params.max_hole_m2 <= 0:
        return mask
    background = resolve(summaries.background, layout, 8)
    return _with_small_holes_filled(mask, background, layout, params.max_hole_m2, pixel_area)

"""Connected components of a 2-D dask array, computed block by block.

Every block is labelled on its own (:func:`scipy.ndimage.label`), each block
reports per-label statistics (:mod:`postprocess.label_stats`) and the labels on
its four faces, and a union-find over the block faces (a sparse graph solved
with :func:`scipy.sparse.csgraph.connected_components`) joins the pieces of one
component that lie in several blocks. Nothing of scene size is ever held in
memory: the driver only sees per-label tables and block faces.

A label is identified by ``(block, local label)``. Local labels are what
:func:`scipy.ndimage.label` gives for that block, so they can be recomputed at
any time from the block's data, which is how look-up tables are applied
(:func:`apply_block_luts`) without storing a label raster.

Connectivity: foreground objects are 4-connected (pixels that only touch at a
corner are separate objects, which makes every object one simple
:class:`shapely.Polygon`); background components, used to find holes, are
8-connected, the dual of 4-connectivity in digital topology.

Global ids are assigned in row-major order of each component's first pixel,
which is the order :func:`scipy.ndimage.label` uses on a whole array, so ids do
not depend on the block layout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from postprocess.label_stats import reduce_by

log = logging.getLogger(__name__)

Connectivity = Literal[4, 8]

#: Structuring elements by connectivity.
STRUCTURES: dict[int, np.ndarray] = {
    4: ndi.generate_binary_structure(2, 1),
    8: ndi.generate_binary_structure(2, 2),
}

def label_local(mask: np.ndarray, connectivity: Connectivity) -> tuple[np.ndarray, int]:
    """Label one block: int32 labels (0 = background) and the number of labels."""
    lab, n = ndi.label(mask, structure=STRUCTURES[connectivity], output=np.int32)
    return lab, int(n)


# --------------------------------------------------------------------------
# block layout
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockLayout:
    """Chunk boundaries of a 2-D dask array (rows, cols)."""

    row_chunks: tuple[int, ...]
    col_chunks: tuple[int, ...]

    @classmethod
    def of(cls, array: da.Array) -> BlockLayout:
        """Layout of ``array``'s chunks."""
        if array.ndim != 2:
            raise ValueError(f"expected a 2-D array, got shape {array.shape}")
        return cls(tuple(int(c) for c in array.chunks[0]), tuple(int(c) for c in array.chunks[1]))

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the whole array."""
        return (sum(self.row_chunks), sum(self.col_chunks))

    @property
    def nblocks(self) -> tuple[int, int]:
        """Number of blocks along rows and columns."""
        return (len(self.row_chunks), len(self.col_chunks))

    @property
    def row_offsets(self) -> np.ndarray:
        """First row of each block row."""
        return np.concatenate([[0], np.cumsum(self.row_chunks)[:-1]]).astype(np.int64)

    @property
    def col_offsets(self) -> np.ndarray:
        """First column of each block column."""
        return np.concatenate([[0], np.cumsum(self.col_chunks)[:-1]]).astype(np.int64)

    def indices(self) -> list[tuple[int, int]]:
        """Block indices in row-major order."""
        nr, nc = self.nblocks
        return [(i, j) for i in range(nr) for j in range(nc)]

    def origin(self, index: tuple[int, int]) -> tuple[int, int]:
        """(row, col) of a block's first pixel in the whole array."""
        return int(self.row_offsets[index[0]]), int(self.col_offsets[index[1]])


# --------------------------------------------------------------------------
# what a block reports
# --------------------------------------------------------------------------
@dataclass
class BlockSummary:
    """What one block reports about its local labels ``1..n``."""

    index: tuple[int, int]
    n: int
    faces: dict[str, np.ndarray]
    stats: dict[str, np.ndarray]
    extra: Any = None


def faces_of(lab: np.ndarray) -> dict[str, np.ndarray]:
    """The labels on a block's four faces (copies, so the block can be freed)."""
    return {
        "top": lab[0, :].copy(),
        "bottom": lab[-1, :].copy(),
        "left": lab[:, 0].copy(),
        "right": lab[:, -1].copy(),
    }


# --------------------------------------------------------------------------
# union-find across blocks
# --------------------------------------------------------------------------
@dataclass
class Components:
    """Connected components assembled from block summaries.

    ``component[node]`` is the component of node ``node``; the nodes of block
    ``b`` are ``start[b] .. start[b] + n[b] - 1`` for local labels ``1..n[b]``.
    ``stats`` holds per-component reductions of the block statistics.
    """

    layout: BlockLayout
    start: dict[tuple[int, int], int]
    sizes: dict[tuple[int, int], int]
    component: np.ndarray
    n_components: int
    stats: dict[str, np.ndarray] = field(default_factory=dict)

    def block_lut(self, index: tuple[int, int], per_component: np.ndarray, fill: Any = 0) -> np.ndarray:
        """Look-up table local label -> value for one block (entry 0 = ``fill``)."""
        s, n = self.start[index], self.sizes[index]
        lut = np.empty(n + 1, dtype=per_component.dtype)
        lut[0] = fill
        lut[1:] = per_component[self.component[s : s + n]]
        return lut


def _seam_pairs(a: np.ndarray, b: np.ndarray, connectivity: Connectivity) -> tuple[np.ndarray, np.ndarray]:
    """Node pairs across one seam: ``a`` and ``b`` are the two facing pixel lines."""
    pa, pb = [a], [b]
    if connectivity == 8 and a.size > 1:
        pa += [a[:-1], a[1:]]
        pb += [b[1:], b[:-1]]
    x, y = np.concatenate(pa), np.concatenate(pb)
    keep = (x >= 0) & (y >= 0)
    return x[keep], y[keep]


def _seam_edges(by_index: Mapping[tuple[int, int], BlockSummary], start: Mapping[tuple[int, int], int],
                layout: BlockLayout, connectivity: Connectivity) -> tuple[np.ndarray, np.ndarray]:
    """Node pairs (src, dst) across every seam between blocks."""

    def to_nodes(index: tuple[int, int], face: str) -> np.ndarray:
        local = by_index[index].faces[face].astype(np.int64)
        return np.where(local > 0, local - 1 + start[index], -1)

    nr, nc = layout.nblocks
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    # Seams between block rows: full-width pixel lines, so diagonal contacts
    # at block corners are seen by 8-connectivity too.
    for i in range(nr - 1):
        above = np.concatenate([to_nodes((i, j), "bottom") for j in range(nc)])
        below = np.concatenate([to_nodes((i + 1, j), "top") for j in range(nc)])
        pairs.append(_seam_pairs(above, below, connectivity))
    for j in range(nc - 1):
        left = np.concatenate([to_nodes((i, j), "right") for i in range(nr)])
        right = np.concatenate([to_nodes((i, j + 1), "left") for i in range(nr)])
        pairs.append(_seam_pairs(left, right, connectivity))
    if not pairs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


def resolve(
    summaries: Sequence[BlockSummary],
    layout: BlockLayout,
    connectivity: Connectivity,
) -> Components:
    """Join block-local labels into components and reduce their statistics."""
    by_index = {s.index: s for s in summaries}
    start: dict[tuple[int, int], int] = {}
    sizes: dict[tuple[int, int], int] = {}
    total = 0
    for index in layout.indices():
        start[index] = total
        sizes[index] = by_index[index].n
        total += by_index[index].n
    if total == 0:
        return Components(layout, start, sizes, np.zeros(0, dtype=np.int64), 0, {})
    s, d = _seam_edges(by_index, start, layout, connectivity)
    graph = coo_matrix((np.ones(s.size, dtype=np.int8), (s, d)), shape=(total, total))
    ncomp, comp = connected_components(graph, directed=False)
    comp = comp.astype(np.int64)

    names = list(summaries[0].stats) if summaries else []
    stats = {
        name: reduce_by(comp, ncomp, np.concatenate([by_index[ix].stats[name] for ix in layout.indices()]), name)
        for name in names
    }
    log.debug("resolved %d block labels into %d components", total, ncomp)
    return Components(layout, start, sizes, comp, int(ncomp), stats)


# --------------------------------------------------------------------------
# running passes with dask
# --------------------------------------------------------------------------
BlockFn = Callable[..., BlockSummary]


def block_tasks(fn: Callable[..., Any], arrays: Sequence[da.Array], layout: BlockLayout, **kwargs: Any) -> list[Any]:
    """Lazy ``fn(*blocks, index=..., origin=..., shape=..., **kwargs)`` of every block (row-major
    order), as delayed objects; all ``arrays`` must share ``layout``'s chunks."""
    delayed_blocks = [a.to_delayed(optimize_graph=False) for a in arrays]
    tasks = []
    for index in layout.indices():
        blocks = [d[index] for d in delayed_blocks]
        tasks.append(
            dask.delayed(fn, pure=True)(
                *blocks, index=index, origin=layout.origin(index), shape=layout.shape, **kwargs
            )
        )
    return tasks


def run_blocks(
    fn: BlockFn,
    arrays: Sequence[da.Array],
    layout: BlockLayout,
    **kwargs: Any,
) -> list[BlockSummary]:
    """Apply ``fn(*blocks, index=..., origin=..., shape=..., **kwargs)`` to every block and compute.

    All ``arrays`` must share ``layout``'s chunks. One dask compute, so
    upstream tasks shared by the arrays run once per block.
    """
    return list(dask.compute(*block_tasks(fn, arrays, layout, **kwargs)))


def apply_block_luts(
    fn: Callable[..., np.ndarray],
    arrays: Sequence[da.Array],
    luts: Mapping[tuple[int, int], np.ndarray],
    layout: BlockLayout,
    dtype: Any,
) -> da.Array:
    """A lazy array whose block ``b`` is ``fn(*blocks_b, luts[b])``.

    Each task carries only its own block's look-up table, so graphs stay
    small under a distributed scheduler too.
    """
    delayed_blocks = [a.to_delayed(optimize_graph=False) for a in arrays]
    nr, nc = layout.nblocks
    rows = []
    for i in range(nr):
        row = []
        for j in range(nc):
            blocks = [d[i, j] for d in delayed_blocks]
            task = dask.delayed(fn, pure=True)(*blocks, luts[(i, j)])
            row.append(da.from_delayed(task, shape=(layout.row_chunks[i], layout.col_chunks[j]), dtype=dtype))
        rows.append(row)
    return da.block(rows)


def order_by_first_pixel(first: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Global ids 1..N for kept components in row-major order of their first pixel; 0 elsewhere."""
    ids = np.zeros(first.size, dtype=np.int32)
    kept = np.flatnonzero(keep)
    order = kept[np.argsort(first[kept], kind="stable")]
    ids[order] = np.arange(1, order.size + 1, dtype=np.int32)
    return ids

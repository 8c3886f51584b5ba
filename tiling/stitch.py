"""Stitching: blend overlapping window predictions into one raster.

Each window's prediction is multiplied by a weight image, summed into an
accumulator, and the sum is divided by the summed weights. The weight is the
outer product of two 1-D profiles. Along an axis, a profile over an overlap
of ``o`` pixels with a ``margin`` ``m``::

    0 for the first m pixels            (window edge: padding artefacts)
    sin^2 ramp over the next o - 2m     (cosine taper, Tukey-like)
    1 in the middle
    mirrored at the other end

At a side that touches the scene border the profile is 1 instead (full weight,
no dark edges). On a regular lattice the rising ramp of one window and the
falling ramp of its neighbour sum to exactly one (sin^2 + cos^2), so the
blend is seamless; the division by the summed weights makes any other layout
(the last, end-aligned window) exact too. The zero margin removes the pixels
nearest to interior window edges, where zero padding changes a network's
output: with ``margin`` at least a model's receptive-field radius the
stitched raster equals a whole-scene prediction.

Blocks: a scene processed in blocks sums each window once, in the block that
holds its origin (:class:`BlockSums`, on the block plus the strip its windows
reach into); the strips that fall on later blocks (:meth:`BlockSums.strip`)
are added there before the division (:func:`blend_block`), so every block
gets the sums a whole-scene accumulator would hold. :class:`RollingSums`
adds a block's windows row by row and keeps float64 sums only for the rows
windows still reach; the rows done are divided at once, except where other
blocks' strips still arrive (:class:`CompactSums`).

Pure numpy; accumulators are float64 so the result does not depend on how
many windows were added.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pipeline.core.errors import GridError


def default_margin(overlap: int) -> int:
    """Zero-weight margin used when none is given: a quarter of the overlap."""
    return overlap // 4


def axis_profile(tile: int, overlap: int, margin: int, lead_border: bool, trail_border: bool) -> np.ndarray:
    """1-D blend weights (float64, length ``tile``) along one axis of a window.

    ``lead_border``/``trail_border`` say that the window's first/last pixel
    lies on the scene border, where the weight stays 1.
    """
    if not 0 <= overlap < tile:
        raise GridError(f"overlap must be in [0, {tile}), got {overlap}")
    prof = np.ones(tile, np.float64)
    if overlap == 0 and margin == 0:
        return prof
    if not (margin >= 0 and 2 * margin < overlap):
        raise GridError(f"blend margin must be in [0, overlap / 2) = [0, {overlap / 2}), got {margin}")
    ramp_len = overlap - 2 * margin
    k = np.arange(ramp_len, dtype=np.float64)
    up = np.sin(0.5 * np.pi * (k + 0.5) / ramp_len) ** 2
    lead = np.concatenate([np.zeros(margin), up, np.ones(margin)])
    if not lead_border:
        prof[: lead.size] = np.minimum(prof[: lead.size], lead)
    if not trail_border:
        prof[tile - lead.size :] = np.minimum(prof[tile - lead.size :], lead[::-1])
    return prof


@lru_cache(maxsize=64)
def _window_weights(
    tile: int, overlap: int, margin: int, top: bool, bottom: bool, left: bool, right: bool
) -> np.ndarray:
    w = np.outer(
        axis_profile(tile, overlap, margin, top, bottom), axis_profile(tile, overlap, margin, left, right)
    )
    w.setflags(write=False)
    return w


def window_weights(
    tile: int,
    overlap: int,
    margin: int,
    row: int,
    col: int,
    height: int,
    width: int,
) -> np.ndarray:
    """Weights (tile, tile) for the window at (row, col) of a ``height`` x ``width`` scene.

    Sides on the scene border keep full weight. The array is cached and read-only.
    """
    return _window_weights(
        tile, overlap, margin, row <= 0, row + tile >= height, col <= 0, col + tile >= width
    )


def add_window(
    acc: np.ndarray,
    wsum: np.ndarray | None,
    values: np.ndarray,
    weights: np.ndarray,
    row: int,
    col: int,
) -> None:
    """Add ``weights * values`` into ``acc`` (and ``weights`` into ``wsum``) at (row, col).

    (row, col) is the window origin in the accumulator's coordinates; the
    window may reach outside the accumulator, only the overlap is added.
    ``values`` may carry leading dimensions (e.g. (k, tile, tile)) matching ``acc``.
    """
    h, w = acc.shape[-2:]
    th, tw = weights.shape
    r0, c0 = max(row, 0), max(col, 0)
    r1, c1 = min(row + th, h), min(col + tw, w)
    if r0 >= r1 or c0 >= c1:
        return
    wr = slice(r0 - row, r1 - row)
    wc = slice(c0 - col, c1 - col)
    wt = weights[wr, wc]
    acc[..., r0:r1, c0:c1] += values[..., wr, wc] * wt
    if wsum is not None:
        wsum[r0:r1, c0:c1] += wt


def finalize(acc: np.ndarray, wsum: np.ndarray, valid: np.ndarray | None = None,
             out: np.ndarray | None = None) -> np.ndarray:
    """``acc / wsum`` as float32; NaN where ``wsum`` is 0 or ``valid`` is False (into ``out`` when given)."""
    if out is None:
        out = np.full(acc.shape, np.nan, np.float32)
    else:
        out.fill(np.nan)
    ok = wsum > 0
    if valid is not None:
        ok &= valid
    np.divide(acc, wsum, out=out, where=np.broadcast_to(ok, acc.shape), casting="unsafe")
    return out


#: A strip of window sums handed to a later block: ((row, col) offset in that block, (acc, wsum)),
#: or None in place of the sums when the earlier block ran no window.
Strip = tuple[tuple[int, int], tuple[np.ndarray, np.ndarray] | None]


@dataclass
class BlockSums:
    """What a block's own windows produced, on the block plus the strip they reach into."""

    block_valid: np.ndarray  # (bh, bw) bool: the block's own pixels
    acc: np.ndarray | None  # (k, eh, ew) float64 weighted sums, None when no window ran
    wsum: np.ndarray | None  # (eh, ew) float64 summed weights

    @classmethod
    def zeros(cls, block_valid: np.ndarray, bands: int, extent: tuple[int, int]) -> BlockSums:
        """Empty float64 sums of ``bands`` values over an ``extent`` (rows, cols) from the block's origin."""
        return cls(block_valid, np.zeros((bands, *extent), np.float64), np.zeros(extent, np.float64))

    def add(self, values: np.ndarray, weights: np.ndarray, row: int, col: int) -> None:
        """Add one window's ``values`` (k, tile, tile) with ``weights`` at (row, col) of the extent."""
        assert self.acc is not None
        add_window(self.acc, self.wsum, values, weights, row, col)

    def strip(self, rows: tuple[int, int], cols: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
        """Copies of the sums in ``rows`` x ``cols`` of the extent (the part a later block gets)."""
        if self.acc is None or self.wsum is None:
            return None
        acc, wsum = self.acc[:, rows[0] : rows[1], cols[0] : cols[1]], self.wsum[rows[0] : rows[1], cols[0] : cols[1]]
        return acc.copy(), wsum.copy()


#: Float64 window sums and weights over some rows and columns: (acc (k, rows, cols), wsum (rows, cols)).
Sums = tuple[np.ndarray, np.ndarray]


def _empty_sums(bands: int, rows: int, cols: int) -> Sums:
    return np.zeros((bands, max(rows, 0), max(cols, 0)), np.float64), np.zeros((max(rows, 0), max(cols, 0)), np.float64)


@dataclass
class CompactSums:
    """A block's window sums once all its windows were added (:class:`RollingSums`): its values
    divided already (float32), the float64 sums kept only where other blocks' strips are still
    added (the block's first ``top`` rows, and its first ``left`` columns below them) and past the
    block (what later blocks take: the columns right of it, the rows below it)."""

    block_valid: np.ndarray  # (bh, bw) bool
    values: np.ndarray  # (k, bh, bw) float32: :func:`finalize` of the block's own sums
    top: Sums  # rows [0, top) x cols [0, bw) of the block
    left: Sums  # rows [top, bh) x cols [0, left)
    right: Sums  # rows [0, eh) x cols [bw, ew) of the extent
    below: Sums  # rows [bh, eh) x cols [0, bw)

    def strip(self, rows: tuple[int, int], cols: tuple[int, int]) -> Sums:
        """Copies of the sums in ``rows`` x ``cols`` of the extent, past the block (a later block's part)."""
        bh, bw = self.block_valid.shape
        if cols[0] >= bw:
            (acc, wsum), r, c = self.right, rows, (cols[0] - bw, cols[1] - bw)
        elif rows[0] >= bh and cols[1] <= bw:
            (acc, wsum), r, c = self.below, (rows[0] - bh, rows[1] - bh), cols
        else:
            raise GridError(f"rows {rows} x columns {cols} are not past the block of {bh} x {bw} px")
        return acc[:, r[0] : r[1], c[0] : c[1]].copy(), wsum[r[0] : r[1], c[0] : c[1]].copy()

    def own(self, rows: tuple[int, int], cols: tuple[int, int]) -> Sums:
        """Copies of the block's own sums in ``rows`` x ``cols``, inside its first ``top`` rows and
        ``left`` columns (where other blocks' strips are added)."""
        top, left = self.top[1].shape[0], self.left[1].shape[1]
        parts = []
        if rows[0] < top:
            parts.append(tuple(a[..., rows[0] : min(rows[1], top), cols[0] : cols[1]] for a in self.top))
        if rows[1] > top:
            if cols[1] > left:
                raise GridError(f"the sums of rows {rows} x columns {cols} were not kept (first {top} rows, {left} columns)")
            r0, r1 = max(rows[0], top) - top, rows[1] - top
            parts.append(tuple(a[..., r0:r1, cols[0] : cols[1]] for a in self.left))
        return np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts], axis=0)


class RollingSums:
    """One block's window sums, added in the order of the windows' origin rows and kept in float64
    only over the rows later windows may still reach: rows no window will reach any more are
    settled (:meth:`settle`) into a :class:`CompactSums`, the same values bit for bit as
    :class:`BlockSums` over the whole extent gives (every pixel's sum is added in the same order).

    ``top``/``left``: the block's first rows/columns that strips of earlier blocks cover.
    """

    def __init__(self, block_valid: np.ndarray, bands: int, extent: tuple[int, int], top: int, left: int) -> None:
        (bh, bw), (eh, ew) = block_valid.shape, extent
        top, left = min(top, bh), min(left, bw)
        self.block_valid, self.extent = block_valid, extent
        self.out = CompactSums(block_valid, np.empty((bands, bh, bw), np.float32), _empty_sums(bands, top, bw),
                               _empty_sums(bands, bh - top, left), _empty_sums(bands, eh, ew - bw),
                               _empty_sums(bands, eh - bh, bw))
        self.row0 = 0  # the first row not settled: row 0 of the accumulators
        self.acc, self.wsum = _empty_sums(bands, 0, ew)

    def reach(self, end: int) -> None:
        """Grow the accumulators down to row ``end`` of the extent (new rows at 0): once for the
        windows about to be added, rather than window by window."""
        rows = min(end, self.extent[0]) - self.row0
        if rows > self.wsum.shape[0]:
            acc, wsum = _empty_sums(self.acc.shape[0], rows, self.extent[1])
            acc[:, : self.wsum.shape[0]], wsum[: self.wsum.shape[0]] = self.acc, self.wsum
            self.acc, self.wsum = acc, wsum

    def add(self, values: np.ndarray, weights: np.ndarray, row: int, col: int) -> None:
        """Add one window's ``values`` (k, tile, tile) with ``weights`` at (row, col) of the extent
        (``row`` at or past the rows settled)."""
        self.reach(row + weights.shape[0])
        # the accumulators may reach past the extent's last row: windows are clipped to the extent
        acc, wsum = self.acc[:, : self.extent[0] - self.row0], self.wsum[: self.extent[0] - self.row0]
        add_window(acc, wsum, values, weights, row - self.row0, col)

    def settle(self, end: int) -> None:
        """Rows before ``end`` of the extent get no more windows: move them out of the accumulators."""
        a, b = self.row0, min(end, self.extent[0])
        if b <= a:
            return
        self.reach(b)
        (bh, bw), out = self.block_valid.shape, self.out
        top, left = out.top[1].shape[0], out.left[1].shape[1]
        acc, wsum = self.acc[:, : b - a], self.wsum[: b - a]
        _copy_rows(out.right, (acc[..., bw:], wsum[:, bw:]), a)
        _copy_rows(out.below, (acc[:, :, :bw], wsum[:, :bw]), a - bh)
        _copy_rows(out.top, (acc[:, :, :bw], wsum[:, :bw]), a)
        _copy_rows(out.left, (acc[:, :, :left], wsum[:, :left]), a - top)
        if a < bh:
            n = min(b, bh) - a
            finalize(acc[:, :n, :bw], wsum[:n, :bw], self.block_valid[a : a + n], out.values[:, a : a + n])
        keep = self.wsum.shape[0] - (b - a)  # rows still open move to the top; the freed rows start again at 0
        self.acc[:, :keep], self.wsum[:keep] = self.acc[:, b - a :].copy(), self.wsum[b - a :].copy()
        self.acc[:, keep:], self.wsum[keep:] = 0, 0
        self.row0 = b

    def result(self) -> CompactSums:
        """The compact sums, once every row is settled."""
        self.settle(self.extent[0])
        return self.out


def _copy_rows(dst: Sums, src: Sums, offset: int) -> None:
    """Copy the rows of ``src`` into ``dst`` starting at row ``offset`` of ``dst`` (those that fit)."""
    n = dst[1].shape[0]
    lo, hi = max(0, -offset), min(src[1].shape[0], n - offset)
    if hi > lo:
        cols = dst[1].shape[1]
        dst[0][:, offset + lo : offset + hi] = src[0][:, lo:hi, :cols]
        dst[1][offset + lo : offset + hi] = src[1][lo:hi, :cols]


def blend_block(bands: int, owned: BlockSums | CompactSums, strips: Sequence[Strip], out: np.ndarray | None = None) -> np.ndarray:
    """The block's blended values (``bands``, bh, bw) float32: its own window sums plus the strips
    earlier blocks left on it, divided by the summed weights (:func:`finalize`); into ``out`` when given.

    The block's own sums are read in place (never modified); only the cells of the block that
    strips cover are copied and added to, each strip in the order given (the same sums, bit for
    bit, as adding every strip to a copy of the whole block).
    """
    bh, bw = owned.block_valid.shape
    if not owned.block_valid.any():
        if out is None:
            return np.full((bands, bh, bw), np.nan, np.float32)
        out.fill(np.nan)
        return out
    parts = [(r, c, *part) for (r, c), part in strips if part is not None]
    if isinstance(owned, CompactSums):
        out = owned.values.copy() if out is None else _copied_into(out, owned.values)
        own = owned.own
    else:
        if owned.acc is not None and owned.wsum is not None:
            acc, wsum = owned.acc[:, :bh, :bw], owned.wsum[:bh, :bw]
        else:
            acc, wsum = np.zeros((bands, bh, bw), np.float64), np.zeros((bh, bw), np.float64)
        out = finalize(acc, wsum, owned.block_valid, out)

        def own(rows: tuple[int, int], cols: tuple[int, int]) -> Sums:
            return acc[:, rows[0] : rows[1], cols[0] : cols[1]].copy(), wsum[rows[0] : rows[1], cols[0] : cols[1]].copy()
    # cells between every strip edge: each is covered by a fixed set of strips, or by none
    ys = sorted({0, bh, *(r for r, _, _, w in parts), *(r + w.shape[0] for r, _, _, w in parts)})
    xs = sorted({0, bw, *(c for _, c, _, w in parts), *(c + w.shape[1] for _, c, _, w in parts)})
    for y0, y1 in itertools.pairwise(ys):
        for x0, x1 in itertools.pairwise(xs):
            over = [(r, c, a, w) for r, c, a, w in parts
                    if r <= y0 and y1 <= r + w.shape[0] and c <= x0 and x1 <= c + w.shape[1]]
            if not over:
                continue
            cell_acc, cell_w = own((y0, y1), (x0, x1))
            for r, c, a, w in over:
                cell_acc += a[:, y0 - r : y1 - r, x0 - c : x1 - c]
                cell_w += w[y0 - r : y1 - r, x0 - c : x1 - c]
            out[:, y0:y1, x0:x1] = finalize(cell_acc, cell_w, owned.block_valid[y0:y1, x0:x1])
    return out


def _copied_into(out: np.ndarray, values: np.ndarray) -> np.ndarray:
    out[...] = values
    return out

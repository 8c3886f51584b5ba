"""The window grid: where model windows sit on a scene.

A :class:`WindowGrid` places square ``tile`` x ``tile`` windows on a
``height`` x ``width`` scene with ``overlap`` pixels between neighbours
(``stride = tile - overlap``). Along each axis the starts are
``0, stride, 2 * stride, ...`` and a last window aligned to the scene's end,
so the last row and column are always covered. A scene side shorter than a
tile gets one window starting at 0 that reaches past the scene; the caller
pads it with invalid pixels.

The grid is global: it depends only on the scene shape, never on how the
scene is split into processing blocks. Every window is computed exactly once,
by the block that holds its origin (:meth:`WindowGrid.block_windows`); the
block reads its own pixels plus the strip its last windows reach into
(:meth:`WindowGrid.block_read_extent`, at most ``tile - 1`` pixels below and
to the right), and the parts of its windows that fall on later blocks are
handed to them before blending, so block results agree with a whole-scene run.

Everything here is a pure function of integers and arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from pipeline.core.errors import GridError

Span = tuple[int, int]  # half-open [start, stop)


def axis_starts(length: int, tile: int, stride: int) -> np.ndarray:
    """Window starts along one axis of ``length`` pixels (int64, sorted, unique).

    Starts are multiples of ``stride`` plus one window aligned to the end;
    ``length <= tile`` gives the single start 0.
    """
    if length < 1 or tile < 1 or stride < 1:
        raise GridError(f"length, tile and stride must be positive, got {length}, {tile}, {stride}")
    if length <= tile:
        return np.zeros(1, np.int64)
    last = length - tile
    starts = np.arange(0, last, stride, dtype=np.int64)
    return np.append(starts, np.int64(last))


def owned(starts: np.ndarray, span: Span) -> np.ndarray:
    """The subset of ``starts`` that lie in ``span`` (the windows a block computes)."""
    lo, hi = span
    return starts[int(np.searchsorted(starts, lo, side="left")) : int(np.searchsorted(starts, hi, side="left"))]


def block_spans(length: int, block: int) -> list[Span]:
    """Split ``[0, length)`` into consecutive spans of ``block`` pixels (last one shorter)."""
    if block < 1:
        raise GridError(f"block size must be positive, got {block}")
    return [(lo, min(lo + block, length)) for lo in range(0, length, block)]


def round_block_size(block: int, stride: int) -> int:
    """``block`` rounded down to a multiple of ``stride`` (at least one stride).

    Blocks that start on the stride lattice are crossed by the fewest
    windows, so the fewest windows are computed twice.
    """
    return max(stride, (block // stride) * stride)


def valid_counts(valid: np.ndarray, rows: np.ndarray, cols: np.ndarray, tile: int) -> np.ndarray:
    """Number of valid pixels in every window of ``rows`` x ``cols``.

    ``valid`` is a 2-D bool array; ``rows``/``cols`` are window origins in
    its coordinates (windows may reach past its end, never before 0).
    Returns an int64 array of shape (len(rows), len(cols)). Uses a summed-area
    table, so the cost does not depend on the number of windows.
    """
    h, w = valid.shape
    r0 = np.clip(rows, 0, h)
    r1 = np.clip(rows + tile, 0, h)
    c0 = np.clip(cols, 0, w)
    c1 = np.clip(cols + tile, 0, w)
    if valid.all():  # the usual block: every window counts its area, no table needed
        return np.outer(r1 - r0, c1 - c0).astype(np.int64)
    sat = np.zeros((h + 1, w + 1), np.int64)
    np.cumsum(np.cumsum(valid, axis=0, dtype=np.int64), axis=1, out=sat[1:, 1:])
    return sat[np.ix_(r1, c1)] - sat[np.ix_(r0, c1)] - sat[np.ix_(r1, c0)] + sat[np.ix_(r0, c0)]


@dataclass(frozen=True)
class WindowGrid:
    """Windows of ``tile`` px with ``overlap`` px overlap on a ``height`` x ``width`` scene."""

    height: int
    width: int
    tile: int
    overlap: int = 0

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise GridError(f"scene must have a positive shape, got {self.height} x {self.width}")
        if self.tile < 1:
            raise GridError(f"tile size must be positive, got {self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise GridError(
                f"model.overlap must be in [0, tile size) = [0, {self.tile}), got {self.overlap}"
            )

    @property
    def stride(self) -> int:
        """Distance between consecutive window starts."""
        return self.tile - self.overlap

    @cached_property
    def row_starts(self) -> np.ndarray:
        """Window starts along y."""
        return axis_starts(self.height, self.tile, self.stride)

    @cached_property
    def col_starts(self) -> np.ndarray:
        """Window starts along x."""
        return axis_starts(self.width, self.tile, self.stride)

    def __len__(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    def windows(self) -> list[tuple[int, int]]:
        """All window origins (row, col) in row-major order."""
        return [(int(r), int(c)) for r in self.row_starts for c in self.col_starts]

    def block_windows(self, rows: Span, cols: Span) -> tuple[np.ndarray, np.ndarray]:
        """Row and column starts of the windows a block computes: those with their origin in it.

        Over any partition of the scene into blocks, every window belongs to
        exactly one block.
        """
        return owned(self.row_starts, rows), owned(self.col_starts, cols)

    def block_read_extent(self, rows: Span, cols: Span) -> tuple[Span, Span]:
        """Pixels (clipped to the scene) a block reads: the block and everything its windows cover.

        The extent starts at the block's origin and reaches past its end only
        where its last windows do (by less than a tile).
        """
        r, c = self.block_windows(rows, cols)
        y1 = max(rows[1], min(int(r[-1]) + self.tile, self.height)) if len(r) else rows[1]
        x1 = max(cols[1], min(int(c[-1]) + self.tile, self.width)) if len(c) else cols[1]
        return (rows[0], y1), (cols[0], x1)

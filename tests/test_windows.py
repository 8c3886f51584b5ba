"""Window grid arithmetic (property tests)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.errors import GridError
from tiling.windows import (
    WindowGrid,
    axis_starts,
    block_spans,
    owned,
    round_block_size,
    valid_counts,
)

lengths = st.integers(1, 3000)
tiles = st.integers(1, 256)


@st.composite
def grids(draw: st.DrawFn) -> WindowGrid:
    tile = draw(st.integers(1, 64))
    overlap = draw(st.integers(0, tile - 1))
    return WindowGrid(draw(st.integers(1, 400)), draw(st.integers(1, 400)), tile, overlap)


@given(length=lengths, tile=tiles, data=st.data())
def test_axis_starts_cover_every_pixel_within_bounds(length: int, tile: int, data: st.DataObject) -> None:
    stride = data.draw(st.integers(1, tile))
    starts = axis_starts(length, tile, stride)
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()
    assert starts[0] == 0
    assert np.all(np.diff(starts) > 0)
    assert np.all(np.diff(starts) <= stride)
    assert starts[-1] == max(0, length - tile)  # last window aligned to the end (or one padded window)
    # no window more than needed: all but the last sit on the stride lattice
    assert np.all(starts[:-1] % stride == 0)


@given(length=lengths, tile=tiles, data=st.data())
def test_owned_matches_brute_force(length: int, tile: int, data: st.DataObject) -> None:
    stride = data.draw(st.integers(1, tile))
    starts = axis_starts(length, tile, stride)
    lo = data.draw(st.integers(0, length - 1))
    hi = data.draw(st.integers(lo + 1, length))
    assert owned(starts, (lo, hi)).tolist() == [s for s in starts if lo <= s < hi]


@given(length=lengths, block=st.integers(1, 5000))
def test_block_spans_partition_the_axis(length: int, block: int) -> None:
    spans = block_spans(length, block)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert all(0 < hi - lo <= block for lo, hi in spans)


@given(block=st.integers(1, 10000), stride=st.integers(1, 512))
def test_round_block_size_is_a_positive_multiple_of_the_stride(block: int, stride: int) -> None:
    b = round_block_size(block, stride)
    assert b % stride == 0 and b >= stride
    assert b <= max(block, stride)


@settings(max_examples=60, deadline=None)
@given(wg=grids(), data=st.data())
def test_blocks_own_every_window_once_and_read_what_their_windows_cover(
    wg: WindowGrid, data: st.DataObject
) -> None:
    block = data.draw(st.integers(1, 200))
    seen: list[tuple[int, int]] = []
    for r0, r1 in block_spans(wg.height, block):
        for c0, c1 in block_spans(wg.width, block):
            rows, cols = wg.block_windows((r0, r1), (c0, c1))
            mine = [(int(r), int(c)) for r in rows for c in cols]
            assert all(r0 <= r < r1 and c0 <= c < c1 for r, c in mine)
            seen += mine
            (y0, y1), (x0, x1) = wg.block_read_extent((r0, r1), (c0, c1))
            assert (y0, x0) == (r0, c0) and r1 <= y1 <= wg.height and c1 <= x1 <= wg.width
            assert y1 - r1 < wg.tile and x1 - c1 < wg.tile
            for r, c in mine:
                assert min(r + wg.tile, wg.height) <= y1 and min(c + wg.tile, wg.width) <= x1
    assert sorted(seen) == sorted(wg.windows())  # every window exactly once


@settings(max_examples=40, deadline=None)
@given(
    valid=st.integers(1, 40).flatmap(
        lambda h: st.integers(1, 40).flatmap(
            lambda w: st.lists(st.booleans(), min_size=h * w, max_size=h * w).map(
                lambda v: np.array(v, bool).reshape(h, w)
            )
        )
    ),
    tile=st.integers(1, 16),
)
def test_valid_counts_match_a_direct_count(valid: np.ndarray, tile: int) -> None:
    rows = axis_starts(valid.shape[0], tile, max(1, tile // 2))
    cols = axis_starts(valid.shape[1], tile, max(1, tile // 2))
    for mask in (valid, np.ones_like(valid)):  # all valid takes a shortcut: same counts
        counts = valid_counts(mask, rows, cols, tile)
        assert counts.dtype == np.int64 and counts.shape == (len(rows), len(cols))
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                assert counts[i, j] == mask[r : r + tile, c : c + tile].sum()


def test_scene_smaller_than_a_tile_gets_one_window() -> None:
    wg = WindowGrid(1, 1, 128, 32)
    assert wg.windows() == [(0, 0)]
    wg = WindowGrid(100, 300, 128, 32)
    assert wg.row_starts.tolist() == [0]
    assert wg.col_starts.tolist() == [0, 96, 172]


def test_full_sentinel2_tile_window_count() -> None:
    wg = WindowGrid(10980, 10980, 128, 32)
    per_axis = len(range(0, 10980 - 128, 96)) + 1
    assert len(wg) == per_axis**2
    assert wg.row_starts[-1] == 10980 - 128


@pytest.mark.parametrize(("tile", "overlap"), [(128, 128), (128, -1), (0, 0)])
def test_invalid_window_grids_are_refused(tile: int, overlap: int) -> None:
    with pytest.raises(GridError):
        WindowGrid(100, 100, tile, overlap)

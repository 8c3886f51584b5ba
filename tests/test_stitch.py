"""Blend weights, accumulation, and blocks that hand their windows' reach on to later blocks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.errors import GridError
from tiling.stitch import (
    BlockSums,
    add_window,
    axis_profile,
    blend_block,
    default_margin,
    finalize,
    window_weights,
)
from tiling.windows import WindowGrid, block_spans


@st.composite
def layouts(draw: st.DrawFn) -> tuple[WindowGrid, int]:
    tile = draw(st.integers(2, 48))
    overlap = draw(st.integers(0, tile - 1))
    margin = draw(st.integers(0, max(0, (overlap - 1) // 2)))
    wg = WindowGrid(draw(st.integers(1, 200)), draw(st.integers(1, 200)), tile, overlap)
    return wg, margin


def _stitch(wg: WindowGrid, margin: int, value_of: object) -> tuple[np.ndarray, np.ndarray]:
    acc = np.zeros((1, wg.height, wg.width))
    wsum = np.zeros((wg.height, wg.width))
    for r, c in wg.windows():
        w = window_weights(wg.tile, wg.overlap, margin, r, c, wg.height, wg.width)
        add_window(acc, wsum, value_of(r, c)[None], w, r, c)  # type: ignore[operator]
    return acc, wsum


@settings(max_examples=80, deadline=None)
@given(layout=layouts(), value=st.floats(0.0, 1.0))
def test_constant_windows_stitch_to_a_constant_raster(layout: tuple[WindowGrid, int], value: float) -> None:
    wg, margin = layout
    acc, wsum = _stitch(wg, margin, lambda r, c: np.full((wg.tile, wg.tile), value))
    assert np.all(wsum > 0)  # every pixel gets weight: no holes, no dark edges
    out = finalize(acc, wsum)
    np.testing.assert_allclose(out, value, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(tile=st.integers(4, 64), data=st.data())
def test_profiles_sum_to_one_on_a_regular_lattice(tile: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(1, tile // 2))
    margin = data.draw(st.integers(0, (overlap - 1) // 2))
    stride = tile - overlap
    n = 5
    length = stride * (n - 1) + tile
    total = np.zeros(length)
    for k in range(n):
        s = k * stride
        total[s : s + tile] += axis_profile(tile, overlap, margin, s == 0, s + tile >= length)
    np.testing.assert_allclose(total, 1.0, atol=1e-12)


def test_profile_has_zero_margin_inside_and_full_weight_at_scene_border() -> None:
    prof = axis_profile(16, 8, 2, lead_border=False, trail_border=False)
    assert prof[:2].tolist() == [0.0, 0.0] and prof[-2:].tolist() == [0.0, 0.0]
    assert np.all(prof[2:-2] > 0) and prof[8] == 1.0
    border = axis_profile(16, 8, 2, lead_border=True, trail_border=False)
    assert np.all(border[:8] == 1.0) and border[-1] == 0.0


def test_no_overlap_means_uniform_weights() -> None:
    assert np.all(axis_profile(8, 0, 0, False, False) == 1.0)


def test_margin_must_leave_a_ramp() -> None:
    with pytest.raises(GridError):
        axis_profile(16, 8, 4, False, False)
    assert default_margin(32) == 8


def test_add_window_clips_to_the_accumulator() -> None:
    acc = np.zeros((1, 4, 4))
    wsum = np.zeros((4, 4))
    add_window(acc, wsum, np.ones((1, 3, 3)), np.full((3, 3), 2.0), -1, 2)
    expected = np.zeros((4, 4))
    expected[0:2, 2:4] = 2.0
    np.testing.assert_array_equal(wsum, expected)
    np.testing.assert_array_equal(acc[0], expected)
    add_window(acc, wsum, np.ones((1, 3, 3)), np.ones((3, 3)), 10, 10)  # fully outside: ignored
    np.testing.assert_array_equal(wsum, expected)


def test_finalize_gives_nan_without_weight_or_validity() -> None:
    acc = np.array([[[2.0, 1.0], [0.0, 3.0]]])
    wsum = np.array([[2.0, 0.0], [1.0, 3.0]])
    valid = np.array([[True, True], [False, True]])
    out = finalize(acc, wsum, valid)
    assert out.dtype == np.float32
    assert out[0, 0, 0] == 1.0 and np.isnan(out[0, 0, 1]) and np.isnan(out[0, 1, 0]) and out[0, 1, 1] == 1.0


def test_block_blend_adds_the_strips_of_earlier_blocks_bit_for_bit() -> None:
    """A block's own window sums are read in place and only the cells that strips cover are
    copied: the result equals adding every strip, in order, to a copy of the whole block, and the
    block's own sums are left as they were."""
    rng = np.random.default_rng(7)
    bh, bw, reach = 70, 90, 24
    valid = rng.random((bh, bw)) > 0.05
    acc = rng.random((2, bh + reach, bw + reach))
    wsum = rng.random((bh + reach, bw + reach)) + (rng.random((bh + reach, bw + reach)) > 0.1)
    owned = BlockSums(valid, acc, wsum)
    before = acc.copy(), wsum.copy()

    def strip(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.random((2, h, w)), rng.random((h, w))

    spills = [((0, 0), strip(reach, reach)),  # from the block above and to the left
              ((0, 0), strip(reach, bw)),  # from the block above
              ((0, 0), None),  # a neighbour whose windows left nothing here
              ((0, 0), strip(bh, reach)),  # from the block to the left
              ((0, 30), strip(reach, 40))]  # a narrower strip, overlapping the others

    expect_acc, expect_w = acc[:, :bh, :bw].copy(), wsum[:bh, :bw].copy()
    for (r, c), part in spills:
        if part is not None:
            a, w = part
            expect_acc[:, r:r + w.shape[0], c:c + w.shape[1]] += a
            expect_w[r:r + w.shape[0], c:c + w.shape[1]] += w
    expected = finalize(expect_acc, expect_w, valid)
    got = blend_block(2, owned, spills)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(acc, before[0])
    np.testing.assert_array_equal(wsum, before[1])
    alone = finalize(acc[:, :bh, :bw], wsum[:bh, :bw], valid)
    np.testing.assert_array_equal(blend_block(2, owned, [((0, 0), None)]), alone)


def test_blocks_that_hand_on_their_strips_blend_like_one_whole_scene_accumulator() -> None:
    """Each window summed once, in the block holding its origin, over the block's read extent; the
    parts on later blocks handed on as strips: every block blends what one accumulator over the
    whole scene gives."""
    wg, margin, block = WindowGrid(70, 90, 16, 6), 1, 20
    rng = np.random.default_rng(3)
    values = {w: rng.random((1, 16, 16)) for w in wg.windows()}
    acc, wsum = np.zeros((1, 70, 90)), np.zeros((70, 90))
    for (r, c), v in values.items():
        add_window(acc, wsum, v, window_weights(16, 6, margin, r, c, 70, 90), r, c)
    expected = finalize(acc, wsum)
    rows, cols = block_spans(70, block), block_spans(90, block)
    owned, strips = {}, {(i, j): [] for i in range(len(rows)) for j in range(len(cols))}
    for i, j in strips:
        (ry0, ry1), (rx0, rx1) = wg.block_read_extent(rows[i], cols[j])
        bh, bw = rows[i][1] - rows[i][0], cols[j][1] - cols[j][0]
        sums = owned[i, j] = BlockSums.zeros(np.ones((bh, bw), bool), 1, (ry1 - ry0, rx1 - rx0))
        wr, wc = wg.block_windows(rows[i], cols[j])
        for r in wr.tolist():
            for c in wc.tolist():
                sums.add(values[r, c], window_weights(16, 6, margin, r, c, 70, 90), r - ry0, c - rx0)
        for k in range(i, len(rows)):
            for m in range(j, len(cols)):
                (ty0, ty1), (tx0, tx1) = rows[k], cols[m]
                y0, y1, x0, x1 = max(ry0, ty0), min(ry1, ty1), max(rx0, tx0), min(rx1, tx1)
                if (k, m) != (i, j) and y0 < y1 and x0 < x1:
                    part = sums.strip((y0 - ry0, y1 - ry0), (x0 - rx0, x1 - rx0))
                    strips[k, m].append(((y0 - ty0, x0 - tx0), part))
    out = np.block([[blend_block(1, owned[i, j], strips[i, j]) for j in range(len(cols))] for i in range(len(rows))])
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=0)
    assert BlockSums(np.ones((2, 2), bool), None, None).strip((0, 1), (0, 1)) is None  # no window ran

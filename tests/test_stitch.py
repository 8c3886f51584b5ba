"""Blend weights and accumulation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.errors import GridError
from tiling.stitch import add_window, axis_profile, default_margin, finalize, window_weights
from tiling.windows import WindowGrid


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

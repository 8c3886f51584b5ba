"""Nothing lost, nothing leaked at window and block edges: a landslide at every offset of the window grid.

One scene holds a 7 x 7 px square at every offset of the window lattice modulo the stride, in
rows and in columns (square k at row 11 k and column 11 (7 k mod stride): 11 and 77 are prime
to every stride used), squares across each corner of the inference blocks, squares on the scene's
borders, and a scene whose last window (aligned to the scene's end) starts 1 px after a lattice
window in x and stride - 1 px after one in y. A tiny in-memory model (128 px windows) turns one
channel into a probability:

* ``pixel``: a steep function of the pixel itself, so the expected mask is the painted squares;
* ``box3``: a steep function of the 3 x 3 mean (zero padding at window edges, a receptive field
  of 1 px), so the expected mask is the whole-scene 3 x 3 mean above 0.6 (each square without
  its four corners), computed here with SciPy on the whole scene: window edges must not show (at
  a window's edge a square's edge pixel sees 4/9 instead of 6/9, which an unweighted blend of
  two windows would already lose).

Every pixel must get a probability, each square must come back as exactly one polygon with its
pixels (the area within one pixel), and the cleaned mask must equal the expected one pixel for
pixel. The probability is computed once and handed to the postprocessing in the inference's
blocks (a run hands it over through an intermediate raster).
"""

from __future__ import annotations

from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
import pytest
import shapely
import torch
import xarray as xr
from affine import Affine
from rasterio.crs import CRS
from scipy import ndimage

from pipeline.core.config import PostprocessSection
from pipeline.core.grid import Grid
from pipeline.inference.options import InferenceOptions
from pipeline.inference.runtime import clear_model_cache
from pipeline.inference.tiled import predict
from pipeline.model.artefact import ModelArtefact
from postprocess.polygons import polygons_from_probability

TILE = 128
SIDE = 7         # square edge (px)
SPACING = 11     # row step between squares (and column unit): 4 px gaps at least
COL_FACTOR = 7   # column of square k: SPACING * (COL_FACTOR * k mod stride)
RES = 10.0
BOX3_LEVEL = 0.6  # the box3 model's 3 x 3 mean at probability 0.5
PLAIN = PostprocessSection(opening_radius_m=0, closing_radius_m=0, min_area_m2=0, max_hole_m2=0,
                           min_mean_slope_deg=None, simplify_m=0)


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="synchronous"):
        yield
    clear_model_cache()


class PixelModel(torch.nn.Module):
    """Logit 40 (x - 0.5) of the one input channel: probability ~1 on 1.0, ~0 on 0.0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 40.0 * (x[:, :1] - 0.5)


class Box3Model(torch.nn.Module):
    """Logit 40 (mean of the 3 x 3 neighbourhood - 0.6), zero-padded at the window's edges."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.nn.functional.avg_pool2d(x[:, :1], 3, stride=1, padding=1, count_include_pad=True)
        return 40.0 * (mean - BOX3_LEVEL)


def _art(module: torch.nn.Module) -> ModelArtefact:
    return ModelArtefact("PlainUnet", None, ["B04"], normalization={"method": "none"}, tile_size=TILE,
                         module=module.eval())


@dataclass
class Scene:
    paint: np.ndarray                    # (H, W) float32 in {0, 1}
    squares: list[tuple[int, int]]       # top-left (row, col) of each square
    block: int                           # inference block edge (a multiple of the stride)
    stride: int


def _overlaps(a: tuple[int, int], b: tuple[int, int], gap: int = 3) -> bool:
    return abs(a[0] - b[0]) < SIDE + gap and abs(a[1] - b[1]) < SIDE + gap


def _scene(overlap: int, blocks_per_stride: int) -> Scene:
    stride = TILE - overlap
    block = blocks_per_stride * stride
    # squares across the corners of the inference blocks (3 px above and left of each corner)
    corners: list[tuple[int, int]] = []
    offset_squares: list[tuple[int, int]] = []
    n_rows = SPACING * stride + SIDE
    corners = [(r - 3, c - 3) for r in range(block, n_rows, block) for c in range(block, SPACING * stride, block)]
    for k in range(stride):
        r, c = SPACING * k, SPACING * ((COL_FACTOR * k) % stride)
        while any(_overlaps((r, c), q) for q in corners):
            c += stride  # same offset modulo the stride, clear of the corner squares
        offset_squares.append((r, c))
    # a last window 1 px past a lattice window in x and stride - 1 px past one in y, with room for
    # squares on the scene's borders, which the last windows alone cover
    need_h = max(r for r, _ in offset_squares + corners) + SIDE + 4
    need_w = max(c for _, c in offset_squares + corners) + SIDE + 4
    height = TILE + stride * -(-(need_h - TILE) // stride) + stride - 1
    width = TILE + stride * (-(-(need_w - TILE) // stride) + 1) + 1
    border = [(0, width - SIDE), (height - SIDE, 0), (height - SIDE, width - SIDE), (height - SIDE, width // 2),
              (height // 2, width - SIDE)]
    squares = offset_squares + corners + border
    paint = np.zeros((height, width), np.float32)
    for r, c in squares:
        assert not paint[max(r - 2, 0):r + SIDE + 2, max(c - 2, 0):c + SIDE + 2].any(), "squares too close"
        paint[r:r + SIDE, c:c + SIDE] = 1.0
    # the set-up: every offset modulo the stride in rows and in columns, squares across block corners
    assert {r % stride for r, _ in offset_squares} == set(range(stride))
    assert {c % stride for _, c in offset_squares} == set(range(stride))
    assert corners and all(r < (r // block + 1) * block < r + SIDE for r, _ in corners)
    assert (width - TILE) % stride == 1 and (height - TILE) % stride == stride - 1
    return Scene(paint, squares, block, stride)


def _expected_mask(paint: np.ndarray, model: str) -> np.ndarray:
    if model == "pixel":
        return paint > 0.5
    return ndimage.uniform_filter(paint.astype(np.float64), size=3, mode="constant", cval=0.0) > BOX3_LEVEL


CASES = [  # (overlap, inference block in strides, model)
    pytest.param(32, 1, "pixel", id="overlap32-block96-pixel"),     # windows reach across a whole block
    pytest.param(32, 4, "box3", id="overlap32-block384-box3"),
    pytest.param(32, 1, "box3", id="overlap32-block96-box3"),
    pytest.param(0, 2, "pixel", id="overlap0-block256-pixel"),
    pytest.param(11, 3, "box3", id="overlap11-block351-box3"),      # odd stride 117, blend margin 2
]


@pytest.mark.parametrize(("overlap", "blocks", "model"), CASES)
def test_a_landslide_at_every_window_offset_is_one_polygon_with_its_pixels(overlap: int, blocks: int,
                                                                          model: str) -> None:
    scene = _scene(overlap, blocks)
    h, w = scene.paint.shape
    grid = Grid(CRS.from_epsg(32633), Affine(RES, 0, 500000.0, 0, -RES, 5000000.0), w, h)
    data = xr.DataArray(scene.paint[None], dims=("band", "y", "x"), coords={"band": ["B04"]})
    valid = xr.DataArray(np.ones((h, w), bool), dims=("y", "x"))
    module = PixelModel() if model == "pixel" else Box3Model()
    opts = InferenceOptions(device="cpu", overlap=overlap, block_size=scene.block, batch_size=32, precision="fp32")
    pred = predict(data, valid, grid, [_art(module)], opts)
    chunks = pred.probability.data.chunks
    assert chunks[0][0] == chunks[1][0] == scene.block  # the blocks the corner squares cross
    prob = pred.probability.values
    assert np.isfinite(prob).all(), f"{(~np.isfinite(prob)).sum()} pixels without a prediction"
    assert prob.min() >= 0.0 and prob.max() <= 1.0

    lazy = xr.DataArray(da.from_array(prob, chunks=chunks), dims=("y", "x"))
    gdf, mask = polygons_from_probability(lazy, valid, grid, PLAIN, threshold=0.5)
    expected = _expected_mask(scene.paint, model)
    got = np.asarray(mask.values)
    lost, leaked = np.argwhere(expected & ~got), np.argwhere(got & ~expected)
    assert not len(lost) and not len(leaked), f"lost {lost[:5].tolist()}, leaked {leaked[:5].tolist()} (row, col)"

    assert len(gdf) == len(scene.squares)
    t = grid.transform
    found = []
    for r, c in scene.squares:
        own = expected[r:r + SIDE, c:c + SIDE]
        n = int(own.sum())
        assert n == (SIDE * SIDE if model == "pixel" else SIDE * SIDE - 4)  # the set-up
        x, y = t.c + (c + SIDE / 2) * RES, t.f - (r + SIDE / 2) * RES  # the square's centre
        hits = np.flatnonzero(shapely.contains_xy(gdf.geometry.values, x, y))
        assert len(hits) == 1, f"square at ({r}, {c}) is in {len(hits)} polygons"
        feature = gdf.iloc[hits[0]]
        assert feature.geometry.is_valid and feature.geometry.geom_type == "Polygon"
        assert feature["n_pixels"] == n, f"square at ({r}, {c})"
        assert abs(feature["area_m2"] - SIDE * SIDE * RES * RES) <= (5 if model == "box3" else 1) * RES * RES
        assert abs(feature["area_m2"] - n * RES * RES) <= RES * RES
        assert abs(feature.geometry.area - n * RES * RES) <= RES * RES
        minx, miny, maxx, maxy = feature.geometry.bounds
        assert (minx, maxy) == (t.c + c * RES, t.f - r * RES)
        assert (maxx, miny) == (minx + SIDE * RES, maxy - SIDE * RES)
        found.append(hits[0])
    assert sorted(found) == list(range(len(gdf)))

"""Vectorization: one valid polygon per object whatever the blocks, exact round trip to the raster."""

from __future__ import annotations

from pathlib import Path

import dask
import dask.array as da
import geopandas as gpd
import numpy as np
import pytest
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import rasterize
from scipy import ndimage as ndi

from pipeline.core.config import PostprocessSection
from pipeline.core.grid import Grid
from postprocess.polygons import polygons_from_probability
from postprocess.vectorize import vectorize_labels

NEPAL_WINDOW = (323190.0, 3107260.0, 326390.0, 3109660.0)


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="synchronous"):
        yield


def make_grid(shape: tuple[int, int], res: float = 10.0, crs: int = 32645, origin=(300000.0, 3100000.0)) -> Grid:
    return Grid(CRS.from_epsg(crs), Affine(res, 0, origin[0], 0, -res, origin[1]), shape[1], shape[0])


def rasterize_back(gdf: gpd.GeoDataFrame, grid: Grid, column: str = "label") -> np.ndarray:
    if len(gdf) == 0:
        return np.zeros(grid.shape, np.int32)
    return rasterize(
        zip(gdf.geometry, gdf[column], strict=True), out_shape=grid.shape, transform=grid.transform, dtype="int32"
    )


@pytest.fixture(scope="module")
def nepal_labels(shared_data: Path) -> tuple[np.ndarray, Grid]:
    """Labels of a rasterized real inventory (4-connected objects)."""
    polygons = gpd.read_file(f"/vsizip/{shared_data / 'inventories' / 'bhuyan_predicted_nepal.zip'}/Nepal/2015.shp")
    grid = Grid.from_bounds(NEPAL_WINDOW, polygons.crs, 10.0)
    mask = rasterize(((g, 1) for g in polygons.geometry), out_shape=grid.shape, transform=grid.transform,
                     dtype="uint8").astype(bool)
    labels, n = ndi.label(mask, ndi.generate_binary_structure(2, 1))
    assert n > 20
    return labels.astype(np.int32), grid


@pytest.mark.parametrize("chunks", [(240, 320), (64, 64), (37, 101)])
def test_real_mask_polygons_are_valid_and_rasterize_back_exactly(nepal_labels, chunks):
    labels, grid = nepal_labels
    gdf = vectorize_labels(da.from_array(labels, chunks=chunks), grid)
    assert len(gdf) == labels.max()
    assert gdf["label"].is_unique
    assert gdf.geometry.is_valid.all()
    assert set(gdf.geom_type) == {"Polygon"}
    assert gdf.crs == grid.crs
    np.testing.assert_array_equal(rasterize_back(gdf, grid), labels)
    # areas equal pixel counts
    counts = np.bincount(labels.ravel())[1:]
    np.testing.assert_allclose(gdf.sort_values("label").area.to_numpy(), counts * grid.pixel_area)


def test_polygons_do_not_depend_on_block_layout(nepal_labels):
    labels, grid = nepal_labels
    whole = vectorize_labels(da.from_array(labels, chunks=-1), grid)
    tiled = vectorize_labels(da.from_array(labels, chunks=(29, 31)), grid)
    assert shapely.equals_exact(whole.geometry.values, tiled.geometry.values, tolerance=0).all()


def test_shapes_across_block_corners_become_one_polygon_each():
    grid = make_grid((40, 40))
    labels = np.zeros((40, 40), np.int32)
    labels[14:26, 18:22] = 1  # a plus centred on the corner of four 20 px blocks
    labels[18:22, 14:26] = 1
    labels[2:12, 15:25] = 2  # a ring across a vertical block edge...
    labels[4:10, 17:23] = 0  # ...with its hole on the edge too
    labels[30:38, 5:35] = 3  # a bar across the bottom blocks
    labels[30:38, 20] = 3
    labels[17:23, 30:36] = 4  # a square on the horizontal edge
    for chunks in [(20, 20), (10, 10), (7, 13)]:
        gdf = vectorize_labels(da.from_array(labels, chunks=chunks), grid)
        assert list(gdf["label"]) == [1, 2, 3, 4], chunks
        assert set(gdf.geom_type) == {"Polygon"}
        assert gdf.geometry.is_valid.all()
        ring = gdf.geometry.iloc[1]
        assert len(ring.interiors) == 1
        assert ring.area == pytest.approx((100 - 36) * 100.0)
        # the plus: 12 exterior vertices plus closure, no seam vertices left
        assert len(gdf.geometry.iloc[0].exterior.coords) == 13
        np.testing.assert_array_equal(rasterize_back(gdf, grid), labels)
        # no duplicates or overlaps between polygons
        assert gdf.geometry.union_all().area == pytest.approx(gdf.area.sum())


def test_landslide_crossing_blocks_is_one_polygon_in_the_full_pipeline():
    grid = make_grid((64, 64))
    prob = np.full((64, 64), 0.05, np.float32)
    yy, xx = np.mgrid[:64, :64]
    prob[(yy - 32) ** 2 + (xx - 32) ** 2 < 15**2] = 0.9  # a disc centred on the corner of four blocks
    valid = np.ones_like(prob, bool)
    params = PostprocessSection(min_area_m2=0, max_hole_m2=0)
    for block in (64, 32, 16):
        gdf, mask = polygons_from_probability(
            da.from_array(prob, chunks=block), da.from_array(valid, chunks=block), grid, params, threshold=0.5
        )
        assert len(gdf) == 1
        assert gdf.geometry.iloc[0].geom_type == "Polygon"
        np.testing.assert_array_equal(rasterize_back(gdf, grid) > 0, mask.values)


def test_diagonal_neighbours_are_separate_polygons():
    """Objects are 4-connected: pixels touching at a corner only are two objects."""
    grid = make_grid((6, 6))
    mask = np.zeros((6, 6), bool)
    mask[1, 1] = mask[2, 2] = True
    labels, n = ndi.label(mask, ndi.generate_binary_structure(2, 1))
    gdf = vectorize_labels(labels.astype(np.int32), grid)
    assert n == 2 and len(gdf) == 2
    assert gdf.geometry.is_valid.all()


def test_polygons_are_valid_for_pinched_shapes():
    """Holes touching the outline at a corner and self-touching outlines stay valid."""
    grid = make_grid((8, 8))
    labels = np.zeros((8, 8), np.int32)
    labels[1:6, 1:6] = 1
    labels[2, 2] = 0  # hole...
    labels[3, 3] = 0  # ...touching another hole at a corner
    labels[1, 5] = 0  # notch
    labels[2, 4] = 0  # touching the notch diagonally: a hole pinched to the outline
    for chunks in [(8, 8), (3, 3), (2, 5)]:
        gdf = vectorize_labels(da.from_array(labels, chunks=chunks), grid)
        assert len(gdf) == 1 and gdf.geometry.is_valid.all()
        np.testing.assert_array_equal(rasterize_back(gdf, grid), labels)


def test_pieces_merge_on_a_geographic_grid_with_inexact_coordinates():
    """Pieces are joined in pixel space, so float rounding of map coordinates cannot split them."""
    grid = Grid(CRS.from_epsg(4326), Affine(8.983e-05, 0, 141.8900123, 0, -8.983e-05, 42.7700321), 50, 50)
    labels = np.zeros((50, 50), np.int32)
    labels[5:45, 5:45] = 1
    labels[20:30, 20:30] = 0
    gdf = vectorize_labels(da.from_array(labels, chunks=(7, 11)), grid)
    assert len(gdf) == 1 and gdf.geometry.is_valid.all()
    assert len(gdf.geometry.iloc[0].interiors) == 1
    assert len(gdf.geometry.iloc[0].exterior.coords) == 5


def test_validity_after_the_map_transform_is_checked_only_where_it_can_round(monkeypatch: pytest.MonkeyPatch):
    """A 10 m UTM grid with an integer origin maps pixel corners exactly (no second validity pass,
    and the polygons are valid all the same); a fractional origin, a degree grid or non-integer
    vertices are checked."""
    import postprocess.vectorize as vec

    square = shapely.box(2, 3, 7, 9)
    assert vec.maps_exactly(np.array([square]), Affine(10, 0, 600000, 0, -10, 5000040))
    assert not vec.maps_exactly(np.array([square]), Affine(10, 0, 600000.5, 0, -10, 5000040))
    assert not vec.maps_exactly(np.array([square]), Affine(8.983e-05, 0, 141.89, 0, -8.983e-05, 42.77))
    assert not vec.maps_exactly(np.array([shapely.box(2, 3, 7.5, 9)]), Affine(10, 0, 600000, 0, -10, 5000040))
    assert not vec.maps_exactly(np.array([square]), Affine(10, 1, 600000, 0, -10, 5000040))

    checked: list[int] = []
    real = vec.map_threads

    def counting(fn, geoms, threads=None):  # noqa: ANN001, ANN202
        if fn is shapely.is_valid:
            checked.append(geoms.size)
        return real(fn, geoms, threads)

    monkeypatch.setattr(vec, "map_threads", counting)
    labels = np.zeros((40, 40), np.int32)
    labels[3:30, 4:33] = 1
    labels[10:14, 10:14] = 0
    labels[14, 14] = 0  # a hole touching another at a corner
    labels[33:38, 2:9] = 2
    for origin, passes in ((600000.0, 1), (600000.5, 2)):
        checked.clear()
        grid = Grid(CRS.from_epsg(32633), Affine(10, 0, origin, 0, -10, 5000040), 40, 40)
        gdf = vectorize_labels(da.from_array(labels, chunks=(16, 16)), grid)
        assert len(gdf) == 2 and gdf.geometry.is_valid.all()
        assert len(checked) == passes
        np.testing.assert_array_equal(rasterize_back(gdf, grid), labels)


def test_simplification_in_metres_keeps_valid_polygons_with_fewer_vertices(nepal_labels):
    labels, grid = nepal_labels
    exact = vectorize_labels(da.from_array(labels, chunks=64), grid)
    simple = vectorize_labels(da.from_array(labels, chunks=64), grid, simplify_m=15.0)
    assert len(simple) == len(exact)
    assert simple.geometry.is_valid.all()
    assert shapely.get_num_coordinates(simple.geometry.values).sum() < 0.8 * shapely.get_num_coordinates(
        exact.geometry.values
    ).sum()
    # close to the exact outline (Douglas-Peucker bounds vertex-to-segment distances by the tolerance)
    assert (simple.geometry.hausdorff_distance(exact.geometry) <= 1.5 * 15.0).all()
    assert not exact.geometry.geom_equals(simple.geometry).all()


def test_empty_label_raster_gives_empty_frame():
    grid = make_grid((10, 10))
    gdf = vectorize_labels(da.zeros((10, 10), dtype=np.int32, chunks=4), grid)
    assert len(gdf) == 0 and gdf.crs == grid.crs


def test_threaded_geometry_functions_give_the_single_thread_result() -> None:
    from postprocess.vectorize import PARALLEL_MIN, map_threads

    rng = np.random.default_rng(5)
    n = PARALLEL_MIN + 1001  # above the threshold, not a multiple of the chunk count
    rings = shapely.buffer(shapely.points(rng.random((n, 2)) * 1e4), rng.uniform(1, 5, n), quad_segs=8)
    for fn in (shapely.is_valid, shapely.normalize, lambda g: shapely.simplify(g, 0.5, preserve_topology=True)):
        alone = fn(rings)
        threaded = map_threads(fn, rings, threads=3)
        assert threaded.shape == alone.shape
        if alone.dtype == bool:
            assert np.array_equal(threaded, alone)
        else:
            assert shapely.equals_exact(threaded, alone, tolerance=0).all()
    small = rings[:10]
    assert shapely.equals_exact(map_threads(shapely.normalize, small, threads=3), shapely.normalize(small), 0).all()


def test_block_pieces_match_rasterio_shapes_ring_for_ring() -> None:
    """The vectorized construction gives exactly the polygons (holes included) of rasterio's shapes."""
    from rasterio.features import shapes
    from scipy import ndimage
    from shapely.geometry import shape

    from postprocess.vectorize import block_pieces

    rng = np.random.default_rng(2)
    mask = ndimage.binary_opening(rng.random((300, 260)) > 0.55)
    labels = ndimage.label(mask)[0].astype(np.int32)
    ids, pieces = block_pieces(labels, (40, 70))
    reference = list(shapes(labels, mask=labels > 0, connectivity=4, transform=Affine.translation(70, 40)))
    assert list(ids) == [int(v) for _, v in reference] and len(ids) > 100
    assert sum(len(p.interiors) for p in pieces) > 0  # holes are part of the comparison
    assert all(shapely.equals_exact(p, shape(g), tolerance=0) for p, (g, _) in zip(pieces, reference, strict=True))
    empty_ids, empty = block_pieces(np.zeros((5, 5), np.int32), (0, 0))
    assert empty_ids.size == 0 and empty == []


def test_block_pieces_have_vertices_at_corners_only() -> None:
    """GDAL's polygonizer puts a vertex only where an outline turns: a piece made by block_pieces
    has no collinear vertex, so only unions across seams need the pass that drops them (the
    output then does not depend on which objects cross a seam, as the layout tests check)."""
    from postprocess.vectorize import block_pieces

    rng = np.random.default_rng(3)
    noise = ndi.gaussian_filter(rng.random((300, 280)), 3)
    mask = noise > np.quantile(noise, 0.6)
    mask[50:60, 50:200] = True  # long straight edges
    mask[55, 60:190] = False  # a one-pixel slit: a hole touching nothing
    mask[120:180:2, 20:40] = True  # combs: many short turns
    labels, n = ndi.label(mask, ndi.generate_binary_structure(2, 1))
    assert n > 20
    for origin in ((0, 0), (2016, 4032)):
        ids, pieces = block_pieces(labels, origin)
        geoms = np.array(pieces, dtype=object)
        assert ids.size == n and shapely.is_valid(geoms).all()
        simplified = shapely.simplify(geoms, 0.0, preserve_topology=True)
        np.testing.assert_array_equal(shapely.get_num_coordinates(simplified), shapely.get_num_coordinates(geoms))

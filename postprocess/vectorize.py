"""Polygons from a labelled mask, block by block.

Each block is polygonized on its own with :func:`rasterio.features.shapes`
(4-connectivity, the connectivity used for labelling objects, see
:mod:`postprocess.labels`) in *pixel coordinates* of the whole raster
(x = column, y = row). Those coordinates are small integers, so the pieces of
one object cut by block edges share their edges exactly and
:func:`shapely.union_all` joins them into one polygon without slivers. Only
then are geometries moved to the grid's CRS with its affine transform.

A 4-connected set of pixel squares has a connected interior, so every object
becomes one :class:`shapely.Polygon` (with holes). Geometries are made valid
when needed, cleared of the collinear vertices left by block seams and
normalized, so the output does not depend on the block layout.
"""

from __future__ import annotations

import itertools
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np
import shapely
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning
from rasterio.features import shapes

from pipeline.core.grid import Grid
from postprocess.labels import BlockLayout

if TYPE_CHECKING:
    import geopandas as gpd

log = logging.getLogger(__name__)


def block_pieces(labels: np.ndarray, origin: tuple[int, int]) -> tuple[np.ndarray, list[shapely.Polygon]]:
    """Polygons of every label in one block, in pixel coordinates of the whole raster.

    Returns the label of each piece and the pieces. ``labels`` must fit int32
    (0 = background).
    """
    lab = np.ascontiguousarray(labels, dtype=np.int32)
    transform = Affine.translation(origin[1], origin[0])
    ids: list[int] = []
    rings: list[Any] = []  # every ring of every piece, shell first
    ring_sizes: list[int] = []
    ring_piece: list[int] = []
    with warnings.catch_warnings():
        # the block at the raster origin has an identity transform
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        for geojson, value in shapes(lab, mask=lab > 0, connectivity=4, transform=transform):
            piece = len(ids)
            ids.append(int(value))
            for ring in geojson["coordinates"]:
                rings.append(ring)
                ring_sizes.append(len(ring))
                ring_piece.append(piece)
    if not ids:
        return np.empty(0, np.int64), []
    # one vectorized construction instead of a shapely object per ring (a block may hold many pieces)
    coords = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(rings)), np.float64,
                         count=2 * sum(ring_sizes)).reshape(-1, 2)
    linear = shapely.linearrings(coords, indices=np.repeat(np.arange(len(rings)), ring_sizes))
    polygons = shapely.polygons(linear, indices=np.asarray(ring_piece))
    return np.asarray(ids, dtype=np.int64), list(polygons)


def _polygonal(geom: shapely.Geometry) -> shapely.Geometry:
    """Polygonal part of a geometry, as a Polygon when it is a single one."""
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        return geom
    parts = [g for g in shapely.get_parts(geom) if g.geom_type in ("Polygon", "MultiPolygon")]
    merged = shapely.union_all(parts) if parts else shapely.Polygon()
    return merged


def _cores() -> int:
    """Threads for geometry work in the main process: its cores, at most 8."""
    return min(8, os.cpu_count() or 1)


#: Below this many geometries the vectorized calls run in the calling thread.
PARALLEL_MIN = 4096


def map_threads(fn: Callable[[np.ndarray], np.ndarray], geoms: np.ndarray,
                threads: int | None = None) -> np.ndarray:
    """``fn`` (an element-wise shapely function) over ``geoms`` in chunks on several threads.

    Shapely's vectorized functions release the GIL, so a large array (the
    polygons of a big event) is processed on every core of the main process
    while the Dask workers wait for the next pass. Results are the same as
    ``fn(geoms)``, element for element.
    """
    n = threads or _cores()
    if n < 2 or geoms.size < PARALLEL_MIN:
        return fn(geoms)
    chunks = np.array_split(geoms, n * 4)
    with ThreadPoolExecutor(n, thread_name_prefix="geometry") as pool:
        return np.concatenate(list(pool.map(fn, chunks)))


def _simplify(tolerance: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda geoms: shapely.simplify(geoms, tolerance, preserve_topology=True)


def clean_geometries(geoms: np.ndarray, collinear_free: bool = False) -> np.ndarray:
    """Valid, polygonal, collinear-free, normalized geometries (vectorized).

    ``collinear_free``: no geometry holds collinear vertices (pieces as :func:`block_pieces` made
    them, GDAL's polygonizer putting vertices at corners only, and unions already cleaned of their
    seams), so only repaired ones go through the pass that drops them.
    """
    if geoms.size == 0:
        return geoms
    bad = ~map_threads(shapely.is_valid, geoms)
    if bad.any():
        log.debug("repairing %d invalid polygons", int(bad.sum()))
        geoms = geoms.copy()
        geoms[bad] = [_polygonal(g) for g in shapely.make_valid(geoms[bad])]
    # tolerance 0 drops only exactly collinear vertices (block seams)
    if not collinear_free:
        geoms = map_threads(_simplify(0.0), geoms)
    elif bad.any():
        geoms[bad] = map_threads(_simplify(0.0), geoms[bad])
    return map_threads(shapely.normalize, geoms)


def merge_pieces(
    pieces: Mapping[int, Sequence[shapely.Geometry]],
    transform: Affine,
    *,
    simplify_px: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One geometry per label: union of its pieces, cleaned, moved to map coordinates.

    ``pieces`` are in pixel coordinates; ``simplify_px`` is a
    topology-preserving simplification tolerance in pixels (0 = none).
    Returns (sorted labels, geometries in the CRS of ``transform``).
    """
    keys = np.asarray(sorted(pieces), dtype=np.int64)
    out = np.empty(keys.size, dtype=object)
    joined: list[int] = []
    for k, key in enumerate(keys):
        parts = pieces[int(key)]
        if len(parts) == 1:
            out[k] = parts[0]
        else:
            joined.append(k)
    if joined:
        # objects across blocks: their unions on all cores (GEOS releases the GIL), largest first
        joined.sort(key=lambda k: -int(shapely.get_num_coordinates(pieces[int(keys[k])]).sum()))
        n = min(_cores(), len(joined))
        # each union without the collinear vertices its seams leave, in the same thread
        seamless = _simplify(0.0)
        with ThreadPoolExecutor(n, thread_name_prefix="union") as pool:
            unions = pool.map(lambda k: seamless(shapely.union_all(list(pieces[int(keys[k])]))), joined)
            for k, geom in zip(joined, unions, strict=True):
                out[k] = geom
    # no geometry holds collinear vertices now: the pieces never had any
    out = clean_geometries(out, collinear_free=True)
    if simplify_px > 0 and out.size:
        out = map_threads(_simplify(simplify_px), out)
        out = clean_geometries(out)
    if out.size:
        exact = maps_exactly(out, transform)
        out = to_map(out, transform)
        if not exact:
            bad = ~map_threads(shapely.is_valid, out)
            if bad.any():  # rounding after the affine transform, very rare
                out[bad] = [_polygonal(g) for g in shapely.make_valid(out[bad])]
        out = shapely.orient_polygons(out, exterior_cw=False)
    return keys, out


def maps_exactly(geoms: np.ndarray, transform: Affine) -> bool:
    """Whether :func:`to_map` moves every vertex of ``geoms`` without rounding.

    True for integer vertices (pixel corners, as the pieces and their unions
    have) under a north-up transform whose scale and origin are integers (a
    10 m UTM grid): every product and sum is then an integer below 2**53, so
    the image is an exact scaling and translation and keeps validity, so the
    second validity pass over every polygon after the transform is skipped.
    """
    a, b, c, d, e, f = tuple(transform)[:6]
    if b != 0 or d != 0 or not all(float(v).is_integer() for v in (a, c, e, f)):
        return False
    xy = shapely.get_coordinates(geoms)
    if xy.size == 0:
        return True
    if not np.array_equal(xy, np.round(xy)):
        return False
    reach = np.abs(xy).max(axis=0)
    return bool(reach[0] * abs(a) + abs(c) < 2**53 and reach[1] * abs(e) + abs(f) < 2**53)


def to_map(geoms: np.ndarray, transform: Affine) -> np.ndarray:
    """Apply a north-up affine transform to pixel-coordinate geometries."""
    a, b, c, d, e, f = tuple(transform)[:6]
    matrix = np.array([[a, d], [b, e]])
    offset = np.array([c, f])
    return shapely.transform(geoms, lambda xy: xy @ matrix + offset)


def vectorize_labels(
    labels: Any,
    grid: Grid,
    *,
    simplify_m: float = 0.0,
) -> gpd.GeoDataFrame:
    """Polygons of a (global) label raster, one per label, computed per block.

    ``labels`` is a 2-D int array (dask, xarray or numpy; 0 = background) on
    ``grid``. Returns a GeoDataFrame with columns ``label`` and ``geometry``
    in the grid's CRS, sorted by label.
    """
    data = getattr(labels, "data", labels)
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=-1)
    layout = BlockLayout.of(data)
    blocks = data.to_delayed()
    tasks = [dask.delayed(block_pieces, pure=True)(blocks[ix], layout.origin(ix)) for ix in layout.indices()]
    grouped = group_pieces(dask.compute(*tasks))
    keys, geoms = merge_pieces(grouped, grid.transform, simplify_px=simplify_m / grid.res[0])
    import geopandas as gpd

    return gpd.GeoDataFrame({"label": keys.astype(np.int32)}, geometry=list(geoms), crs=grid.crs)


def group_pieces(results: Iterable[tuple[np.ndarray, Sequence[Any]]]) -> dict[int, list[Any]]:
    """Collect block pieces by label."""
    grouped: dict[int, list[Any]] = {}
    for ids, geoms in results:
        for key, geom in zip(ids, geoms, strict=True):
            grouped.setdefault(int(key), []).append(geom)
    return grouped

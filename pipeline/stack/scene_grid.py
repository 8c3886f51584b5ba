"""The output grid of a scene: its CRS, its extent (band footprint, area of interest), its smallest size.

The target CRS (default: the UTM zone of the scene centre) at the target
resolution, with pixel edges on multiples of the resolution (the Sentinel-2
pixel grid). Extent: the footprint the requested bands share, cut to the area
of interest when one is given.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.warp import transform_bounds

from pipeline.core.config import AoiSection, SceneConfig
from pipeline.core.errors import ConfigError, GridError, InputError
from pipeline.core.grid import Bounds, Grid, intersect_bounds, utm_crs_for
from pipeline.io.gdal import error_detail as _detail
from pipeline.io.raster_source import RasterSource
from postprocess.morphology import disk

log = logging.getLogger(__name__)

#: The smallest grid edge in pixels whatever the configuration (see :func:`minimum_grid_size`).
MIN_GRID_PX = 4


def _fmt_bounds(b: Bounds, digits: int = 4) -> str:
    return "[" + ", ".join(f"{v:.{digits}f}" for v in b) + "]"


def _lonlat_bounds(bounds: Bounds, crs: CRS) -> Bounds:
    return transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=21)


def target_crs(setting: str, sources: Sequence[RasterSource]) -> CRS:
    """The CRS asked for, or for ``'auto'`` the UTM zone of the centre of the sources' common footprint."""
    if setting.strip().lower() != "auto":
        try:
            return CRS.from_user_input(setting)
        except CRSError as exc:
            raise ConfigError(f"grid.crs: not a valid CRS: {setting!r} ({_detail(exc)})") from None
    boxes = [_lonlat_bounds(s.bounds, s.crs) for s in sources]
    if any(b[2] < b[0] for b in boxes):  # a footprint across the antimeridian (left > right): 0..360
        boxes = [(b[0] % 360.0, b[1], b[2] % 360.0 + (360.0 if b[2] % 360.0 < b[0] % 360.0 else 0.0), b[3])
                 for b in boxes]
    common = boxes[0]
    for box in boxes[1:]:
        common = intersect_bounds(common, box) or common
    lon = ((common[0] + common[2]) / 2 + 180.0) % 360.0 - 180.0
    return utm_crs_for(lon, (common[1] + common[3]) / 2)


def scene_footprint(sources: Sequence[RasterSource], crs: CRS) -> Bounds:
    """Bounds in ``crs`` covered by every source."""
    footprint: Bounds | None = None
    for src in sources:
        b = src.bounds_in(crs)
        footprint = b if footprint is None else intersect_bounds(footprint, b)
        if footprint is None:
            names = ", ".join(f"{s.path.name} {_fmt_bounds(_lonlat_bounds(s.bounds, s.crs))}" for s in sources)
            raise GridError(f"the scene's band files do not overlap each other (lon/lat bounds: {names})")
    assert footprint is not None
    return footprint


def aoi_bounds(aoi: AoiSection, crs: CRS) -> tuple[Bounds, list[Any] | None, str]:
    """AOI bounds in ``crs``, its geometries (vector AOIs) and a description for messages."""
    if aoi.bbox is not None:
        try:
            bounds = transform_bounds(aoi.crs, crs, *aoi.bbox, densify_pts=21)
        except (CRSError, ValueError) as exc:
            raise ConfigError(f"aoi.crs: cannot use {aoi.crs!r} ({_detail(exc)})") from None
        return bounds, None, f"aoi.bbox {list(aoi.bbox)} ({aoi.crs})"
    assert aoi.path is not None
    path = Path(aoi.path)
    if not path.exists():
        raise InputError(f"{path}: aoi.path: file not found")
    import geopandas as gpd

    try:
        gdf = gpd.read_file(path)
    except Exception as exc:  # pyogrio raises several unrelated types
        raise InputError(f"{path}: aoi.path cannot be read as a vector file ({_detail(exc)})") from None
    if gdf.empty:
        raise InputError(f"{path}: aoi.path holds no features")
    if gdf.crs is None:
        raise InputError(f"{path}: aoi.path has no CRS; save it with one (EPSG:4326 for lon/lat)")
    gdf = gdf.to_crs(crs)
    geoms = [g for g in gdf.geometry if g is not None and not g.is_empty]
    if not geoms:
        raise InputError(f"{path}: aoi.path holds only empty geometries")
    return tuple(gdf.total_bounds), geoms, f"aoi.path {path}"


def check_overlap(source: RasterSource, grid: Grid, what: str) -> float:
    """Fraction of ``grid`` covered by ``source``; :class:`GridError` when they do not overlap."""
    scene = grid.bounds_in(source.crs)
    common = intersect_bounds(scene, source.bounds)
    if common is None:
        raise GridError(
            f"{source.path}: {what} does not overlap the scene: it covers lon/lat "
            f"{_fmt_bounds(_lonlat_bounds(source.bounds, source.crs))}, the scene covers "
            f"{_fmt_bounds(grid.bounds_in('EPSG:4326'))}; give a {what} that covers the scene"
        )
    area = (scene[2] - scene[0]) * (scene[3] - scene[1])
    frac = (common[2] - common[0]) * (common[3] - common[1]) / area if area > 0 else 1.0
    if frac < 0.999:
        log.warning("%s covers only %.0f %% of the scene; uncovered pixels are invalid", source.path, 100 * frac)
    return frac


def build_grid(cfg: SceneConfig, sources: Sequence[RasterSource]) -> tuple[Grid, list[Any] | None]:
    """The output grid for ``cfg`` given the band sources that define the footprint."""
    crs = target_crs(cfg.grid.crs, sources)
    extent = scene_footprint(sources, crs)
    geoms = None
    if cfg.aoi is not None:
        aoi, geoms, desc = aoi_bounds(cfg.aoi, crs)
        inside = intersect_bounds(extent, aoi)
        if inside is None:
            raise GridError(
                f"{desc} lies outside the scene: the scene covers lon/lat "
                f"{_fmt_bounds(_lonlat_bounds(extent, crs))}; give an AOI inside the scene"
            )
        if inside != tuple(aoi):
            log.warning("%s extends beyond the scene; cut to the scene footprint", desc)
        extent = inside
    grid = Grid.from_bounds(extent, crs, cfg.grid.resolution)
    smallest, why = minimum_grid_size(cfg)
    if min(grid.width, grid.height) < smallest:
        what = desc if cfg.aoi is not None else "the scene's band files"
        raise GridError(
            f"{what} gives a grid of {grid.width} x {grid.height} px at {cfg.grid.resolution:g} "
            f"({grid.width * grid.res[0]:g} x {grid.height * grid.res[1]:g} in {crs.to_string()} units), smaller "
            f"than the minimum of {smallest} x {smallest} px that {why} needs; "
            + ("give a larger area of interest" if cfg.aoi is not None else "give a larger scene")
        )
    log.info("grid: %s, %d x %d px at %g", crs.to_string(), grid.width, grid.height, cfg.grid.resolution)
    return grid, geoms


def minimum_grid_size(cfg: SceneConfig) -> tuple[int, str]:
    """The smallest grid edge (pixels) a run of ``cfg`` can process, and what sets it.

    The opening and closing of the postprocessing run block by block with a halo of all four
    erosion and dilation radii (:func:`postprocess.morphology.open_close`), and Dask cannot give
    a halo wider than the array.
    """
    res = cfg.grid.resolution
    pp = cfg.postprocess
    halo = sum(2 * (fp.shape[0] // 2) for fp in (disk(pp.opening_radius_m / res), disk(pp.closing_radius_m / res))
               if fp is not None)
    if halo < MIN_GRID_PX:
        return MIN_GRID_PX, "the pipeline"
    return halo, (f"the postprocessing (opening and closing of postprocess.opening_radius_m "
                  f"{pp.opening_radius_m:g} and closing_radius_m {pp.closing_radius_m:g} at {res:g} per pixel)")

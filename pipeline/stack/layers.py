"""The stacking stage: every input layer on one lazy 10 m grid.

:func:`stack_scene` turns a scene configuration into a :class:`Stack`: a
dask-backed ``(band, y, x)`` float32 DataArray with the channels in the order
asked for (Landslide4Sense order by default), plus a valid-data mask.

Grid
    :mod:`pipeline.stack.scene_grid`: the target CRS and resolution, the
    footprint the requested bands share, cut to the area of interest.

Laziness
    The stack is a :func:`dask.array.from_array` over an array-like
    (:class:`pipeline.stack.lazy_arrays.StackLayer`) whose ``__getitem__``
    fills one block, reading only the source windows the block needs.
    Slope is Horn's method on the reprojected DEM, block by block with a
    one-pixel halo; blocks are independent tasks.

Mask
    :mod:`pipeline.stack.masks`: the DEM footprint, the SCL classes, the
    clouds s2cloudless finds in L1C scenes (:mod:`pipeline.stack.clouds`,
    ``mask.cloud_detector``) and the area of interest, combined with the
    channels' own no-data into ``valid``.

Compute ``data`` and ``valid`` in the same dask graph (``dask.compute(data,
valid)`` or one ``map_blocks`` over both): ``valid`` is derived from the same
blocks, so computing them separately reads the inputs twice. The same holds
for ``to_delayed()``, which optimises each array on its own; use
``to_delayed(optimize_graph=False)`` on both.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from pipeline.core.channels import DEM, L4S_CHANNELS, S2_BANDS, SLOPE, canonical
from pipeline.core.config import SceneConfig
from pipeline.core.errors import ChannelError
from pipeline.core.georeference import georeference, grid_coords
from pipeline.core.grid import Grid
from pipeline.io.dem import open_dem, open_slope
from pipeline.io.raster_source import RasterSource
from pipeline.io.safe_checksums import ChecksumCheck
from pipeline.io.sentinel2 import SceneInputs, read_scene, verify_scene_files
from pipeline.stack.clouds import CLOUD_BANDS, cloud_layer, scene_level, use_detector
from pipeline.stack.lazy_arrays import StackLayer
from pipeline.stack.masks import scene_mask
from pipeline.stack.scene_grid import build_grid, check_overlap

log = logging.getLogger(__name__)

UNITS = {SLOPE: "degree", DEM: "metre"}


@dataclass(frozen=True)
class Stack:
    """All channels of one scene on one grid, lazily."""

    data: xr.DataArray      # dims ("band","y","x"), float32, dask-backed
    valid: xr.DataArray     # dims ("y","x"), bool, dask-backed, same y/x chunks
    grid: Grid
    scene_id: str
    acquisition_date: dt.date | None
    product: str            # "S2_L2A", "S2_L1C" or "bands"
    #: ``valid`` without the channels' own no-data (SCL classes, AOI, DEM footprint), or
    #: None when nothing else masks the scene: ``valid == mask & all channels finite``.
    #: A consumer that reads ``data`` anyway combines the two itself and saves a second
    #: read of every band just for the mask.
    mask: xr.DataArray | None = None
    #: Reads any window of ``data`` in one call (``reader.read(bands, window)``): for a consumer
    #: whose blocks overlap (:func:`pipeline.inference.tiled.predict`), one read per block instead of
    #: a chunk plus strips of its neighbours.
    reader: StackLayer | None = None
    #: SAFE products: the band files, SCL and metadata this stack reads, checked against the
    #: product's ``manifest.safe`` (``scene.verify_checksums``): whether they were verified, how
    #: many files, bytes and seconds (:meth:`pipeline.io.safe_checksums.ChecksumCheck.as_dict` for a report)
    checksums: ChecksumCheck | None = None


# ---------------------------------------------------------------------------
# channels
# ---------------------------------------------------------------------------
def resolve_channels(channels: Sequence[str]) -> tuple[str, ...]:
    """Canonical channel names in the given order; unknown or repeated names are errors."""
    out: list[str] = []
    for name in channels:
        try:
            key = canonical(name)
        except ValueError as exc:
            raise ChannelError(str(exc)) from None
        if key in out:
            raise ChannelError(f"channel {key} asked for twice in {list(channels)}")
        out.append(key)
    if not out:
        raise ChannelError("no channels asked for; give at least one channel")
    return tuple(out)


def available_channels(scene: SceneInputs) -> tuple[str, ...]:
    """Channels the scene's inputs can supply (bands present, plus SLOPE and DEM from the DEM)."""
    return (*[b for b in S2_BANDS if b in scene.bands], SLOPE, DEM)


def check_channels(channels: Sequence[str], scene: SceneInputs) -> None:
    """Raise :class:`ChannelError` naming every channel the scene cannot supply."""
    have = available_channels(scene)
    missing = [c for c in channels if c not in have]
    if not missing:
        return
    note = " (L2A products have no B10)" if "B10" in missing and scene.product == "S2_L2A" else ""
    raise ChannelError(
        f"{scene.describe()} cannot supply channel(s) {', '.join(missing)}{note}; "
        f"it has {', '.join(have)}. Ask for a subset of these channels (channels: in the scene "
        "config) or use a model trained on them."
    )


# ---------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Sources:
    """The opened inputs of one stack: band sources by channel, the DEM, the slope layer when
    one is given and asked for, the scene classification layer when the product has one, and the
    bands of the cloud detector when it runs (``mask.cloud_detector``)."""

    scene: SceneInputs
    bands: dict[str, RasterSource]
    dem: RasterSource
    slope: RasterSource | None
    scl: RasterSource | None
    cloud_bands: dict[str, RasterSource] | None = None


def stack_scene(cfg: SceneConfig, channels: Sequence[str] | None = None) -> Stack:
    """Stack the scene of ``cfg`` onto one grid, lazily.

    ``channels`` defaults to ``cfg.channels``, then to the Landslide4Sense
    order. Raises :class:`ChannelError` when the inputs cannot supply a
    channel, :class:`InputError` for missing or unusable files,
    :class:`GridError` when layers or the AOI do not overlap the scene and
    :class:`ConfigError` when ``mask.cloud_detector`` asks for s2cloudless on a
    scene that cannot have it. No pixel is read here.
    """
    names = resolve_channels(channels if channels is not None else (cfg.channels or L4S_CHANNELS))
    src = _open_sources(cfg, names)
    grid, aoi_geoms = _checked_grid(cfg, src)
    sources = dict(src.bands)  # DEM comes from StackLayer.dem
    if src.slope is not None:
        sources[SLOPE] = src.slope
    layer = StackLayer(names, sources, src.dem, grid)
    data = layer.to_dask(cfg.grid.block_size)
    # a channel from the DEM carries the DEM's footprint in its own no-data
    terrain_from_dem = DEM in names or (SLOPE in names and src.slope is None)
    clouds = None
    if src.cloud_bands is not None:
        clouds = cloud_layer(cfg.mask, grid, src.cloud_bands, src.dem, cfg.grid.block_size)
    mask = scene_mask(cfg, grid, None if terrain_from_dem else src.dem, src.scl, aoi_geoms, clouds)
    valid = ~da.isnan(data).any(axis=0)
    if mask is not None:
        valid = valid & mask
    data_xr, valid_xr, mask_xr = _dataarrays(names, grid, data, valid, mask)
    log.info("stack %s: %s, %d channels (%s), blocks of %d px", src.scene.scene_id, src.scene.product,
             len(names), ", ".join(names), cfg.grid.block_size)
    return Stack(data=data_xr, valid=valid_xr, grid=grid, scene_id=src.scene.scene_id,
                 acquisition_date=src.scene.acquisition_date, product=src.scene.product, mask=mask_xr,
                 reader=layer, checksums=src.scene.checksums)


def _open_sources(cfg: SceneConfig, names: Sequence[str]) -> _Sources:
    """The inputs of channels ``names``, opened (metadata only) and checked against the product."""
    scene = read_scene(cfg.scene)
    check_channels(names, scene)
    detect = use_detector(cfg.mask, scene, scene_level(scene, cfg.scene.level), str(cfg.source or ""))
    read = [n for n in names if n in S2_BANDS]
    if detect:
        read += [b for b in CLOUD_BANDS if b not in read]
    # the files whose pixels are read, against the product's manifest.safe (a bit flip inside a JPEG
    # 2000 codestream decodes to wrong pixels without an error)
    scene = verify_scene_files(scene, cfg.scene, read)
    opened = {n: scene.open_band(n) for n in read}
    bands = {n: opened[n] for n in names if n in S2_BANDS}
    dem = open_dem(cfg.dem)
    slope = open_slope(cfg.dem) if SLOPE in names else None
    clouds = {b: opened[b] for b in CLOUD_BANDS} if detect else None
    return _Sources(scene, bands, dem, slope, scene.open_scl(), clouds)


def _checked_grid(cfg: SceneConfig, src: _Sources) -> tuple[Grid, list[Any] | None]:
    """The output grid and the AOI's geometries; every other layer must overlap the grid."""
    footprint_sources = list(src.bands.values())
    if not footprint_sources:  # only terrain asked for: the finest band defines the footprint
        finest = min(src.scene.bands, key=lambda b: (S2_BANDS[b], b))
        footprint_sources = [src.scene.open_band(finest)]
    grid, aoi_geoms = build_grid(cfg, footprint_sources)
    check_overlap(src.dem, grid, "DEM")
    if src.slope is not None:
        check_overlap(src.slope, grid, "slope layer")
    if src.scl is not None:
        check_overlap(src.scl, grid, "scene classification layer")
    return grid, aoi_geoms


def _dataarrays(names: Sequence[str], grid: Grid, data: da.Array, valid: da.Array,
                mask: da.Array | None) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray | None]:
    """``data``, ``valid`` and ``mask`` as georeferenced DataArrays with the grid's coordinates."""
    coords = grid_coords(grid)
    data_xr = xr.DataArray(
        data,
        dims=("band", "y", "x"),
        coords={"band": list(names), **coords},
        name="stack",
        attrs={"units": [UNITS.get(n, "reflectance") for n in names], "long_name": list(names)},
    )
    data_xr = georeference(data_xr, grid).rio.write_nodata(np.nan, encoded=False)
    valid_xr = georeference(xr.DataArray(valid, dims=("y", "x"), coords=coords, name="valid"), grid)
    mask_xr = None
    if mask is not None:
        mask_xr = georeference(xr.DataArray(mask, dims=("y", "x"), coords=coords, name="mask"), grid)
    return data_xr, valid_xr, mask_xr


def save_stack(stack: Stack, path: Path, *, overview: bool = True) -> Path:
    """Write the stack as a float32 COG (NaN where invalid), block by block and atomically."""
    from pipeline.io.cog import write_cog

    masked = stack.data.where(stack.valid)
    return write_cog(masked, stack.grid, path, dtype="float32", nodata=math.nan,
                     band_names=[str(b) for b in stack.data["band"].values], overview=overview)


def aux_layers(cfg: SceneConfig, stack: Any, wanted: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """(y, x) layers for attributes and rules that the model stack does not carry, as far as the
    inputs have them (channels the model reads travel with the probability instead).

    They come from their own small stack (only these channels), so reading one
    does not warp all model channels again; the model stack is used only if the
    grids would differ.
    """
    have = set(available_channels(read_scene(cfg.scene)))
    names = [c for c in wanted if c in have]
    if not names:
        return {}
    aux = stack_scene(cfg, names)
    if aux.grid != stack.grid:
        log.debug("auxiliary layers on a different footprint; selecting them from the model stack")
        aux = stack_scene(cfg, list(dict.fromkeys([*map(str, stack.data.band.values), *names])))
    return {n: aux.data.sel(band=n) for n in names}

"""Check a scene's inputs without processing pixels.

:func:`validate_scene` opens every input the configuration names (metadata
only), checks the channels, builds the output grid and checks that the DEM,
slope, SCL and AOI overlap the scene. It returns every problem it finds
rather than stopping at the first, so one run tells the user all that is
wrong.

"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pipeline.core.channels import L4S_CHANNELS, S2_BANDS, SLOPE
from pipeline.core.config import SceneConfig
from pipeline.core.errors import PipelineError
from pipeline.io.dem import open_dem, open_slope
from pipeline.io.raster_source import RasterSource
from pipeline.io.sentinel2 import read_scene, verify_scene_files
from pipeline.stack.clouds import scene_level, use_detector
from pipeline.stack.layers import check_channels, resolve_channels
from pipeline.stack.scene_grid import build_grid, check_overlap

log = logging.getLogger(__name__)


def validate_scene(cfg: SceneConfig, channels: Sequence[str] | None = None, *,
                   check_supply: bool = True) -> list[str]:
    """Problems with the inputs of ``cfg`` (empty list: all good). Reads no pixels.

    Checks that every file exists, opens with GDAL, has a CRS and is not
    visibly truncated; that the inputs supply the requested channels
    (``channels``, else ``cfg.channels``, else the Landslide4Sense order);
    that the bands share a footprint; that the AOI lies inside the scene; and
    that the DEM (and slope / SCL layers) overlap it; and, for SAFE products with
    ``scene.verify_checksums``, that the files a run reads match the checksums of
    the product's ``manifest.safe``. With ``check_supply`` False (the channels
    are unknown: the model could not be read) the channels are not checked and
    the inputs are checked on the finest band.
    """
    problems: list[str] = []

    def attempt(fn, *args):  # type: ignore[no-untyped-def]
        try:
            return fn(*args)
        except PipelineError as exc:
            problems.append(str(exc))
            return None

    names = (attempt(resolve_channels, channels if channels is not None else (cfg.channels or L4S_CHANNELS))
             if check_supply else None)
    scene = attempt(read_scene, cfg.scene)
    dem = attempt(open_dem, cfg.dem)
    slope = attempt(open_slope, cfg.dem) if cfg.dem.slope is not None else None
    if scene is None:
        return problems
    if names is not None:
        attempt(check_channels, names, scene)
    # the cloud detector's bands and level, as the stack checks them (mask.cloud_detector)
    attempt(use_detector, cfg.mask, scene, scene_level(scene, cfg.scene.level), str(cfg.source or ""))
    wanted = [n for n in (names or ()) if n in scene.bands and n in S2_BANDS]
    # the files a run reads, against the product's manifest.safe, as the run checks them (reads their
    # bytes, decodes no pixels)
    attempt(verify_scene_files, scene, cfg.scene, wanted)
    bands: list[RasterSource] = []
    for name in wanted:
        src = attempt(scene.open_band, name)
        if src is not None:
            bands.append(src)
    scl = attempt(scene.open_scl)
    if not wanted and scene.bands:
        finest = min(scene.bands, key=lambda b: (S2_BANDS[b], b))
        src = attempt(scene.open_band, finest)
        if src is not None:
            bands.append(src)
    if not bands or len(bands) < len(wanted):
        return problems
    built = attempt(build_grid, cfg, bands)
    if built is None:
        return problems
    grid, _ = built
    if dem is not None:
        attempt(check_overlap, dem, grid, "DEM")
    if slope is not None and (names is None or SLOPE in names):
        attempt(check_overlap, slope, grid, "slope layer")
    if scl is not None:
        attempt(check_overlap, scl, grid, "scene classification layer")
    return problems


def skipped_rules(cfg: SceneConfig) -> list[str]:
    """The configured postprocessing rules that the scene's bands cannot feed (a run skips them
    with a warning): one sentence each, naming the rule and the missing bands."""
    from pipeline.io.sentinel2 import read_scene
    from pipeline.stack.layers import available_channels

    wanted = cfg.postprocess.rule_bands()
    if not wanted:
        return []
    have = set(available_channels(read_scene(cfg.scene)))
    notes = []
    for rule, bands in wanted.items():
        missing = [b for b in bands if b not in have]
        if missing:
            notes.append(f"{cfg.source}: postprocess.{rule} is set but the scene has no {', '.join(missing)}: "
                         "runs skip this rule")
    return notes

"""Check a scene's inputs without processing pixels, and the ``stack`` command.

:func:`validate_scene` opens every input the configuration names (metadata
only), checks the channels, builds the output grid and checks that the DEM,
slope, SCL and AOI overlap the scene. It returns every problem it finds
rather than stopping at the first, so one run tells the user all that is
wrong.

:func:`cli_stack` stacks a scene and writes the stack as a COG.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.core.channels import L4S_CHANNELS, S2_BANDS, SLOPE
from pipeline.core.config import SceneConfig, load_scene_config
from pipeline.core.errors import PipelineError
from pipeline.io.readers import RasterSource, open_dem, open_slope, read_scene, verify_scene_files
from pipeline.stack.layers import build_grid, check_channels, check_overlap, resolve_channels, save_stack, stack_scene

log = logging.getLogger(__name__)

#: Exit status for bad input (config, files, models): the same as ``run`` (``python -m pipeline``
#: exits 2 on a :class:`~pipeline.core.errors.PipelineError`).
BAD_INPUT = 2


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


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------
def _channel_list(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``validate``: the scene config and an optional channel list."""
    parser.add_argument("config", type=Path, help="scene YAML file")
    parser.add_argument("--channels", type=_channel_list, default=None,
                        help="comma-separated channels to check (default: channels: in the config, "
                             "else the Landslide4Sense 14 channels)")


def skipped_rules(cfg: SceneConfig) -> list[str]:
    """The configured postprocessing rules that the scene's bands cannot feed (a run skips them
    with a warning): one sentence each, naming the rule and the missing bands."""
    from pipeline.io.readers import read_scene
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


def cli_validate(args: argparse.Namespace) -> int:
    """Check a scene config, its model(s) and its inputs; print the problems. Exit code 0 when all is well,
    :data:`BAD_INPUT` (2, as ``run``) for a bad config, model or input.

    Without ``--channels`` (and without ``channels:`` in the config) the
    channels checked are those the configured model(s) need.
    """
    from pipeline.run.scene import load_models, model_channels

    try:
        cfg = load_scene_config(args.config)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT
    problems: list[str] = []
    channels = args.channels or cfg.channels
    model_note = ""
    models_ok = True
    if channels is None:
        try:
            models = load_models(cfg)  # the weights checked too, before a run
            channels = model_channels(models)
            model_note = " for model " + " + ".join(f"{m.name} ({len(m.channels)} channels)" for m in models)
        except PipelineError as exc:
            problems.append(str(exc))
            models_ok = False
    # without the model its channels are unknown: checking the 14 Landslide4Sense channels instead
    # would add a misleading "cannot supply B10" to the model's own error
    problems += validate_scene(cfg, channels, check_supply=models_ok)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        return BAD_INPUT
    for note in skipped_rules(cfg):
        print(f"warning: {note}", file=sys.stderr)
    print(f"{args.config}: OK - inputs readable, georeferenced and overlapping; channels available{model_note}")
    return 0


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``stack``: the scene config, the output COG and the channels."""
    parser.add_argument("config", type=Path, help="scene YAML file")
    parser.add_argument("--out", "-o", type=Path, default=None,
                        help="output COG (default: <output.dir>/<scene id>_stack.tif)")
    parser.add_argument("--channels", type=_channel_list, default=None,
                        help="comma-separated channels in output order (default: channels: in the "
                             "config, else the Landslide4Sense 14 channels)")


def cli_stack(args: argparse.Namespace) -> int:
    """Stack a scene onto its 10 m grid and write it as a float32 COG (NaN = invalid)."""
    try:
        cfg = load_scene_config(args.config)
        stack = stack_scene(cfg, args.channels)
        out = args.out or cfg.output.dir / f"{stack.scene_id}_stack.tif"
        save_stack(stack, out)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT
    print(out)
    return 0

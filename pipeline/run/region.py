"""The nightly regional job: many scenes, one Dask cluster, resumable.

``python -m pipeline region region.yaml`` runs every scene of the region with
the same cluster (a local one by default, ``dask.scheduler`` to use an existing
scheduler). Each scene is a normal scene run: it is skipped when its outputs
for the same inputs, models and config already exist, so an interrupted night
resumes where it stopped. A scene that fails (bad input, a crash) is recorded
(``<name>.region_state.json``) and the job goes on with the next; transient failures are
retried. One job per region and output folder runs at a time.

At the end the polygons of all completed scenes are merged into one regional
GeoPackage in EPSG:4326. Neighbouring Sentinel-2 tiles overlap (and may sit in
different UTM zones), so a landslide in an overlap is seen twice: polygons of
different scenes that intersect are merged into one feature. The regional
layer is rebuilt from the scene outputs on every run, so reruns never
duplicate features.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import RegionConfig, SceneConfig, load_scene_config
from pipeline.core.errors import OutputError, PipelineError

log = logging.getLogger(__name__)

#: The job's state beside the regional layer, one per region: ``<name>.region_state.json``.
STATE_SUFFIX = ".region_state.json"


def state_path(cfg: RegionConfig) -> Path:
    """Where the region's state is kept: one file per region, so regions can share a folder."""
    from pipeline.run.folder import safe_name

    return cfg.output.dir / f"{safe_name(cfg.name)}{STATE_SUFFIX}"


class RegionBusy(OutputError):
    """Another job of the same region is running in the same output folder."""


@contextmanager
def region_lock(cfg: RegionConfig) -> Iterator[None]:
    """Hold the region's lock for the job; a second job of the same region refuses clearly."""
    from pipeline.core import fsutil
    from pipeline.run.folder import safe_name

    path = cfg.output.dir / f".{safe_name(cfg.name)}.region.lock"
    try:
        fd = fsutil.acquire_lock(path)
    except fsutil.LockHeld:
        raise RegionBusy(f"{path.parent}: another job of region {cfg.name!r} is running in this folder; "
                         "wait for it to finish, or stop it, then run again") from None
    except (ImportError, OSError) as exc:
        log.warning("cannot lock %s (%s): a second job of this region would not be detected", path,
                    getattr(exc, "strerror", None) or exc)
        yield
        return
    try:
        yield
    finally:
        fsutil.release_lock(fd, path)


@dataclass
class SceneOutcome:
    config: str
    status: str  # completed | skipped | failed
    scene_id: str | None = None
    geopackage: str | None = None
    n_polygons: int | None = None
    seconds: float | None = None
    error: str | None = None
    attempts: int = 0


@dataclass
class RegionResult:
    outcomes: list[SceneOutcome] = field(default_factory=list)
    merged: Path | None = None
    n_merged: int = 0
    page: Path | None = None  # the region's HTML report

    @property
    def failed(self) -> list[SceneOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def _scene_config_for_region(path: Path, region: RegionConfig) -> SceneConfig:
    """A scene config with the region's output and cluster settings."""
    cfg = load_scene_config(path)
    return cfg.model_copy(update={"output": region.output, "dask": region.dask})


def run_region(cfg: RegionConfig, *, force: bool = False, client: Any = None) -> RegionResult:
    """Run every scene of ``cfg``; never raises for a single scene's failure."""
    from pipeline.run.cluster import dask_client
    from pipeline.run.folder import ensure_writable_dir

    out_dir = cfg.output.dir
    ensure_writable_dir(out_dir, field="output.dir", source=cfg.source)
    with region_lock(cfg):
        if client is None:
            with dask_client(cfg.dask) as own_client:
                return _run_scenes(cfg, force, own_client)
        return _run_scenes(cfg, force, client)


def _run_scenes(cfg: RegionConfig, force: bool, client: Any) -> RegionResult:
    """Run the region's scenes on ``client``, record each outcome, merge the completed layers."""
    from pipeline.run.folder import write_json_atomic

    from pipeline.run.scene import run_scene

    result = RegionResult()
    state: dict[str, Any] = {"region": cfg.name, "started": dt.datetime.now(dt.UTC).isoformat(), "scenes": {}}
    out_dir = cfg.output.dir
    state_file = state_path(cfg)
    n = len(cfg.scenes)
    for i, scene_yaml in enumerate(cfg.scenes, 1):
        outcome = SceneOutcome(config=str(scene_yaml), status="failed")
        log.info("[%d/%d] scene %s", i, n, scene_yaml)
        t0 = time.perf_counter()
        for attempt in range(cfg.retries + 1):
            outcome.attempts = attempt + 1
            try:
                scene_cfg = _scene_config_for_region(scene_yaml, cfg)
                res = run_scene(scene_cfg, force=force, client=client)
            except PipelineError as exc:  # bad input: retrying does not help, but for transient failures
                outcome.error = str(exc)
                if getattr(exc, "transient", False) and attempt < cfg.retries:
                    log.warning("[%d/%d] %s failed (%s); retrying", i, n, scene_yaml, exc)
                    continue
                log.error("[%d/%d] %s failed: %s", i, n, scene_yaml, exc)
                break
            except Exception as exc:  # noqa: BLE001 - one scene must not stop the night
                outcome.error = f"{type(exc).__name__}: {exc}"
                if attempt < cfg.retries:
                    log.warning("[%d/%d] %s failed (%s); retrying", i, n, scene_yaml, outcome.error)
                    continue
                log.error("[%d/%d] %s failed after %d attempt(s): %s", i, n, scene_yaml, attempt + 1, outcome.error)
                break
            else:
                outcome.status = res.status
                outcome.scene_id = res.scene_id
                outcome.geopackage = str(res.geopackage)
                outcome.n_polygons = res.n_polygons
                outcome.error = None
                break
        outcome.seconds = round(time.perf_counter() - t0, 3)
        result.outcomes.append(outcome)
        state["scenes"][str(scene_yaml)] = outcome.__dict__
        write_json_atomic(state_file, state)

    gpkgs = [Path(o.geopackage) for o in result.outcomes if o.status != "failed" and o.geopackage]
    if gpkgs:
        from pipeline.run.merge import merge_scene_layers

        merged_path = out_dir / f"{cfg.name}.gpkg"
        result.n_merged = merge_scene_layers(gpkgs, merged_path, region=cfg.name)
        result.merged = merged_path
    state["finished"] = dt.datetime.now(dt.UTC).isoformat()
    state["merged"] = str(result.merged) if result.merged else None
    write_json_atomic(state_file, state)
    _write_region_page(cfg, result, state)
    return result


def _write_region_page(cfg: RegionConfig, result: RegionResult, state: dict[str, Any]) -> None:
    """The region's HTML map report (a failure to draw it is a warning: the job's outputs are complete)."""
    from pipeline.report.region import write_region_report

    try:
        result.page = write_region_report(cfg.output.dir, cfg.name, result.outcomes, result.merged,
                                          started=state["started"], finished=state["finished"])
    except Exception as exc:  # noqa: BLE001
        log.warning("could not write the region's HTML report in %s: %s", cfg.output.dir, exc)

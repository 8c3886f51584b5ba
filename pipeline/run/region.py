"""The nightly regional job: many scenes, one Dask cluster, resumable, tracked across nights.

``python -m pipeline region region.yaml`` runs every scene of the region with
the same cluster (a local one by default, ``dask.scheduler`` to use an existing
scheduler). Each scene is a normal scene run: it is skipped when its outputs
for the same inputs, models and config already exist, so an interrupted night
resumes where it stopped. A scene that fails (bad input, a crash) is recorded
(``<name>.region_state.json``) and the job goes on with the next; transient failures are
retried. One job per region and output folder runs at a time.

The state file also keeps every completed scene run the region ever recorded (``completed``:
scene config -> run folder -> record), this job's merged into the previous job's as each scene
completes. At the end the regional GeoPackage ``<name>.gpkg`` (EPSG:4326) is rebuilt from the
outputs of all of them (:mod:`pipeline.run.tracking`): ``landslides``, one feature per landslide
over time (detections of different scenes or nights that share area are one landslide),
``new_landslides`` (first seen on the newest night of this job) and ``not_observed`` (per night,
the part of the region's footprint no valid pixel covered). Rebuilt, never appended to: reruns
never duplicate features, and the order in which scenes finished does not matter.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import SceneConfig, load_scene_config
from pipeline.core.errors import DiskFull, OutputError, PipelineError
from pipeline.core.region_config import RegionConfig
from pipeline.run.products import Product

log = logging.getLogger(__name__)

#: The job's state beside the regional layer, one per region: ``<name>.region_state.json``.
STATE_SUFFIX = ".region_state.json"


def state_path(cfg: RegionConfig) -> Path:
    """Where the region's state is kept: one file per region, so regions can share a folder."""
    from pipeline.run.folder import safe_name

    return cfg.output.dir / f"{safe_name(cfg.name)}{STATE_SUFFIX}"


class RegionBusy(OutputError):
    """Another job of the same region is running in the same output folder."""


def _lock_path(cfg: RegionConfig) -> Path:
    """The region's lock file in its output folder."""
    from pipeline.run.folder import safe_name

    return cfg.output.dir / f".{safe_name(cfg.name)}.region.lock"


@contextmanager
def region_lock(cfg: RegionConfig) -> Iterator[None]:
    """Hold the region's lock for the job; a second job of the same region refuses clearly."""
    from pipeline.core import fsutil

    path = _lock_path(cfg)
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


def region_running(cfg: RegionConfig) -> bool:
    """True while a job of the region holds its lock in its output folder."""
    from pipeline.core import fsutil

    path = _lock_path(cfg)
    if not path.exists():
        return False
    try:
        fd = fsutil.acquire_lock(path)
    except fsutil.LockHeld:
        return True
    except (ImportError, OSError):
        return False
    fsutil.release_lock(fd, path)
    return False


@dataclass
class SceneOutcome:
    config: str  # the scene YAML file, or where the product was found
    status: str  # completed | skipped (up to date) | failed | excluded (a product not used: ``reason``)
    scene_id: str | None = None
    geopackage: str | None = None
    n_polygons: int | None = None
    seconds: float | None = None
    error: str | None = None
    attempts: int = 0
    reason: str | None = None  # why a product found was not used
    sensing: str | None = None  # products: the sensing time (ISO 8601)
    footprint: dict[str, Any] | None = None  # products: the footprint their metadata states (GeoJSON, lon/lat)
    started: str | None = None  # when its run started (ISO 8601, UTC)


class NightStopped(Exception):
    """A scene failed in a way that stops the night (the output folder's disk is full)."""

    def __init__(self, outcome: SceneOutcome, error: PipelineError) -> None:
        super().__init__(str(error))
        self.outcome, self.error = outcome, error


@dataclass
class _Work:
    """One scene of the night: a scene YAML file, or a product found (with the job's context)."""

    source: str
    yaml: Path | None = None
    product: Product | None = None


@dataclass
class RegionResult:
    outcomes: list[SceneOutcome] = field(default_factory=list)
    merged: Path | None = None
    n_merged: int = 0  # landslides in the regional layer
    n_new: int = 0  # of which first seen on the newest night of this job
    page: Path | None = None  # the region's HTML report

    @property
    def failed(self) -> list[SceneOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def excluded(self) -> list[SceneOutcome]:
        return [o for o in self.outcomes if o.status == "excluded"]


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
    """Run the region's scenes on ``client``, record each outcome, rebuild the regional layers."""
    from pipeline.run.folder import write_json_atomic
    from pipeline.run.in_flight import for_each_in_flight, scenes_in_flight
    from pipeline.run.region_products import ProductJobs, night_work

    result = RegionResult()
    state_file = state_path(cfg)
    now = dt.datetime.now(dt.UTC)
    state: dict[str, Any] = {"region": cfg.name, "started": now.isoformat(), "scenes": {},
                             "completed": previous_completed(state_file)}
    work, excluded = night_work(cfg, now.date())
    for outcome in excluded:
        result.outcomes.append(outcome)
        state["scenes"][outcome.config] = outcome.__dict__
    jobs = ProductJobs(cfg, state["completed"]) if cfg.products is not None else None
    n = len(work)

    def run_item(i: int, item: _Work) -> SceneOutcome | NightStopped:
        log.info("[%d/%d] %s %s", i, n, "product" if item.product else "scene", item.source)
        try:
            if item.product is not None:
                assert jobs is not None
                return jobs.attempt(item.product, force, client, f"[{i}/{n}]")
            assert item.yaml is not None
            return _attempt_scene(lambda y=item.yaml: nullcontext(_scene_config_for_region(y, cfg)),
                                  item.source, cfg, force, client, f"[{i}/{n}]")
        except NightStopped as stop:
            return stop

    stopped: list[PipelineError] = []
    finished: dict[int, SceneOutcome] = {}

    def record(i: int, item: _Work, outcome: SceneOutcome | NightStopped) -> bool:
        if isinstance(outcome, NightStopped):  # recorded where there is room; the regional layers stay
            log.error("[%d/%d] %s failed: %s; the night stops", i, n, item.source, outcome.error)
            state["scenes"][item.source] = outcome.outcome.__dict__
            stopped.append(outcome.error)
            with suppress(OSError):
                write_json_atomic(state_file, state)
            return False
        finished[i] = outcome
        state["scenes"][item.source] = outcome.__dict__
        if outcome.status != "failed" and outcome.geopackage:
            record_run(state["completed"], outcome, state["started"])
            if jobs is not None and item.product is not None:
                jobs.remember(item.product, outcome)
        write_json_atomic(state_file, state)
        return True

    width = scenes_in_flight(cfg.scenes_in_flight, client)
    if width > 1:
        log.info("region %s: up to %d scenes in flight", cfg.name, width)
    for_each_in_flight(work, run_item, width, record)
    if stopped:
        raise stopped[0]
    result.outcomes += [finished[i] for i in sorted(finished)]

    if completed_records(state["completed"]):
        _rebuild_regional(cfg, state, result)
    state["finished"] = dt.datetime.now(dt.UTC).isoformat()
    state["merged"] = str(result.merged) if result.merged else None
    write_json_atomic(state_file, state)
    _write_region_page(cfg, result, state)
    return result


def _attempt_scene(scene: Callable[[], AbstractContextManager[SceneConfig]], source: str, cfg: RegionConfig,
                   force: bool, client: Any, tag: str) -> SceneOutcome:
    """Run one scene (``scene`` gives its config for one attempt), retrying transient failures
    (``cfg.retries``); never raises for the scene's failure."""
    from pipeline.run.scene import run_scene

    outcome = SceneOutcome(config=source, status="failed", started=dt.datetime.now(dt.UTC).isoformat())
    t0 = time.perf_counter()
    for attempt in range(cfg.retries + 1):
        outcome.attempts = attempt + 1
        try:
            with scene() as scene_cfg:
                res = run_scene(scene_cfg, force=force, client=client)
        except PipelineError as exc:  # bad input: retrying does not help, but for transient failures
            outcome.error = str(exc)
            if isinstance(exc, DiskFull):  # (a file size limit too) every later scene would meet it
                outcome.seconds = round(time.perf_counter() - t0, 3)
                raise NightStopped(outcome, exc) from None
            if getattr(exc, "transient", False) and attempt < cfg.retries:
                log.warning("%s %s failed (%s); retrying", tag, source, exc)
                continue
            log.error("%s %s failed: %s", tag, source, exc)
            break
        except Exception as exc:  # noqa: BLE001 - one scene must not stop the night
            outcome.error = f"{type(exc).__name__}: {exc}"
            if attempt < cfg.retries:
                log.warning("%s %s failed (%s); retrying", tag, source, outcome.error)
                continue
            log.error("%s %s failed after %d attempt(s): %s", tag, source, attempt + 1, outcome.error)
            break
        else:
            outcome.status = res.status
            outcome.scene_id = res.scene_id
            outcome.geopackage = str(res.geopackage)
            outcome.n_polygons = res.n_polygons
            outcome.error = None
            break
    outcome.seconds = round(time.perf_counter() - t0, 3)
    return outcome


# -- the completed runs of every night, and the regional layers rebuilt from them
def previous_completed(state_file: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """The completed scene runs recorded in the region's previous state (config -> run folder ->
    record); from a state written before they were kept, its scenes that completed. An unreadable
    state is kept aside (``<state>.unreadable``) with an error in the log, and the job starts afresh."""
    import json

    try:
        old = json.loads(state_file.read_text(encoding="utf-8"))
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        aside = state_file.with_name(state_file.name + ".unreadable")
        with suppress(OSError):
            state_file.replace(aside)
        log.error("%s is unreadable (%s), kept as %s: the regional layers start from this job's scenes",
                  state_file, getattr(exc, "strerror", None) or exc, aside.name)
        return {}
    completed: dict[str, dict[str, dict[str, Any]]] = {}
    for config, runs in (old.get("completed") or {}).items():
        completed[str(config)] = {str(run_dir): dict(rec) for run_dir, rec in (runs or {}).items()}
    when = str(old.get("started") or "")
    for outcome in (old.get("scenes") or {}).values():
        if isinstance(outcome, dict) and outcome.get("status") != "failed" and outcome.get("geopackage"):
            record_run(completed, SceneOutcome(**{k: outcome.get(k) for k in ("config", "status", "scene_id",
                                                                              "geopackage")}), when)
    return completed


def record_run(completed: dict[str, dict[str, dict[str, Any]]], outcome: SceneOutcome, when: str) -> None:
    """Record ``outcome``'s run folder under its scene config in ``completed`` (a rerun of the same
    run updates its record: one record per config and run folder)."""
    run_dir = str(Path(str(outcome.geopackage)).parent)
    runs = completed.setdefault(str(outcome.config), {})
    rec = runs.setdefault(run_dir, {"first_recorded": when})
    rec.update(scene_id=outcome.scene_id or rec.get("scene_id"), geopackage=str(outcome.geopackage),
               last_recorded=max(when, str(rec.get("last_recorded") or "")))


def completed_records(completed: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The records of ``completed`` as a flat list, each with its ``config`` and ``run_dir``."""
    return [{**rec, "config": config, "run_dir": run_dir}
            for config, runs in sorted(completed.items()) for run_dir, rec in sorted(runs.items())]


def _rebuild_regional(cfg: RegionConfig, state: dict[str, Any], result: RegionResult) -> None:
    """Rebuild ``<name>.gpkg`` from every recorded run; the counts go to ``result`` and ``state``."""
    from pipeline.run.regional_gpkg import remove_stale_temporaries, write_regional_geopackage
    from pipeline.run.tracking import build_layers

    merged_path = cfg.output.dir / f"{cfg.name}.gpkg"
    remove_stale_temporaries(merged_path)  # the region's lock is held
    job = {o.scene_id for o in result.outcomes if o.status in ("completed", "skipped") and o.scene_id}
    layers = build_layers(completed_records(state["completed"]), job)
    write_regional_geopackage(layers, merged_path, region=cfg.name)
    result.merged, result.n_merged, result.n_new = merged_path, len(layers.landslides), len(layers.new_landslides)
    state["newest_night"] = layers.newest_night
    state["layers"] = {"landslides": result.n_merged, "new_landslides": result.n_new,
                       "not_observed": len(layers.not_observed)}


def _write_region_page(cfg: RegionConfig, result: RegionResult, state: dict[str, Any]) -> None:
    """The region's HTML map report (a failure to draw it is a warning: the job's outputs are complete)."""
    from pipeline.report.region import write_region_report

    try:
        result.page = write_region_report(cfg.output.dir, cfg.name, result.outcomes, result.merged,
                                          started=state["started"], finished=state["finished"])
    except Exception as exc:  # noqa: BLE001
        log.warning("could not write the region's HTML report in %s: %s", cfg.output.dir, exc)

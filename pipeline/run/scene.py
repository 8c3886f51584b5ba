"""One scene, end to end: ``python -m pipeline run scene.yaml``.

Stages and the grid each produces:

1. stack      -> lazy (band, y, x) float32 on the 10 m scene grid + valid mask
2. infer      -> probability raster on the same grid (windows, batches, blending),
                 written as a plain tiled intermediate; stage boundary on disk so the model
                 runs once (the probability COG is made from it during postprocessing);
                 the same computation thresholds, opens and closes each stored block
                 (the first, local cleaning step), summarizes its objects and background
                 for the size and hole steps, and counts the valid pixels
3. postprocess-> cleaned mask, global object labels, per-object statistics
4. vectorize  -> polygons with attributes -> GeoPackage (+ mask COG, quicklook)
5. report     -> report.json: timings per stage, counts, areas, checksums, versions

Outputs go to ``<output.dir>/<scene id>/<run key>/``. The run key is a
fingerprint of the inputs, models and result-affecting config, so a rerun with
the same inputs does nothing and says so, and a changed run writes a new
version beside the old one (never appending to it). ``report.json`` is written
last and marks a complete run; every file is written under a temporary name
and renamed, so an interrupted run leaves no partial file at a final path.

``report.json`` records the size and SHA-256 of every output file; a rerun
skips only when all of them are still there with those bytes, and otherwise
says which file and why and redoes the run. A run holds a lock on its run
folder (``.lock``) from its start to its end: a second run of the same
scene, model and config refuses while the first writes, and only the
holder of the lock removes the hidden temporaries an interrupted run left
(docs/guarantees.md).
"""

from __future__ import annotations

import argparse
import contextvars
import datetime as dt
import functools
import json
import logging
import os
import platform
import re
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__

from pipeline.core import fsutil
from pipeline.core.config import SceneConfig, load_scene_config
from pipeline.core.errors import ModelError, OutputError
from pipeline.core.grid import Grid

log = logging.getLogger(__name__)

REPORT = "report.json"
#: The lock file in a run folder: held (``flock``) by the run writing the folder, removed at its end.
LOCK = ".lock"
#: The probability COG stores round(p x 254) as uint8, 255 = no data.
PROB_SCALE = 254.0
#: The stored probability's no-data code.
PROB_NODATA = 255
LATEST = "LATEST"


@dataclass
class RunResult:
    scene_id: str
    status: str  # "completed" or "skipped"
    run_dir: Path
    geopackage: Path
    n_polygons: int
    total_area_m2: float
    seconds: float
    report: dict[str, Any] = field(default_factory=dict)


# -- helpers ---------------------------------------------------------------
def ensure_writable_dir(path: Path, *, field: str, source: Path | None = None) -> None:
    """Create ``path`` if needed and prove we can write into it, or raise OutputError."""
    where = f"{source}: " if source else ""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise fsutil.folder_failure(
            exc, path / ".write-test", f"{where}{field}: output directory {path} is not writable "
            f"({exc.strerror or exc}); choose another output.dir or fix its permissions") from None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON beside ``path`` under a temporary name, check that the file holds
    every byte, rename it into place (:func:`pipeline.core.fsutil.write_atomic`: a full disk raises
    :class:`~pipeline.core.errors.DiskFull`, and ``path`` keeps what it held)."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    fsutil.write_atomic(path, text.encode())


class RunFolderBusy(OutputError):
    """Another run holds the run folder's lock: it is writing the same outputs now."""


#: The hidden temporaries a run creates in its run folder (every one starts with a dot, the lock
#: file does not match): what a run that died left there, and only that, is removed by the next
#: run that holds the folder's lock (:func:`remove_leftovers`).
LEFTOVERS = tuple(re.compile(p) for p in (
    # this module's intermediates, fixed names (:func:`_run_stages`), and GDAL's sidecar of a raster
    r"\.(probability|layers)\.tif(\.aux\.xml)?",
    # pipeline.io.cog.write_rasters and cog_from_tiff: ``.<name>.<8 hex>.tiles.tif`` and ``.cog.tif``
    # beside each raster (``..probability.tif.<id>.tiles.tif`` for the hidden intermediates)
    r"\..+\.[0-9a-f]{8}\.(tiles|cog)\.tif(\.aux\.xml)?",
    # postprocess.gpkg.write_geopackage: ``.<name>.<random>.tmp.gpkg`` and SQLite's side files
    r"\..+\.tmp\.gpkg(-journal|-wal|-shm)?",
    # fsutil.mkstemp(prefix=".<name>.", suffix=".tmp"): the quicklook (postprocess.quicklook) and
    # report.json (write_json_atomic)
    r"\..+\.tmp",
))


def is_leftover(name: str) -> bool:
    """Whether ``name`` is one of the temporaries a run creates in its run folder (:data:`LEFTOVERS`)."""
    return any(p.fullmatch(name) for p in LEFTOVERS)


def remove_leftovers(run_dir: Path) -> list[str]:
    """Remove the temporaries of dead runs from ``run_dir``; call only while holding its lock
    (:func:`run_folder_lock`): a live run's temporaries are the lock holder's own. Returns the names."""
    removed = []
    for path in sorted(run_dir.iterdir()):
        if is_leftover(path.name) and not path.is_dir():
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("could not remove %s, left by an interrupted run: %s", path, exc.strerror or exc)
                continue
            removed.append(path.name)
    if removed:
        log.info("removed %d temporary file(s) that an interrupted run left in %s: %s", len(removed), run_dir,
                 ", ".join(removed))
    return removed


@contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[bool]:
    """Hold ``run_dir``'s lock (an exclusive ``flock`` on its :data:`LOCK` file) while the block runs;
    yields whether it is held. Raises :class:`RunFolderBusy` when another run holds it. Where the
    folder or its file system cannot be locked (no ``fcntl``, a read-only folder, no lock support)
    the block runs unlocked, with a warning: it then removes no leftovers."""
    path = run_dir / LOCK
    fd: int | None = None
    try:
        fd = fsutil.acquire_lock(path)
    except fsutil.LockHeld:
        raise RunFolderBusy(
            f"{run_dir}: another run is writing this run folder now (same scene, model and config; it "
            f"holds {path.name}); wait for it to finish, or stop it, then run again"
        ) from None
    except (ImportError, OSError) as exc:
        log.warning("cannot lock %s (%s): concurrent runs of this config are not detected and temporary "
                    "files of interrupted runs are not removed", path,
                    getattr(exc, "strerror", None) or exc)
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        fsutil.release_lock(fd, path)


#: GDAL's sidecar files: written beside a file by whoever reads it (the GeoPackage's, with its metadata,
#: as soon as it is opened; a raster's by QGIS's statistics), so no output of a run.
SIDECAR = ".aux.xml"


def output_files(run_dir: Path) -> dict[str, dict[str, int | str]]:
    """Size and SHA-256 of every output file in ``run_dir``: its visible files, but report.json and
    GDAL's sidecar files (:data:`SIDECAR`)."""
    paths = sorted(p for p in run_dir.iterdir()
                   if not p.name.startswith(".") and p.name != REPORT and not p.name.endswith(SIDECAR)
                   and p.is_file())
    with ThreadPoolExecutor(max(1, min(4, len(paths))), thread_name_prefix="checksums") as pool:
        records = list(pool.map(fsutil.file_record, paths))  # hashlib releases the GIL
    return {p.name: r for p, r in zip(paths, records, strict=True)}


def verify_run(run_dir: Path, gpkg_path: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The report of the completed run in ``run_dir`` when every output file it records is there
    with the size and SHA-256 it records, else None and what is wrong (nothing when the folder holds
    no report.json: no run completed there)."""
    path = run_dir / REPORT
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        return None, []
    except (OSError, ValueError) as exc:  # ValueError: JSON and decoding errors
        return None, [f"{REPORT} is unreadable ({getattr(exc, 'strerror', None) or exc})"]
    try:
        recorded = report["output_files"]
        int(report["counts"]["polygons"]), float(report["counts"]["total_area_m2"])
        items = [(str(name), int(rec["bytes"]), str(rec["sha256"])) for name, rec in recorded.items()]
        if any(name != Path(name).name or name.startswith(".") for name, _, _ in items):
            raise ValueError("not a file of the run folder")
    except (KeyError, TypeError, ValueError, AttributeError):
        what = "no output checksums (written by an older version)" if isinstance(report, dict) and \
            "output_files" not in report else "unexpected content"
        return None, [f"{REPORT} has {what}"]
    problems = []
    if gpkg_path.name not in recorded:
        problems.append(f"{REPORT} does not record the GeoPackage {gpkg_path.name}")
    t0 = time.perf_counter()
    for name, size, sha256 in items:
        file = run_dir / name
        try:
            actual = file.stat().st_size
            if actual != size:
                problems.append(f"{name} has {actual} bytes, {REPORT} recorded {size}")
            elif fsutil.file_record(file)["sha256"] != sha256:
                problems.append(f"{name} does not have the SHA-256 that {REPORT} recorded (its content changed)")
        except FileNotFoundError:
            problems.append(f"{name} is missing")
        except OSError as exc:
            problems.append(f"{name} cannot be read ({exc.strerror or exc})")
    if problems:
        return None, problems
    log.info("verified %d output file(s) (%.1f MB) against %s in %.2f s", len(items),
             sum(size for _, size, _ in items) / 1e6, REPORT, time.perf_counter() - t0)
    return report, []


class StageTimer:
    """Wall time per stage, logged as it goes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        log.info("stage %s ...", name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)
            log.info("stage %s done in %.1f s", name, self.seconds[name])


def _package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"pipeline": __version__, "python": platform.python_version()}
    for name in ("numpy", "rasterio", "xarray", "rioxarray", "dask", "distributed", "torch",
                 "segmentation-models-pytorch", "geopandas", "shapely", "pyogrio"):
        with suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    import rasterio

    out["gdal"] = rasterio.__gdal_version__
    return out


def load_models(cfg: SceneConfig, *, weights: bool = True) -> list[Any]:
    """The configured artefacts, checked as an ensemble, with their weights loaded and checked
    against the architecture; with ``weights=False`` their metadata only (``module`` is None).

    A run reads metadata only: its main process never runs a model, and PyTorch (seconds of import
    and hundreds of MB) is imported by the workers, which load the weights from the files (with
    the same checks, so a bad file fails the run with the same error). The files' checksums
    identify the models in the run's fingerprint, and a worker refuses a file that changed since.
    """
    from pipeline.model.artefact import check_ensemble, load_artefact, read_metadata

    for path in cfg.model.paths:
        if not path.is_file():
            raise ModelError(f"{cfg.source}: model.path: model artefact not found: {path}")
    models = [load_artefact(p) if weights else read_metadata(p) for p in cfg.model.paths]
    check_ensemble(models, cfg.model.weights)
    return models


def processing_level(models: list[Any], product: str, configured: str | None) -> dict[str, Any]:
    """The scene's Sentinel-2 processing level against the levels the models serve.

    The level comes from the product metadata (SAFE) or ``scene.level`` (per-band files). A level
    a model was not trained for, or an unknown one, is run all the same, with a warning
    (:func:`log_processing_level`) and ``served: false`` in the report: the detections of such a
    scene are less reliable (docs/model-card.md gives the measured cost).
    """
    level = product[3:] if product.startswith("S2_") else configured
    source = "product metadata" if product.startswith("S2_") else ("scene.level" if configured else None)
    served = {m.name or m.architecture: list(m.levels) for m in models}
    unserved = sorted(name for name, levels in served.items() if level not in levels)
    return {"scene": level, "source": source, "models": served, "served": level is not None and not unserved,
            "unserved": unserved}


def log_processing_level(info: dict[str, Any]) -> None:
    """Log :func:`processing_level`'s verdict: a warning when a model does not serve the scene's level."""
    if info["scene"] is None:
        log.warning("processing level of the scene unknown (per-band files without scene.level); the models "
                    "serve %s; set scene.level: L1C or L2A to have it checked", info["models"])
    elif info["unserved"]:
        log.warning("scene is %s (%s) but model(s) %s were not trained for it (they serve %s): detections may "
                    "be less reliable (see docs/model-card.md)", info["scene"], info["source"],
                    ", ".join(info["unserved"]), info["models"])
    else:
        log.info("scene is %s (%s); the models serve it", info["scene"], info["source"])


def model_channels(models: list[Any]) -> list[str]:
    """Channels the stack must supply: every member's, first member's order first."""
    return list(dict.fromkeys(c for m in models for c in m.channels))


# -- the run -----------------------------------------------------------------
def run_scene(cfg: SceneConfig, *, force: bool = False, client: Any = None) -> RunResult:
    """Run all stages for one scene; skip if the same run already completed."""
    from pipeline.run.cluster import dask_client
    from pipeline.run.fingerprint import run_fingerprint

    t_start = time.perf_counter()
    timer = StageTimer()
    ensure_writable_dir(cfg.output.dir, field="output.dir", source=cfg.source)
    with timer("load-models"):
        models = load_models(cfg, weights=False)
    key = run_fingerprint(cfg, [m.sha256 for m in models])

    from pipeline.inference.tiled import inference_block_size
    from pipeline.stack.layers import stack_scene

    with timer("stack-graph"):
        # stack chunks = inference blocks (the blocks read through stack.reader: their chunk and the
        # strips of their neighbours that their windows reach, in one call)
        block = inference_block_size(cfg.grid.block_size, models[0].tile_size, cfg.model.overlap)
        stack_cfg = cfg.model_copy(update={"grid": cfg.grid.model_copy(update={"block_size": block})})
        stack = stack_scene(stack_cfg, model_channels(models))
    log_processing_level(processing_level(models, stack.product, cfg.scene.level))
    scene_dir = cfg.output.dir / _safe_name(stack.scene_id)
    run_dir = scene_dir / f"run-{key[:12]}"
    gpkg_path = run_dir / f"{_safe_name(stack.scene_id)}_landslides.gpkg"
    report_path = run_dir / REPORT
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fsutil.folder_failure(
            exc, run_dir, f"{run_dir}: cannot create the run folder ({exc.strerror or exc})") from None

    with ExitStack() as resources:
        # held until everything below has ended (the cluster closed): first in, last out
        locked = resources.enter_context(run_folder_lock(run_dir))
        if locked:
            remove_leftovers(run_dir)
        if not force:
            report, problems = verify_run(run_dir, gpkg_path)
            if report is not None:
                log.info("outputs for this scene, model and config already exist in %s; nothing to do "
                         "(use --force to recompute)", run_dir)
                return RunResult(
                    stack.scene_id, "skipped", run_dir, gpkg_path,
                    int(report["counts"]["polygons"]), float(report["counts"]["total_area_m2"]),
                    time.perf_counter() - t_start, report,
                )
            if problems:
                log.warning("run folder %s: %s; redoing the run", run_dir, "; ".join(problems))
        # the folder is not complete again until this run's report is written
        try:
            report_path.unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(f"{report_path}: cannot remove the report of the earlier run "
                              f"({exc.strerror or exc})") from None
        if client is not None:
            cluster = _Cluster(lambda: client)
        elif cfg.dask.scheduler:
            with timer("start-cluster"):
                started = resources.enter_context(dask_client(cfg.dask))
            cluster = _Cluster(lambda: started)
        else:
            # A local cluster takes seconds to start (worker processes import PyTorch): start it in
            # the background while this process builds the inference graphs. distributed is imported
            # here first: the starting thread and this one importing it at once can find it half
            # initialized ("cannot import name 'Server' from partially initialized module")
            import distributed  # noqa: F401

            cluster = _Cluster.start_local(cfg.dask, resources, worker_imports(models))
        resources.callback(cluster.release)  # before the cluster closes
        result = _run_stages(cfg, models, stack, run_dir, gpkg_path, key, timer, t_start, cluster)
        if locked:
            remove_leftovers(run_dir)
        return result


class _Cluster:
    """The Dask client of a run, possibly still starting in a background thread."""

    def __init__(self, get: Any, starting: bool = False, own: bool = False) -> None:
        self._get = get
        self.starting = starting
        self.own = own  # started by this run for this run alone (a local cluster)
        self._current = ExitStack()
        self._entered = False

    def wait(self, timer: StageTimer) -> Any:
        """The client, waiting (timed as ``start-cluster``) for it to be up when it is still starting.

        From then on it is this thread's current client until :meth:`release`: the run computes
        on it even when the caller has made another client current (``with Client(...)``).
        """
        if self.starting:
            with timer("start-cluster"):
                client = self._get()
            self.starting = False
        else:
            client = self._get()
        if not self._entered:
            self._current.enter_context(client.as_current())
            self._entered = True
        return client

    def release(self) -> None:
        self._current.close()
        self._entered = False

    @classmethod
    def start_local(cls, section: Any, resources: ExitStack, imports: Sequence[str] = ()) -> _Cluster:
        from concurrent.futures import ThreadPoolExecutor

        from pipeline.run.cluster import dask_client

        def start() -> tuple[Any, Any]:
            context = dask_client(section, imports)
            return context, context.__enter__()

        pool = ThreadPoolExecutor(1, thread_name_prefix="start-cluster")
        future = pool.submit(start)

        def close() -> None:
            try:
                context, _ = future.result()
            except Exception:  # noqa: BLE001 - the error was raised to the run (or it failed earlier)
                return
            finally:
                pool.shutdown()
            context.__exit__(None, None, None)

        resources.callback(close)
        return cls(lambda: future.result()[1], starting=True, own=True)


def worker_imports(models: Sequence[Any]) -> tuple[str, ...]:
    """What the workers import beyond the task modules before the inference: the model library,
    when a model needs it (the shipped default does not)."""
    from pipeline.model.architectures import PLAIN_UNET, canonical_architecture

    needs_smp = any(canonical_architecture(m.architecture) != PLAIN_UNET for m in models)
    return ("segmentation_models_pytorch",) if needs_smp else ()


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:120] or "scene"


def aux_layers(cfg: SceneConfig, stack: Any, wanted: list[str]) -> dict[str, Any]:
    """(y, x) layers for attributes and rules that the model stack does not carry, as far as the
    inputs have them (channels the model reads travel with the probability instead).

    They come from their own small stack (only these channels), so reading one
    does not warp all model channels again; the model stack is used only if the
    grids would differ.
    """
    from pipeline.io.readers import read_scene
    from pipeline.stack.layers import available_channels, stack_scene

    have = set(available_channels(read_scene(cfg.scene)))
    names = [c for c in wanted if c in have]
    if not names:
        return {}
    aux = stack_scene(cfg, names)
    if aux.grid != stack.grid:
        log.debug("auxiliary layers on a different footprint; selecting them from the model stack")
        aux = stack_scene(cfg, list(dict.fromkeys([*map(str, stack.data.band.values), *names])))
    return {n: aux.data.sel(band=n) for n in names}


def _run_stages(cfg, models, stack, run_dir, gpkg_path, key, timer, t_start, cluster) -> RunResult:  # noqa: ANN001, PLR0913
    from pipeline.inference.tiled import InferenceOptions, predict, write_prediction
    from pipeline.core.progress import before_first_compute

    run_id = f"{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"
    grid = stack.grid

    if not cluster.starting:
        cluster.wait(timer)  # a given or connected client: everything below computes on it
    if cfg.output.save_stack:
        from pipeline.stack.layers import save_stack

        cluster.wait(timer)
        with timer("save-stack"):
            save_stack(stack, run_dir / "stack.tif")

    rule_bands = [b for bands in cfg.postprocess.rule_bands().values() for b in bands]
    wanted = list(dict.fromkeys(["SLOPE", "DEM", *rule_bands]))
    # Channels the later stages need and the model stack already reads travel with the
    # probability (one read of the inputs); the others are stacked on their own below.
    in_stack = [str(b) for b in stack.data.band.values]
    keep = [c for c in wanted if c in in_stack]
    # intermediate; a rerun after a crash replaces it
    layers_path = run_dir / ".layers.tif" if keep else None
    # the inference's graphs are built (and its intermediate files created) while a local cluster
    # may still be starting: the run waits for the cluster right before it computes
    with timer("infer"), before_first_compute(lambda: cluster.wait(timer)):
        options = InferenceOptions.from_config(cfg.model, block_size=cfg.grid.block_size)
        # the mask without the bands' own no-data: each block derives that from the pixels it reads;
        # the quicklook's true colour is averaged onto its coarse grid by the blocks that read it
        pred = predict(stack.data, stack.mask, grid, models, options, keep=keep,
                       level=processing_level(models, stack.product, cfg.scene.level)["scene"],
                       reader=stack.reader, coarse=_quicklook_coarse(grid) if cfg.output.quicklook else None)
        # An intermediate, plain tiled GeoTIFF (a rerun after a crash replaces it): the later stages
        # read it at once, and the probability COG is made from it while they run.
        plain_prob = run_dir / ".probability.tif"
        unc_path = run_dir / "uncertainty.tif" if pred.uncertainty is not None else None
        # The postprocessing's first, local step (threshold, opening, closing), the per-block
        # summaries its size and hole steps start from, and the count of valid pixels are computed
        # from the same blocks as they are stored, in the same computation: each block as soon as
        # its neighbours are known, while the last blocks are still inferred.
        threshold = cfg.postprocess.threshold if cfg.postprocess.threshold is not None else float(pred.threshold)
        chunks = pred.probability.data.chunks

        def first_step(codes: Any) -> list[Any]:
            from postprocess.morphology import opened_mask, opened_summaries, pack_mask

            known = codes != PROB_NODATA
            prob = codes.map_blocks(_decode_probability, dtype=np.float32)
            opened = opened_mask(prob, known, grid, cfg.postprocess, threshold)
            coarse = [pred.coarse] if pred.coarse is not None else []
            return [pack_mask(opened), known.sum(), opened_summaries(opened, known), *coarse]

        # uint8: probability x 254, 255 = no data (an eighth of float32 on disk)
        _, (packed, n_valid, summaries, *coarse) = write_prediction(
            pred, plain_prob, uncertainty_path=unc_path, layers_path=layers_path, dtype="uint8",
            probability_cog=False, also=first_step)
    client = cluster.wait(timer)
    try:
        from postprocess.morphology import OpenedSummaries, unpack_mask

        return _finish_run(cfg, models, stack, run_dir, gpkg_path, key, timer, t_start, run_id,
                           plain_prob, unc_path, layers_path, keep, wanted, pred.threshold,
                           lambda seconds: _inference_figures(client, pred, seconds, own=cluster.own),
                           opened=unpack_mask(packed, chunks), n_valid=int(n_valid),
                           summaries=OpenedSummaries.collect(chunks, summaries),
                           true_colour=coarse[0] if coarse else None)
    finally:
        plain_prob.unlink(missing_ok=True)
        if layers_path is not None:
            layers_path.unlink(missing_ok=True)


def _finish_run(cfg, models, stack, run_dir, gpkg_path, key, timer, t_start, run_id,  # noqa: ANN001, PLR0913
                prob_path, unc_path, layers_path, keep, wanted, model_threshold, inference_figures,
                opened, n_valid, summaries=None, true_colour=None) -> RunResult:
    from postprocess.gpkg import write_geopackage
    from postprocess.pipeline import polygons_from_probability
    from postprocess.raster_style import write_raster_styles

    from pipeline.io.cog import cog_from_tiff, write_cog

    grid = stack.grid
    # Re-open the probability raster lazily: the model ran once, later stages read blocks from disk.
    block = cfg.grid.block_size
    probability = _open_lazy(prob_path, grid, block, probability=True)
    uncertainty = _open_lazy(unc_path, grid, block, like=probability) if unc_path else None
    # The probability is NaN exactly where the input was not valid: later stages
    # take the mask from it instead of re-reading every band of the stack.
    valid = ~probability.isnull()
    layers = {name: _open_lazy(layers_path, grid, block, band=i + 1, like=probability) for i, name in enumerate(keep)} if layers_path else {}
    rest = [c for c in wanted if c not in layers]
    if rest:
        layers.update(aux_layers(cfg, stack, rest))

    # the model's threshold, or the ensemble's combined one (0.5 for a vote)
    threshold = cfg.postprocess.threshold if cfg.postprocess.threshold is not None else float(model_threshold)
    context = {
        "scene_id": stack.scene_id,
        "acq_date": stack.acquisition_date.isoformat() if stack.acquisition_date else None,
        "model_name": "+".join(m.name for m in models),
        "model_sha256": ",".join(m.sha256 for m in models),
        "run_id": run_id,
    }
    # This process mostly waits for the workers from here on: it makes the probability COG and
    # reads the quicklook's background while the postprocessing runs, and the workers compute the
    # mask raster while this process builds and merges the polygons (the valid pixels were counted
    # with the inference).
    pool = ThreadPoolExecutor(4, thread_name_prefix="outputs")
    jobs: dict[str, Any] = {}
    if cfg.output.probability_cog:
        jobs["probability"] = _submit(pool, cog_from_tiff, prob_path, run_dir / "probability.tif",
                                      band_descriptions=["landslide probability x 254 (255 = no data)"],
                                      band_tags=[{"threshold": str(threshold)}])

    def start_mask_outputs(cleaned: Any) -> None:
        if cfg.output.mask_cog:
            jobs["mask"] = _submit(pool, write_cog, cleaned.astype("uint8"), grid, run_dir / "mask.tif",
                                   graph_first=True, dtype="uint8", nodata=255)

    # the mask's graphs may still be sent from the pool's threads until it has shut down
    with _mask_in_graphs(grid):
        try:
            background = (_submit(pool, _quicklook_background, cfg, grid, prob_path, true_colour)
                          if cfg.output.quicklook else None)
            with timer("postprocess"):
                gdf, cleaned = polygons_from_probability(
                    probability, valid, grid, cfg.postprocess,
                    slope=layers.get("SLOPE"), dem=layers.get("DEM"),
                    red=layers.get("B04"), nir=layers.get("B08"), green=layers.get("B03"),
                    uncertainty=uncertainty, threshold=threshold, context=context,
                    on_mask=start_mask_outputs,  # in the probability's chunks
                    opened=opened, summaries=summaries,
                )
            with timer("write"):
                metadata = {
                    "run_id": run_id, "run_key": key, "scene_id": stack.scene_id, "model": context["model_name"],
                    "model_sha256": context["model_sha256"], "threshold": threshold, "grid": grid.to_dict(),
                    "config": str(cfg.source), "pipeline_version": __version__,
                }
                if background is not None:
                    # drawn and encoded in an output thread while this one writes the GeoPackage
                    jobs["quicklook"] = pool.submit(contextvars.copy_context().run, _write_quicklook, background,
                                                    grid, gdf, run_dir / "quicklook.png")
                write_geopackage(gdf, gpkg_path, layer="landslides", metadata=metadata, crs=cfg.output.crs)
                for name in ("quicklook", "mask", "probability"):
                    if name in jobs:
                        jobs[name].result()
                # QGIS styles beside probability.tif and uncertainty.tif (outputs, checksummed below)
                write_raster_styles(run_dir, threshold)
        finally:
            # on an error, what has not started does not start (what runs finishes: its output is atomic)
            pool.shutdown(wait=True, cancel_futures=True)

    total_area = float(gdf["area_m2"].sum()) if len(gdf) else 0.0
    with timer("checksums"):  # of the files in place: a rerun checks them before it skips
        files = output_files(run_dir)
    seconds = time.perf_counter() - t_start
    if n_valid == 0:
        log.warning("scene %s has no valid pixels (cloud, no data or outside the DEM): the GeoPackage is empty", stack.scene_id)
    report = {
        "status": "completed",
        "run_id": run_id,
        "run_key": key,
        "scene_id": stack.scene_id,
        "acquisition_date": context["acq_date"],
        "config": str(cfg.source),
        "config_resolved": cfg.model_dump(mode="json"),
        "models": [{"name": m.name, "path": str(p), "sha256": m.sha256, "threshold": m.threshold}
                   for m, p in zip(models, cfg.model.paths, strict=True)],
        "grid": grid.to_dict(),
        "processing_level": processing_level(models, stack.product, cfg.scene.level),
        "input_checksums": stack.checksums.as_dict() if stack.checksums is not None else None,
        "timings_s": {**timer.seconds, "total": round(seconds, 3)},
        "inference": inference_figures(seconds),
        "counts": {
            "polygons": len(gdf),
            "total_area_m2": total_area,
            "valid_pixels": n_valid,
            "valid_area_m2": n_valid * grid.pixel_area,
        },
        "outputs": [*files, REPORT],
        "output_files": files,
        "versions": _package_versions(),
        "finished": dt.datetime.now(dt.UTC).isoformat(),
    }
    write_json_atomic(run_dir / REPORT, report)
    fsutil.write_atomic(run_dir.parent / LATEST, (run_dir.name + "\n").encode(), prefix=".latest.", suffix="")
    return RunResult(stack.scene_id, "completed", run_dir, gpkg_path, len(gdf), total_area, seconds, report)


def _inference_figures(client: Any, pred: Any, seconds: float, *, own: bool) -> dict[str, Any]:
    """Windows, worker threads and the time the workers spent in the model's forward pass, and
    that time's share of all worker-thread time of the run (``seconds`` of wall time).

    The share only when the cluster is the run's ``own``: the threads of a shared scheduler also
    work for others, and the number of them can change during the run.
    """
    from pipeline.inference.tiled import forward_seconds

    figures: dict[str, Any] = {"windows": pred.windows, "worker_threads": None,
                               "model_forward_seconds": None, "model_forward_share": None}
    try:
        threads = int(sum(client.nthreads().values()))
    except Exception:  # noqa: BLE001 - figures for the report only
        return figures
    forward = forward_seconds(client, pred, flush=own)
    figures["worker_threads"] = threads
    if forward is not None:
        figures["model_forward_seconds"] = round(forward, 3)
    if forward is not None and own and threads and seconds > 0:
        figures["model_forward_share"] = round(forward / (threads * seconds), 4)
        log.info("model forward pass: %.1f s on %d worker thread(s), %.0f %% of the run's worker-thread time",
                 forward, threads, 100 * forward / (threads * seconds))
    return figures


#: Niceness of the output threads (probability and mask COGs, quicklook background).
BACKGROUND_NICE = 19


def _lower_thread_priority() -> None:
    """Make the calling thread yield the CPU to every other runnable thread (Linux: a thread's own
    nice value; elsewhere nothing). The output threads run beside the postprocessing, whose passes
    follow one another: at the lowest priority they take the CPU the passes leave idle (this
    process's resolving and merging, the workers' waits) instead of slowing the passes down."""
    if sys.platform.startswith("linux") and hasattr(os, "setpriority"):
        with suppress(OSError):
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), BACKGROUND_NICE))


def _in_background(fn: Any, graph_first: bool = False) -> Any:
    from pipeline.io.cog import BEFORE_CONVERT, GDAL_THREADS

    if graph_first:
        # the Dask graph is built and sent at normal priority (a fraction of a second): the workers
        # start on it at once instead of when this process's other threads leave the CPU idle
        BEFORE_CONVERT.set(_lower_thread_priority)
    else:
        _lower_thread_priority()  # the pool's threads serve only this run's outputs and end with it
    # no GDAL worker threads from here: they would inherit the low priority and outlive the pool
    GDAL_THREADS.set(1)  # (in this job's own copy of the context)
    return fn()


def _submit(pool: ThreadPoolExecutor, fn: Any, *args: Any, graph_first: bool = False, **kwargs: Any) -> Any:
    """``pool.submit`` at the lowest CPU priority (:func:`_lower_thread_priority`), in a copy of this
    thread's context (a Dask client made current with ``Client.as_current()`` stays the one that
    computes). ``graph_first``: ``fn`` writes rasters from a Dask computation
    (:func:`pipeline.io.cog.write_rasters`), and the thread keeps its priority until that computation
    is sent and done; only the COG copies run at the lowest priority."""
    return pool.submit(contextvars.copy_context().run, _in_background, functools.partial(fn, *args, **kwargs),
                       graph_first)


@contextmanager
def _mask_in_graphs(grid: Any) -> Iterator[None]:
    """Postprocessing and the mask raster send the bit-packed cleaned mask to the workers inside
    their graphs, on purpose (:func:`postprocess.morphology.persist_mask`: 15 MB for a full tile).
    Distributed warns about every graph above 10 MB; that warning says nothing useful here and
    would appear four times per scene in every nightly log. The threshold is raised by twice the
    packed mask while these graphs are sent (a setting of Dask's, not a warnings filter: other
    threads' warnings are not touched)."""
    import dask
    from dask.utils import parse_bytes

    key = "distributed.admin.large-graph-warning-threshold"
    packed = grid.height * ((grid.width + 7) // 8)
    current = parse_bytes(str(dask.config.get(key, "10MB")))
    with dask.config.set({key: max(current, parse_bytes("10MB") + 2 * packed)}):
        yield


def _write_quicklook(background: Any, grid: Any, gdf: Any, path: Path) -> None:
    """The quicklook from its background (a future of :func:`_quicklook_background`) and the polygons."""
    from postprocess.quicklook import write_quicklook_coarse

    coarse = background.result()
    if coarse is not None:
        small, factor, shown = coarse
        write_quicklook_coarse(small, factor, grid, gdf, path, valid=shown)


def _quicklook_coarse(grid: Any) -> tuple[tuple[str, ...], int]:
    """The quicklook's true-colour channels and its coarsening factor on ``grid``."""
    from postprocess.quicklook import TRUE_COLOUR, downsample_factor

    return tuple(TRUE_COLOUR), downsample_factor(grid.shape, QUICKLOOK_SIZE)


#: Longest edge of the quicklook, in pixels (at most).
QUICKLOOK_SIZE = 2048


def _quicklook_background(cfg: SceneConfig, grid: Any, prob_path: Path,
                          true_colour: Any = None) -> tuple[Any, int, Any] | None:
    """The quicklook's true colour averaged straight onto its coarse grid, the coarsening factor and
    where something was analysed (elsewhere the quicklook is black); None without true-colour bands.

    ``true_colour`` holds the means when the inference averaged the bands already as it read them
    (:func:`pipeline.inference.tiled.predict`'s ``coarse``, asked for with :func:`_quicklook_coarse`);
    else they are read here, decimated.
    """
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    from pipeline.core.errors import ChannelError
    from pipeline.stack.layers import read_coarse

    channels, factor = _quicklook_coarse(grid)
    if true_colour is not None:
        small = np.asarray(true_colour, np.float32)
    else:
        try:
            small = read_coarse(cfg, channels, grid, factor)
        except ChannelError as exc:
            log.info("no quicklook: %s", exc)
            return None
    rows, cols = small.shape[1:]
    with rasterio.open(prob_path) as src:  # uncompressed uint8: cheap to read even without overviews
        prob = src.read(1, window=Window(0, 0, cols * factor, rows * factor), out_shape=(rows, cols),
                        resampling=Resampling.nearest)
    return small, factor, prob != np.uint8(PROB_NODATA)


def _decode_probability(codes: np.ndarray) -> np.ndarray:
    """Stored uint8 codes -> probability (float32, NaN for no data), as the later stages read them."""
    return _probability_codes()[codes]


def _probability_codes() -> np.ndarray:
    """uint8 code -> probability: ``code / 254`` in float32 (the division, not a product with a
    rounded 1/254: 127 is exactly 0.5), 255 -> NaN."""
    codes = np.arange(256, dtype=np.float32) / np.float32(PROB_SCALE)
    codes[PROB_NODATA] = np.nan
    return codes


def _open_lazy(path: Path, grid: Grid, block: int, band: int = 1, *, probability: bool = False,
               like: Any = None) -> Any:
    """One band of an intermediate GeoTIFF of this run as a lazy (y, x) float32 DataArray, in chunks of
    whole tiles of the file (the multiple of its tile edge nearest to ``block``): every tile is read
    once. ``like``: take that array's chunks instead (the layers the postprocessing reads together
    must share one block layout)."""
    import dask.array as da
    import rasterio
    import xarray as xr

    from pipeline.stack.layers import StoredBand, _coords

    with rasterio.open(path) as ds:
        tile_rows, tile_cols = ds.block_shapes[band - 1]
        shape = (ds.height, ds.width)
    rows, cols = (t * max(1, round(block / t)) for t in (tile_rows, tile_cols))
    chunks: Any = (rows, cols) if like is None else like.chunks
    if shape != grid.shape:
        raise RuntimeError(f"{path}: {shape[1]} x {shape[0]} px, not the run's grid {grid.width} x {grid.height}")
    layer = StoredBand(path, band, grid, _probability_codes() if probability else None)
    arr = da.from_array(layer, chunks=chunks, asarray=False, lock=False, meta=np.empty((0, 0), np.float32),
                        name=f"stored-{path.name.strip('.')}-{band}-{uuid.uuid4().hex[:12]}")
    return xr.DataArray(arr, dims=("y", "x"), coords=_coords(grid))


# -- CLI -----------------------------------------------------------------------
def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="scene YAML file")
    parser.add_argument("--force", action="store_true", help="recompute even if outputs for this run exist")
    parser.add_argument("--save-stack", action="store_true", help="also write the stacked channels as a COG")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="override model.device")
    parser.add_argument("--scheduler", help="address of an existing Dask scheduler (overrides dask.scheduler)")


def cli_run(args: argparse.Namespace) -> int:
    cfg = load_scene_config(args.config)
    updates: dict[str, Any] = {}
    if args.save_stack:
        updates["output"] = cfg.output.model_copy(update={"save_stack": True})
    if args.device:
        updates["model"] = cfg.model.model_copy(update={"device": args.device})
    if args.scheduler:
        updates["dask"] = cfg.dask.model_copy(update={"scheduler": args.scheduler})
    if updates:
        cfg = cfg.model_copy(update=updates)
    res = run_scene(cfg, force=args.force)
    if res.status == "skipped":
        print(f"{res.scene_id}: already up to date ({res.run_dir}); nothing to do. Use --force to recompute.")
    else:
        print(f"outputs: {res.run_dir}")
        print(f"  GeoPackage: {res.geopackage}")
    print(
        f"{res.scene_id}: {res.n_polygons} landslide polygon(s), "
        f"{res.total_area_m2 / 1e4:.2f} ha, {res.seconds:.1f} s"
    )
    if cfg.reference is not None:
        from pipeline.training.evaluate import evaluate_objects

        ref = cfg.reference
        m = evaluate_objects(res.geopackage, ref.path, ref.iou, inventory_layer=ref.layer)
        print(f"against {ref.path.name} (IoU >= {ref.iou:g}): object recall {m['recall']:.2f} "
              f"({m['matched']} of {m['references']} references found), precision {m['precision']:.2f} "
              f"({m['matched']} of {m['detections']} detections match)")
    return 0

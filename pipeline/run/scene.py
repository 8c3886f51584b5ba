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

The run key is a fingerprint of the inputs, models and result-affecting config, so a
rerun with the same inputs does nothing and says so, and a changed run writes a new
version beside the old one (never appending to it). The run folder, its lock and what
proves a run complete are :mod:`pipeline.run.folder`'s; the values every stage reads
are resolved once into a :class:`~pipeline.run.plan.ScenePlan`.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.core import probability as probability_encoding
from pipeline.core.config import SceneConfig
from pipeline.core.errors import ModelError
from pipeline.core.probability import PROB_NODATA
from pipeline.run import folder, outputs
from pipeline.run.cluster import RunCluster, local_threads
from pipeline.run.intermediates import open_stored
from pipeline.run.memory import check_worker_memory
from pipeline.run.plan import ScenePlan, inference_block, make_plan, model_channels
from pipeline.run.summary import (
    StageTimer,
    inference_figures,
    log_processing_level,
    package_versions,
    processing_level,
)

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a scene run did: ``completed`` or ``skipped`` (already up to date), and its outputs."""

    scene_id: str
    status: str  # "completed" or "skipped"
    run_dir: Path
    geopackage: Path
    n_polygons: int
    total_area_m2: float
    seconds: float
    report: dict[str, Any] = field(default_factory=dict)


def load_models(cfg: SceneConfig, *, weights: bool = True) -> list[Any]:
    """The configured artefacts, checked as an ensemble, with their weights loaded and checked
    against the architecture; with ``weights=False`` their metadata only (``module`` is None).

    A run reads metadata only: its main process never runs a model, and PyTorch is imported by
    the workers, which load the weights from the files (with the same checks, so a bad file fails
    the run with the same error). The files' checksums identify the models in the run's
    fingerprint, and a worker refuses a file that changed since.
    """
    from pipeline.model.artefact import load_artefact, read_metadata
    from pipeline.model.ensemble import check_ensemble

    for path in cfg.model.paths:
        if not path.is_file():
            raise ModelError(f"{cfg.source}: model.path: model artefact not found: {path}")
    models = [load_artefact(p) if weights else read_metadata(p) for p in cfg.model.paths]
    check_ensemble(models, cfg.model.weights)
    return models


def run_scene(cfg: SceneConfig, *, force: bool = False, client: Any = None) -> RunResult:
    """Run all stages for one scene; skip if the same run already completed."""
    from pipeline.run.fingerprint import run_fingerprint
    from pipeline.stack.layers import stack_scene

    t_start = time.perf_counter()
    timer = StageTimer()
    folder.ensure_writable_dir(cfg.output.dir, field="output.dir", source=cfg.source)
    with timer("load-models"):
        models = load_models(cfg, weights=False)
    key = run_fingerprint(cfg, [m.sha256 for m in models])
    with timer("stack-graph"):
        # stack chunks = inference blocks (the blocks read through stack.reader: their chunk and the
        # strips of their neighbours that their windows reach, in one call)
        block = inference_block(cfg, models)
        stack_cfg = cfg.model_copy(update={"grid": cfg.grid.model_copy(update={"block_size": block})})
        stack = stack_scene(stack_cfg, model_channels(models))
    level = processing_level(models, stack.product, cfg.scene.level)
    log_processing_level(level)
    plan = make_plan(cfg, models, key, stack, level["scene"])
    if client is None and not cfg.dask.scheduler:  # a local cluster this run starts: refuse early
        block = (min(plan.block, plan.grid.height), min(plan.block, plan.grid.width))
        check_worker_memory(cfg.dask, block, len(model_channels(models)), local_threads(cfg.dask))
    folder.make_run_dir(plan.run_dir)
    with ExitStack() as resources:
        # held until everything below has ended (the cluster closed): first in, last out
        locked = resources.enter_context(folder.run_folder_lock(plan.run_dir))
        if locked:
            folder.remove_leftovers(plan.run_dir)
        if not force and (done := _completed(plan, t_start)) is not None:
            return done
        folder.forget_report(plan.run_dir)
        cluster = RunCluster.for_run(cfg, client, models, resources, timer)
        resources.callback(cluster.release)  # before the cluster closes
        result = _run_stages(plan, stack, timer, t_start, cluster)
        if locked:
            folder.remove_leftovers(plan.run_dir)
        return result


def _completed(plan: ScenePlan, t_start: float) -> RunResult | None:
    """The result of the same run when it completed and its outputs are intact; logs why not."""
    report, problems = folder.verify_run(plan.run_dir, plan.gpkg_path)
    if report is None:
        if problems:
            log.warning("run folder %s: %s; redoing the run", plan.run_dir, "; ".join(problems))
        return None
    log.info("outputs for this scene, model and config already exist in %s; nothing to do "
             "(use --force to recompute)", plan.run_dir)
    if not (plan.run_dir / folder.REPORT_HTML).is_file():
        _write_page(plan.run_dir, report)
    return RunResult(plan.scene_id, "skipped", plan.run_dir, plan.gpkg_path, int(report["counts"]["polygons"]),
                     float(report["counts"]["total_area_m2"]), time.perf_counter() - t_start, report)


@dataclass
class _Inferred:
    """What the inference stage leaves for the later stages: the intermediate rasters on disk and
    what was computed from their blocks as they were stored."""

    probability: Path
    uncertainty: Path | None
    layers: Path | None
    opened: Any  # the thresholded, opened and closed mask (bit-packed blocks, unpacked lazily)
    n_valid: int
    summaries: Any  # per-block object and background summaries for the size and hole steps
    true_colour: Any  # the quicklook's true colour on its coarse grid, or None
    figures: Any = None  # seconds -> the report's "inference" figures


def _run_stages(plan: ScenePlan, stack: Any, timer: StageTimer, t_start: float, cluster: RunCluster) -> RunResult:
    """Infer, postprocess, write and report, with the run folder held."""
    run_id = f"{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"
    if not cluster.starting:
        cluster.wait(timer)  # a given or connected client: everything below computes on it
    if plan.cfg.output.save_stack:
        from pipeline.stack.layers import save_stack

        cluster.wait(timer)
        with timer("save-stack"):
            save_stack(stack, plan.run_dir / "stack.tif")
    # intermediates (hidden, fixed names): a rerun after a crash replaces them
    prob_path = plan.run_dir / ".probability.tif"
    layers_path = plan.run_dir / ".layers.tif" if plan.keep else None
    try:
        inferred = _infer(plan, stack, timer, cluster, prob_path, layers_path)
        gdf = _postprocess_and_write(plan, stack, inferred, timer, run_id)
        return _complete(plan, stack, inferred, gdf, timer, t_start, run_id)
    finally:
        prob_path.unlink(missing_ok=True)
        if layers_path is not None:
            layers_path.unlink(missing_ok=True)


def _infer(plan: ScenePlan, stack: Any, timer: StageTimer, cluster: RunCluster, prob_path: Path,
           layers_path: Path | None) -> _Inferred:
    """The inference stage: the probability (uint8 codes) and the kept layers as plain tiled
    intermediates, and, from the same blocks in the same computation, the postprocessing's first,
    local step (threshold, opening, closing), the summaries its size and hole steps start from and
    the count of valid pixels. A local cluster may still be starting while the graphs are built:
    the run waits for it right before it computes."""
    import dask

    from pipeline.core.progress import before_first_compute
    from pipeline.inference.options import InferenceOptions
    from pipeline.inference.tiled import predict
    from pipeline.inference.write import write_prediction
    from pipeline.run.gpus import GPU_RESOURCE
    from postprocess.areas import OpenedSummaries
    from postprocess.packed_mask import unpack_mask

    grid, post = plan.grid, plan.cfg.postprocess
    # a GPU run's inference tasks (read, predict, blend, store) go to the GPU workers only
    on_gpu = dask.annotate(resources={GPU_RESOURCE: 1}) if cluster.gpu else nullcontext()
    with timer("infer"), before_first_compute(lambda: cluster.wait(timer)), on_gpu:
        options = InferenceOptions.from_config(plan.cfg.model, block_size=plan.block)
        # the mask without the bands' own no-data: each block derives that from the pixels it reads;
        # the quicklook's true colour is averaged onto its coarse grid by the blocks that read it
        pred = predict(stack.data, stack.mask, grid, list(plan.models), options, keep=list(plan.keep),
                       level=plan.level, reader=stack.reader,
                       coarse=outputs.quicklook_coarse(grid) if plan.cfg.output.quicklook else None)
        unc_path = plan.run_dir / "uncertainty.tif" if pred.uncertainty is not None else None
        chunks = pred.probability.data.chunks

        def first_step(codes: Any) -> list[Any]:
            from postprocess.areas import opened_summaries
            from postprocess.morphology import opened_mask
            from postprocess.packed_mask import pack_mask

            known = codes != PROB_NODATA
            prob = codes.map_blocks(probability_encoding.decode, dtype=np.float32)
            opened = opened_mask(prob, known, grid, post, plan.threshold)
            coarse = [pred.coarse] if pred.coarse is not None else []
            return [pack_mask(opened), known.sum(), opened_summaries(opened, known), *coarse]

        _, (packed, n_valid, summaries, *coarse) = write_prediction(
            pred, prob_path, uncertainty_path=unc_path, layers_path=layers_path, dtype="uint8",
            probability_cog=False, also=first_step)
    client = cluster.wait(timer)
    return _Inferred(prob_path, unc_path, layers_path, unpack_mask(packed, chunks), int(n_valid),
                     OpenedSummaries.collect(chunks, summaries), coarse[0] if coarse else None,
                     lambda seconds: inference_figures(client, pred, seconds, own=cluster.own))


def _stored_layers(plan: ScenePlan, stack: Any, inferred: _Inferred) -> tuple[Any, Any, dict[str, Any]]:
    """The probability, the uncertainty and the attribute layers, read back lazily: the model ran
    once, the later stages read blocks from disk."""
    grid, block = plan.grid, plan.cfg.grid.block_size
    probability = open_stored(inferred.probability, grid, block, probability=True)
    uncertainty = open_stored(inferred.uncertainty, grid, block, like=probability) if inferred.uncertainty else None
    layers = {name: open_stored(inferred.layers, grid, block, band=i + 1, like=probability)
              for i, name in enumerate(plan.keep)} if inferred.layers else {}
    rest = [c for c in plan.wanted if c not in layers]
    if rest:
        from pipeline.stack import layers as stacking

        layers.update(stacking.aux_layers(plan.cfg, stack, rest))
    return probability, uncertainty, layers


def _postprocess_and_write(plan: ScenePlan, stack: Any, inferred: _Inferred, timer: StageTimer,
                           run_id: str) -> Any:
    """Clean the mask, build the polygons, write the GeoPackage, the rasters and the quicklook.

    This process mostly waits for the workers here: it makes the probability COG and reads the
    quicklook's background while the postprocessing runs, and the workers compute the mask raster
    while this process builds and merges the polygons. Returns the polygons."""
    from pipeline.io.cog import cog_from_tiff, write_cog
    from postprocess.gpkg import write_geopackage
    from postprocess.raster_style import write_raster_styles

    cfg, grid, run_dir = plan.cfg, plan.grid, plan.run_dir
    probability, uncertainty, layers = _stored_layers(plan, stack, inferred)
    pool = ThreadPoolExecutor(4, thread_name_prefix="outputs")
    jobs: dict[str, Any] = {}
    if cfg.output.probability_cog:
        jobs["probability"] = outputs.submit(
            pool, cog_from_tiff, inferred.probability, run_dir / "probability.tif",
            band_descriptions=["landslide probability x 254 (255 = no data)"],
            band_tags=[{"threshold": str(plan.threshold)}])

    def start_mask_outputs(cleaned: Any) -> None:
        if cfg.output.mask_cog:
            jobs["mask"] = outputs.submit(pool, write_cog, cleaned.astype("uint8"), grid, run_dir / "mask.tif",
                                          graph_first=True, dtype="uint8", nodata=255)

    # the mask's graphs may still be sent from the pool's threads until it has shut down
    with outputs.mask_in_graphs(grid):
        try:
            background = (outputs.submit(pool, outputs.quicklook_background, cfg, grid, inferred.probability,
                                         inferred.true_colour) if cfg.output.quicklook else None)
            with timer("postprocess"):
                gdf = _polygons(plan, stack, probability, uncertainty, layers, inferred, run_id, start_mask_outputs)
            with timer("write"):
                if background is not None:
                    # drawn and encoded in an output thread while this one writes the GeoPackage
                    jobs["quicklook"] = outputs.submit_now(pool, outputs.write_quicklook, background, grid, gdf,
                                                           run_dir / "quicklook.png")
                write_geopackage(gdf, plan.gpkg_path, layer="landslides", metadata=_gpkg_metadata(plan, run_id),
                                 crs=cfg.output.crs)
                for name in ("quicklook", "mask", "probability"):
                    if name in jobs:
                        jobs[name].result()
                # QGIS styles beside probability.tif and uncertainty.tif (outputs, checksummed below)
                write_raster_styles(run_dir, plan.threshold)
        finally:
            # on an error, what has not started does not start (what runs finishes: its output is atomic)
            pool.shutdown(wait=True, cancel_futures=True)
    return gdf


def _polygons(plan: ScenePlan, stack: Any, probability: Any, uncertainty: Any, layers: dict[str, Any],
              inferred: _Inferred, run_id: str, on_mask: Any) -> Any:
    """The postprocessing: the cleaned mask's polygons with their attributes."""
    from postprocess.objects import ObjectLayers, OpenedMask
    from postprocess.polygons import RunHandover, polygons_from_probability

    context = {
        "scene_id": stack.scene_id,
        "acq_date": stack.acquisition_date.isoformat() if stack.acquisition_date else None,
        **plan.context,
        "run_id": run_id,
    }
    # the probability is NaN exactly where the input was not valid: the mask comes from it
    gdf, _cleaned = polygons_from_probability(
        probability, ~probability.isnull(), plan.grid, plan.cfg.postprocess,
        threshold=plan.threshold, context=context,
        layers=ObjectLayers(slope=layers.get("SLOPE"), dem=layers.get("DEM"), red=layers.get("B04"),
                            nir=layers.get("B08"), green=layers.get("B03"), uncertainty=uncertainty),
        handover=RunHandover(opened=OpenedMask(inferred.opened, inferred.summaries),
                             on_mask=on_mask),  # on_mask: in the probability's chunks
    )
    return gdf


def _gpkg_metadata(plan: ScenePlan, run_id: str) -> dict[str, Any]:
    """The GeoPackage's metadata: what made it."""
    return {
        "run_id": run_id, "run_key": plan.key, "scene_id": plan.scene_id, "model": plan.context["model_name"],
        "model_sha256": plan.context["model_sha256"], "threshold": plan.threshold, "grid": plan.grid.to_dict(),
        "config": str(plan.cfg.source), "pipeline_version": __version__,
    }


def _complete(plan: ScenePlan, stack: Any, inferred: _Inferred, gdf: Any, timer: StageTimer, t_start: float,
              run_id: str) -> RunResult:
    """Checksum the outputs, write ``report.json`` (last: it marks the run complete) and ``LATEST``."""
    total_area = float(gdf["area_m2"].sum()) if len(gdf) else 0.0
    with timer("checksums"):  # of the files in place: a rerun checks them before it skips
        files = folder.output_files(plan.run_dir)
    seconds = time.perf_counter() - t_start
    if inferred.n_valid == 0:
        log.warning("scene %s has no valid pixels (cloud, no data or outside the DEM): the GeoPackage is empty",
                    stack.scene_id)
    cfg = plan.cfg
    report = {
        "status": "completed",
        "run_id": run_id,
        "run_key": plan.key,
        "scene_id": stack.scene_id,
        "acquisition_date": stack.acquisition_date.isoformat() if stack.acquisition_date else None,
        "config": str(cfg.source),
        "config_resolved": cfg.model_dump(mode="json"),
        "models": [{"name": m.name, "path": str(p), "sha256": m.sha256, "threshold": m.threshold}
                   for m, p in zip(plan.models, cfg.model.paths, strict=True)],
        "grid": plan.grid.to_dict(),
        "processing_level": processing_level(list(plan.models), stack.product, cfg.scene.level),
        "input_checksums": stack.checksums.as_dict() if stack.checksums is not None else None,
        "timings_s": {**timer.seconds, "total": round(seconds, 3)},
        "inference": inferred.figures(seconds),
        "counts": {
            "polygons": len(gdf),
            "total_area_m2": total_area,
            "valid_pixels": inferred.n_valid,
            "valid_area_m2": inferred.n_valid * plan.grid.pixel_area,
        },
        "outputs": sorted([*files, folder.REPORT_HTML, folder.REPORT]),
        "output_files": files,
        "versions": package_versions(),
        "finished": dt.datetime.now(dt.UTC).isoformat(),
    }
    _write_page(plan.run_dir, report)
    folder.write_json_atomic(plan.run_dir / folder.REPORT, report)
    folder.mark_latest(plan.run_dir)
    return RunResult(stack.scene_id, "completed", plan.run_dir, plan.gpkg_path, len(gdf), total_area, seconds,
                     report)


def _write_page(run_dir: Path, report: dict[str, Any]) -> None:
    """The run's HTML map report (a view of the outputs: a failure to draw it is a warning, not a
    failed run; the next rerun draws it again)."""
    from pipeline.report.scene import write_html_report

    try:
        path = write_html_report(run_dir, report)
    except Exception as exc:  # noqa: BLE001 - the outputs themselves are complete
        log.warning("could not write the HTML report in %s: %s", run_dir, exc)
    else:
        log.info("HTML report: %s", path)

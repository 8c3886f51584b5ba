"""The run's summary for report.json: stage timings, the processing level check, inference figures, versions."""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from pipeline import __version__

log = logging.getLogger(__name__)


class StageTimer:
    """Wall time per stage, logged as it goes. A worker that dies in a stage (Dask's
    ``KilledWorker``) is reported as a :class:`~pipeline.core.progress.WorkerDeathError` naming
    the stage, the task and what to try, whatever computed it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        from pipeline.core.progress import worker_deaths_explained

        log.info("stage %s ...", name)
        t0 = time.perf_counter()
        try:
            with worker_deaths_explained(name):
                yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)
            log.info("stage %s done in %.1f s", name, self.seconds[name])


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"pipeline": __version__, "python": platform.python_version()}
    for name in ("numpy", "rasterio", "xarray", "rioxarray", "dask", "distributed", "torch",
                 "segmentation-models-pytorch", "geopandas", "shapely", "pyogrio"):
        with suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    import rasterio

    out["gdal"] = rasterio.__gdal_version__
    return out


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


def inference_figures(client: Any, pred: Any, seconds: float, *, own: bool) -> dict[str, Any]:
    """Windows, worker threads and the time the workers spent in the model's forward pass, that
    time's share of all worker-thread time of the run (``seconds`` of wall time), the precision the
    workers ran and how many chunks they redid in fp32 after a non-finite output.

    The share only when the cluster is the run's ``own``: the threads of a shared scheduler also
    work for others, and the number of them can change during the run.
    """
    from pipeline.inference.tiled import forward_seconds, precision_figures

    figures: dict[str, Any] = {"windows": pred.windows, "worker_threads": None,
                               "model_forward_seconds": None, "model_forward_share": None,
                               "precision": pred.precision, "chunks_redone_fp32": None}
    try:
        threads = int(sum(client.nthreads().values()))
    except Exception:  # noqa: BLE001 - figures for the report only
        return figures
    forward = forward_seconds(client, pred, flush=True)
    figures.update(precision_figures(client, pred))  # after the flush above
    figures["worker_threads"] = threads
    if forward is not None:
        figures["model_forward_seconds"] = round(forward, 3)
    if forward is not None and own and threads and seconds > 0:
        figures["model_forward_share"] = round(forward / (threads * seconds), 4)
        log.info("model forward pass: %.1f s on %d worker thread(s), %.0f %% of the run's worker-thread time",
                 forward, threads, 100 * forward / (threads * seconds))
    return figures



"""What the workers recorded about a prediction's forward passes: seconds and precision.

The block tasks report to Dask's performance metrics under the prediction's label
(:attr:`pipeline.inference.options.Prediction.meter`); these functions read them back from the
scheduler for the run's report.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.inference.options import Prediction

log = logging.getLogger(__name__)


async def _send_heartbeat(dask_worker: Any) -> None:  # runs on each worker
    await dask_worker.heartbeat()


def forward_seconds(client: Any, prediction: Prediction, *, flush: bool = False) -> float | None:
    """Seconds the workers of ``client`` spent in the model's forward pass for ``prediction``
    (summed over worker threads: with two threads fully busy, 2 s per second of wall time), from
    Dask's performance metrics; None when the scheduler has no record of it.

    Workers send their metrics with their heartbeats: read this when the prediction has been
    computed for a while (the run does it at its very end). ``flush`` asks every worker for a
    heartbeat first, so that the last tasks count as well.
    """
    metrics = _forward_metrics(client, prediction.meter, flush)
    return float(metrics["seconds"]) if metrics and "seconds" in metrics else None


def precision_figures(client: Any, prediction: Prediction, *, flush: bool = False) -> dict[str, Any]:
    """What the workers of ``client`` ran ``prediction``'s models in, for the run's report:
    ``precision`` (``bf16``, ``fp16``, ``fp32``; several joined by ``+`` when workers differed) and
    ``chunks_redone_fp32`` (chunks whose outputs overflowed and were redone in float32), from Dask's
    performance metrics (:mod:`pipeline.inference.forward`). Without a record of them:
    :attr:`Prediction.precision` and None. ``flush`` as for :func:`forward_seconds`.
    """
    from pipeline.inference.forward import REDONE_UNIT, SAMPLES_UNIT

    metrics = _forward_metrics(client, prediction.meter, flush) or {}
    used = sorted(u[len(SAMPLES_UNIT):] for u, n in metrics.items() if u.startswith(SAMPLES_UNIT) and n > 0)
    if not used:
        return {"precision": prediction.precision, "chunks_redone_fp32": None}
    return {"precision": "+".join(used), "chunks_redone_fp32": int(metrics.get(REDONE_UNIT, 0))}


def _forward_metrics(client: Any, label: str, flush: bool) -> dict[str, float] | None:
    """The workers' metrics recorded under ``label``, summed per unit; None when unavailable."""

    def collect(dask_scheduler: Any) -> dict[str, float]:  # runs on the scheduler
        out: dict[str, float] = {}
        for k, v in dask_scheduler.cumulative_worker_metrics.items():
            if isinstance(k, tuple) and len(k) == 4 and k[2] == label and isinstance(k[3], str):
                out[k[3]] = out.get(k[3], 0.0) + float(v)
        return out

    try:
        if flush:
            client.run(_send_heartbeat)
        return client.run_on_scheduler(collect)
    except Exception as exc:  # noqa: BLE001 - figures for the report, never a reason to fail a run
        log.debug("no forward-pass metrics from the scheduler: %s", exc)
        return None

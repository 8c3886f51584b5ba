"""The forward pass of a batch of windows on the runtime's device, and what guards it.

:func:`forward_probs` uploads the windows once (from pinned memory on CUDA, without blocking),
applies the test-time augmentations on the device, runs the model in chunks of the batch limit
(the last chunk padded to the limit on CUDA: every forward pass has the same shape), takes the
sigmoid there and undoes the augmentations: (T, B, H, W) probabilities on the device. On the CPU
these are the same operations in the same order as a host-only pass, so the results are the same
bit for bit. :func:`combine_on_device` averages the augmentations, combines ensemble members and
computes the spread on the device, so that only (B, H, W) results come back to the host.

Reduced precision cannot punch holes in the map. Logits that are not finite at a valid pixel
under fp16/bf16 autocast (an overflow) send that chunk through the model again in float32: the
worker logs a warning the first time (and at 10, 100, ... chunks, with the count), and the count
goes to Dask's performance metrics with the prediction's label (unit :data:`REDONE_UNIT`), next
to the samples run in each precision (unit ``samples-<precision>``), so that the run can record
them (:func:`precision_figures`, and the forward time: :func:`forward_seconds`). Non-finite
logits in float32 are a :class:`~pipeline.core.errors.ModelError` naming the model.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.errors import ModelError
from pipeline.inference.options import TTA_TRANSFORMS

if TYPE_CHECKING:
    import torch

    from pipeline.inference.options import Prediction
    from pipeline.inference.runtime import Runtime
    from pipeline.model.device import Precision

log = logging.getLogger(__name__)

#: Unit of the metric that counts chunks redone in float32 (value 1 per chunk).
REDONE_UNIT = "chunks-redone-fp32"
#: Prefix of the metrics that count the samples (windows times augmentations) run in a precision.
SAMPLES_UNIT = "samples-"

_REDONE_LOCK = threading.Lock()
_REDONE: dict[str, int] = {"chunks": 0}


def forward_probs(module: torch.nn.Module, x: np.ndarray, rt: Runtime, transforms: Sequence[str],
                  meter: str = "model-forward", valid: np.ndarray | None = None,
                  name: str = "model") -> torch.Tensor:
    """Probabilities (T, B, H, W), on the runtime's device, of ``module`` (called ``name`` in
    errors) on normalized windows ``x`` (B, C, H, W) for each transform; ``valid`` (B, H, W):
    the pixels whose logits must be finite (None: all).

    The time spent here (each chunk's finiteness check waits for that chunk) goes to Dask's
    performance metrics under ``meter`` when this runs in a Dask worker (a no-op elsewhere).
    """
    import torch
    from distributed.metrics import context_meter

    from pipeline.model.device import pads_batches, run_batched, upload

    with context_meter.meter(meter):
        xd = upload(x, rt.device)
        vd = (torch.ones((x.shape[0], *x.shape[2:]), dtype=torch.bool, device=rt.device) if valid is None
              else upload(np.ascontiguousarray(valid, dtype=bool), rt.device))
        batch, vbatch = _augmented(xd, transforms), _augmented(vd, transforms)
        guard = FiniteGuard(module, rt, name, meter)
        probs = run_batched(guard, (batch, vbatch), rt.limit, pad=pads_batches(rt.device))
        n = x.shape[0]
        out = torch.stack([TTA_TRANSFORMS[t][1](probs[i * n : (i + 1) * n]) for i, t in enumerate(transforms)])
    context_meter.digest_metric(meter, int(batch.shape[0]), SAMPLES_UNIT + rt.precision)
    return out


def _augmented(t: torch.Tensor, transforms: Sequence[str]) -> torch.Tensor:
    """``t`` (..., H, W) under each transform, concatenated along the first dimension."""
    import torch

    if len(transforms) == 1 and transforms[0] == "identity":
        return t
    return torch.cat([TTA_TRANSFORMS[name][0](t) for name in transforms], dim=0)


class FiniteGuard:
    """The function :func:`~pipeline.model.device.run_batched` applies to each chunk: the
    probabilities (b, H, W) of ``module`` on a chunk (b, C, H, W), run again in float32 when its
    logits are not finite at a valid pixel (valid: (b, H, W) bool)."""

    def __init__(self, module: torch.nn.Module, rt: Runtime, name: str, meter: str) -> None:
        self.module, self.rt, self.name, self.meter = module, rt, name, meter

    def __call__(self, chunk: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        import torch

        precision = self.rt.precision
        logits = model_logits(self.module, chunk, self.rt, precision)
        if not _finite_where(logits, valid):
            if precision == "fp32":
                raise ModelError(f"model {self.name} gave non-finite outputs (NaN or infinity) in float32 on valid "
                                 "pixels: the model or its input normalization is broken")
            logits = model_logits(self.module, chunk, self.rt, "fp32")
            if not _finite_where(logits, valid):
                raise ModelError(f"model {self.name} gave non-finite outputs (NaN or infinity) on valid pixels, "
                                 f"in {precision} and again in float32: the model or its input normalization is broken")
            note_redone(self.name, precision, int(chunk.shape[0]), self.meter)
        return torch.sigmoid(logits)


def model_logits(module: torch.nn.Module, chunk: torch.Tensor, rt: Runtime, precision: Precision) -> torch.Tensor:
    """float32 logits (b, H, W) of the first output channel of ``module`` on ``chunk``, with
    autocast for ``precision``."""
    import torch

    from pipeline.model.device import autocast

    if rt.channels_last:
        chunk = chunk.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(rt.device, precision):
        logits = module(chunk)
    return logits[:, 0].float()


def _finite_where(logits: torch.Tensor, valid: torch.Tensor) -> bool:
    """True when ``logits`` are finite wherever ``valid`` (same shape) is true."""
    import torch

    return not bool((~torch.isfinite(logits) & valid).any())


def note_redone(name: str, precision: str, samples: int, meter: str) -> int:
    """Count a chunk redone in float32 in this process and in the metrics; warn the first time and
    at 10, 100, ... chunks. Returns this process's count."""
    from distributed.metrics import context_meter

    context_meter.digest_metric(meter, 1, REDONE_UNIT)
    with _REDONE_LOCK:
        _REDONE["chunks"] += 1
        count = _REDONE["chunks"]
    if count == 1 or _power_of_ten(count):
        log.warning("model %s gave non-finite outputs under %s autocast (an overflow): %d chunk(s) redone in "
                    "float32 by this worker so far (%d windows in the last); the run's report counts them all",
                    name, precision, count, samples)
    return count


def _power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


def redone_chunks() -> int:
    """Chunks this process has redone in float32 so far."""
    with _REDONE_LOCK:
        return _REDONE["chunks"]


def combines_on_host(device: torch.device) -> bool:
    """Whether augmentations and ensemble members are combined on the host (the CPU: numpy, as
    always) rather than on ``device`` (:func:`combine_on_device`)."""
    return device.type == "cpu"


def combine_on_device(per_model: list[torch.Tensor], members: list[torch.Tensor], weights: Sequence[float],
                      thresholds: Sequence[float], method: str,
                      with_uncertainty: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ensemble probability (B, H, W) of the models' probabilities ``per_model`` and, with
    uncertainty, the standard deviation over all ``members`` (each (T, B, H, W)), on their device:
    :func:`pipeline.model.ensemble.ensemble_probability` and the host path's spread in PyTorch."""
    import torch

    if len(per_model) == 1:
        combined = per_model[0]
    else:
        p = torch.stack(per_model)
        w = torch.tensor(list(weights), dtype=torch.float32, device=p.device).reshape(-1, 1, 1, 1)
        if method == "vote":
            t = torch.tensor(list(thresholds), dtype=torch.float32, device=p.device).reshape(w.shape)
            p = (p >= t).to(torch.float32)
        combined = (p * w).sum(dim=0) / w.sum()
    unc = torch.cat(members).std(dim=0, correction=0) if with_uncertainty else None
    return combined, unc


# -- the figures the workers recorded, read back for the run's report -------------------
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

"""GPUs for the inference: which a machine offers, one local worker per GPU, GPU workers of a cluster.

Found without importing PyTorch (the main process never does). A local cluster gets one worker
process per GPU, each seeing only its own (``CUDA_VISIBLE_DEVICES``) and offering the Dask
resource ``GPU: 1``, which the inference tasks of a GPU run ask for: on an existing cluster they
only land on GPU workers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from pipeline.run.cluster import ClusterError, worker_env

#: The Dask resource a GPU worker offers and the inference tasks of a GPU run ask for.
GPU_RESOURCE = "GPU"


def visible_gpus(environ: dict[str, str] | None = None, smi: str | None = "nvidia-smi") -> list[str]:
    """The GPUs this machine gives the run, without importing PyTorch: ``CUDA_VISIBLE_DEVICES`` when
    it is set (``""`` or ``-1``: none), else the indices that ``nvidia-smi -L`` lists (none without
    an NVIDIA driver)."""
    import shutil
    import subprocess

    env = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in env:
        ids = [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
        return [] if not ids or ids[0] == "-1" else ids
    exe = shutil.which(smi) if smi else None
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def gpus_for(device: str, environ: dict[str, str] | None = None, smi: str | None = "nvidia-smi") -> list[str]:
    """The GPUs a local cluster gives one worker each for ``model.device``: every visible GPU for
    ``cuda`` (an error when there is none: the config asks for one) and ``auto``, none for ``cpu``
    and ``mps``."""
    if device not in ("cuda", "auto"):
        return []
    gpus = visible_gpus(environ, smi)
    if device == "cuda" and not gpus:
        raise ClusterError("model.device is cuda but no GPU is visible (no NVIDIA driver, or "
                           "CUDA_VISIBLE_DEVICES is empty); use model.device: auto or cpu")
    return gpus


def gpu_cluster(gpus: Sequence[str], threads: int, memory_limit: str) -> Any:
    """A local cluster of one worker process per GPU, each seeing only its GPU."""
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {
        f"gpu-{gpu}": {"cls": Nanny, "options": {
            "nthreads": threads, "memory_limit": memory_limit, "silence_logs": logging.WARNING,
            "env": {**worker_env(), "CUDA_VISIBLE_DEVICES": gpu}, "resources": {GPU_RESOURCE: 1},
        }}
        for gpu in gpus
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.WARNING)


def gpu_workers(client: Any) -> list[str]:
    """The workers of ``client``'s cluster that offer a GPU (the ``GPU`` resource)."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return [addr for addr, info in workers.items() if info.get("resources", {}).get(GPU_RESOURCE, 0) >= 1]


def uses_gpu_workers(device: str, client: Any) -> bool:
    """Whether a run's inference must go to the GPU workers of an existing cluster (``model.device``
    is ``device``): when it has some and the device is ``cuda`` or ``auto``; ``cuda`` on a cluster without one is an error (its CPU
    workers must not run it silently)."""
    if device not in ("cuda", "auto"):
        return False
    try:
        found = bool(gpu_workers(client))
    except Exception:  # noqa: BLE001 - a client without scheduler info (a test double)
        found = False
    if device == "cuda" and not found:
        raise ClusterError("model.device is cuda but no worker of the Dask cluster offers a GPU (start GPU "
                           "workers with --resources GPU=1), or set model.device: auto or cpu")
    return found

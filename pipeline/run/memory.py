"""Worker memory: refuse a run early when a worker's memory limit cannot hold its blocks.

A worker holds, per thread, at least one inference block of every channel the models read
(float32, with the strips its windows reach), on top of a fixed base (PyTorch, the model, Dask).
A limit below that lower bound can only end with workers killed by their nanny half-way through
the run; the run stops before anything starts instead, naming the settings to change.
"""

from __future__ import annotations

from pipeline.core.config import DaskSection
from pipeline.core.errors import ConfigError

#: Resident memory of a worker process with PyTorch, the model and the task modules imported, before
#: any block: a lower bound (measured about 0.45 GB on Linux for the shipped model).
WORKER_BASE_BYTES = 400 * 1024**2


def worker_limit_bytes(section: DaskSection) -> int | None:
    """The per-worker memory limit set in ``dask.memory_limit`` in bytes; None for ``auto`` or no limit."""
    from dask.utils import parse_bytes

    text = str(section.memory_limit).strip().lower()
    if text in ("auto", "", "none", "0"):
        return None
    try:
        value = float(text)
    except ValueError:
        return int(parse_bytes(text))
    if 0 < value <= 1:  # a fraction of the machine's memory, as Dask reads it
        from distributed.system import MEMORY_LIMIT

        return int(value * MEMORY_LIMIT)
    return int(value)


def lower_bound_bytes(block: tuple[int, int], channels: int, threads: int) -> int:
    """The least a worker needs: its base and, per thread, one float32 block (rows, cols) of every channel."""
    return WORKER_BASE_BYTES + threads * block[0] * block[1] * channels * 4


def check_worker_memory(section: DaskSection, block: tuple[int, int], channels: int, threads: int) -> None:
    """Raise a :class:`ConfigError` naming the settings when ``dask.memory_limit`` is below the lower
    bound for blocks of ``block`` (rows, cols: the inference block, or the scene when it is smaller)."""
    limit = worker_limit_bytes(section)
    if limit is None:
        return
    need = lower_bound_bytes(block, channels, threads)
    if limit < need:
        raise ConfigError(
            f"dask.memory_limit: {section.memory_limit} per worker cannot hold {threads} block(s) of "
            f"{block[1]} x {block[0]} px x {channels} channels (at least {need / 1024**2:,.0f} MiB with the worker's "
            "own memory): its workers would be killed half-way through the run. Raise dask.memory_limit, or "
            "lower grid.block_size or dask.threads_per_worker"
        )

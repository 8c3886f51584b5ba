"""Dask cluster handling: a local cluster by default, an existing scheduler when configured.

Stages build lazy Dask graphs; this module decides where they run. A local
cluster uses worker *processes* (GDAL handles and PyTorch models are per
process), each worker loads a model once and keeps it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from .config import DaskSection
from .errors import PipelineError

log = logging.getLogger(__name__)


class ClusterError(PipelineError, ConnectionError):
    """The configured Dask scheduler cannot be reached."""


def _worker_env() -> dict[str, str]:
    # One BLAS/OpenMP thread per Dask thread: oversubscription costs more than it gives.
    return {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


#: Set by Dask's nanny in every worker by default (to hand freed memory back to the system early).
#: Any fixed value turns off glibc's adaptive mmap threshold, so each large tensor of a forward pass
#: is a fresh mmap that page-faults in: the model ran 1.6x slower in such a worker (35 against
#: 22 ms per 128 px window for the default model, one thread). Local workers start without it.
MALLOC_TRIM = "MALLOC_TRIM_THRESHOLD_"


@contextmanager
def _without_malloc_trim() -> Iterator[None]:
    import dask

    inherited = os.environ.pop(MALLOC_TRIM, None)  # a worker started before may have left it here
    try:
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{MALLOC_TRIM}": None}):
            yield
    finally:
        if inherited is not None:
            os.environ[MALLOC_TRIM] = inherited


def _quiet_distributed() -> None:
    """Distributed logs every connection at INFO; keep its chatter out of run logs unless -v."""
    level = logging.DEBUG if logging.getLogger().level <= logging.DEBUG else logging.WARNING
    for name in list(logging.root.manager.loggerDict):
        if name == "distributed" or name.startswith("distributed."):
            logging.getLogger(name).setLevel(level)


@contextmanager
def dask_client(section: DaskSection) -> Iterator[object]:
    """Yield a ``distributed.Client`` for ``section``; closes what it started."""
    from distributed import Client, LocalCluster

    _quiet_distributed()

    if section.scheduler:
        log.info("connecting to Dask scheduler at %s", section.scheduler)
        try:
            client = Client(section.scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"cannot reach the Dask scheduler at {section.scheduler} (dask.scheduler in the config): {exc}"
            ) from None
        try:
            yield client
        finally:
            client.close()
        return

    threads = section.threads_per_worker or max(1, (os.cpu_count() or 1) // section.n_workers)
    with _without_malloc_trim():
        cluster = LocalCluster(
            n_workers=section.n_workers,
            threads_per_worker=threads,
            processes=True,
            memory_limit=section.memory_limit,
            dashboard_address=None,
            env=_worker_env(),
            silence_logs=logging.WARNING,
        )
    client = Client(cluster)
    log.info("started a local Dask cluster: %d worker process(es) x %d thread(s)", section.n_workers, threads)
    try:
        yield client
    finally:
        client.close()
        cluster.close()

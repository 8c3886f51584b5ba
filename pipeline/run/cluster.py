"""Dask cluster handling: a local cluster by default, an existing scheduler when configured.

Stages build lazy Dask graphs; this module decides where they run. A local
cluster uses worker *processes* (GDAL handles and PyTorch models are per
process), each worker loads a model once and keeps it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from pipeline.core.config import DaskSection
from pipeline.core.errors import PipelineError

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


#: Dask settings of the local workers this package starts (their nanny hands them the settings of
#: this process): no statistical profiler. It samples every thread's Python stack every 10 ms in the
#: worker's event loop, holding the GIL: with two threads running the model, that loop took 7 of
#: the 106 CPU-seconds of a 4098 px scene's inference (the scheduler, in this process, 5 more) and
#: the task threads spent 13 % of their time off the CPU. The profile is a dashboard view for
#: interactive work; a batch run does not use it.
LOCAL_WORKER_CONFIG: dict[str, object] = {"distributed.worker.profile.enabled": False}


@contextmanager
def _without_malloc_trim() -> Iterator[None]:
    import dask

    inherited = os.environ.pop(MALLOC_TRIM, None)  # a worker started before may have left it here
    try:
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{MALLOC_TRIM}": None, **LOCAL_WORKER_CONFIG}):
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


#: Modules the block tasks need. A fresh worker imports PyTorch, the model library and the
#: postprocessing libraries (about 8 s of one core) when it unpickles its first task that needs them;
#: that import held up both worker threads at the start of the inference stage. Local workers import
#: them in a task of their own as they start, and the cluster is handed out once they have (a run
#: starts its cluster in the background while its main process, which never imports PyTorch,
#: samples the scene statistics). Tasks must not arrive during those imports: a task unpickled
#: while the import task is half-way through rasterio's (circular) Cython modules can fail with
#: ``ImportError: cannot import name guard_transform``.
WORKER_IMPORTS = ("pipeline.model.registry", "pipeline.model.device", "pipeline.inference.tiled", "postprocess.morphology",
                  "postprocess.vectorize")


#: Seconds a new local cluster waits for its workers' imports before it is handed out anyway.
WARM_TIMEOUT = 180.0


def _prepare_worker(names: tuple[str, ...]) -> list[str]:
    """Import ``names`` in this worker and let the process skip the interpreter's teardown when the
    worker has closed (runs in each worker of a local cluster)."""
    import importlib

    imported = [importlib.import_module(name).__name__ for name in names]
    _exit_fast_after_close()
    return imported


def _exit_fast_after_close() -> None:
    """Once this worker has closed cleanly, end its process at exit without tearing the interpreter
    down.

    With PyTorch and torchvision loaded, a Python process takes 2-3 s to exit after its last line
    (their native libraries' teardown), and longer after a large run: the nanny gave up after 4 s,
    logged "Worker process still alive after 4.0 seconds, killing" and killed it, at the end of
    every full-tile run. By then every task has finished and every file is closed (the run's outputs
    are complete before its cluster closes), so nothing is lost: logs are flushed, then
    ``os._exit(0)``. Only then: the worker closed and the process exits with status 0 (a spawned
    worker process ends with ``sys.exit(code)``, recorded here). Any other exit, an error's
    included, takes the normal path with its own status.
    """
    import atexit
    import sys
    import weakref

    from distributed import get_worker
    from distributed.core import Status

    worker = weakref.ref(get_worker())
    codes: list[object] = []
    system_exit = sys.exit

    def recording_exit(code: object = None) -> None:
        codes.append(code)
        system_exit(code)

    sys.exit = recording_exit

    def exit_now() -> None:
        w = worker()
        if w is None or w.status != Status.closed or codes[-1:] not in ([0], [None]):
            return
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(0)

    atexit.register(exit_now)


def _warm_workers(client: object, names: Sequence[str] = WORKER_IMPORTS) -> list[object]:
    """Start importing ``names`` on every worker of a new local cluster; returns the futures
    (:func:`dask_client` waits for them before handing the cluster out). An import that fails here
    fails again, with its message, in the first task that needs it.
    """
    workers = list(client.scheduler_info()["workers"])  # type: ignore[attr-defined]
    return [
        # a preference, not a restriction: if that worker is gone, another one imports (harmlessly)
        client.submit(_prepare_worker, tuple(names), workers=[w], allow_other_workers=True,  # type: ignore[attr-defined]
                      pure=False, key=f"warm-imports-{i}")
        for i, w in enumerate(workers)
    ]


def _settle(client: object, futures: list[object], timeout: float = 30.0) -> None:
    """Let the import tasks finish (before any other task is sent, and before the cluster closes:
    a worker killed in the middle of an import logs a cancelled task and takes seconds to stop);
    their errors do not matter here, and after ``timeout`` they are cancelled."""
    from distributed import wait

    if not futures:
        return
    try:
        wait(futures, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - closing anyway
        log.debug("worker imports did not finish before the cluster closed: %s", exc)
        with contextlib.suppress(Exception):
            client.cancel(futures)  # type: ignore[attr-defined]
    futures.clear()


@contextmanager
def dask_client(section: DaskSection, imports: Sequence[str] = ()) -> Iterator[object]:
    """Yield a ``distributed.Client`` for ``section``; closes what it started. The workers of a local
    cluster have imported :data:`WORKER_IMPORTS` and ``imports`` (for example the model library
    that the run's models need) when it is handed out."""
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
            # this machine only, any free port: never "port 8787 is in use" beside another cluster
            dashboard_address="127.0.0.1:0",
            env=_worker_env(),
            silence_logs=logging.WARNING,
        )
    try:
        client = Client(cluster)
    except BaseException:
        cluster.close()
        raise
    log.info("started a local Dask cluster: %d worker process(es) x %d thread(s)", section.n_workers, threads)
    warming: list[object] = []
    try:
        t0 = time.perf_counter()
        warming = _warm_workers(client, (*WORKER_IMPORTS, *imports))
        _settle(client, warming, timeout=WARM_TIMEOUT)
        log.debug("workers ready (imports done) %.1f s after the cluster started", time.perf_counter() - t0)
        yield client
    finally:
        try:
            _settle(client, warming)
        finally:
            client.close()
            cluster.close()

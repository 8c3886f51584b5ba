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
from contextlib import ExitStack, contextmanager
from typing import Any

from pipeline.core.config import DaskSection
from pipeline.core.errors import PipelineError

log = logging.getLogger(__name__)


class ClusterError(PipelineError, ConnectionError):
    """The configured Dask scheduler cannot be reached."""


def worker_env() -> dict[str, str]:
    # One BLAS/OpenMP thread per Dask thread: oversubscription costs more than it gives.
    return {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


#: Set by Dask's nanny in every worker by default (to hand freed memory back to the system early).
#: Any fixed value turns off glibc's adaptive mmap threshold, so each large tensor of a forward pass
#: is a fresh mmap that page-faults in and the model runs markedly slower. Local workers start
#: without it.
MALLOC_TRIM = "MALLOC_TRIM_THRESHOLD_"


#: Dask settings of the local workers this package starts (their nanny hands them the settings of
#: this process): no statistical profiler. It samples every thread's Python stack many times a
#: second in the worker's event loop, holding the GIL and taking CPU from the model; the profile is
#: a dashboard view for interactive work, which a batch run does not use.
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
#: postprocessing libraries when it unpickles its first task that needs them, holding up every
#: worker thread at the start of the inference. Local workers import them in a task of their own as
#: they start, and the cluster is handed out once they have. Tasks must not arrive during those
#: imports: a task unpickled while the import task is half-way through rasterio's (circular)
#: Cython modules can fail with ``ImportError: cannot import name guard_transform``.
WORKER_IMPORTS = ("pipeline.model.registry", "pipeline.model.device", "pipeline.inference.tiled", "postprocess.morphology",
                  "postprocess.objects", "postprocess.vectorize")


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

    With PyTorch and torchvision loaded, a Python process takes seconds to exit after its last line
    (their native libraries' teardown), long enough for the nanny to give up, log "Worker process
    still alive after 4.0 seconds, killing" and kill it at the end of a large run. By then every task has finished and every file is closed (the run's outputs
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


def local_threads(section: DaskSection, n_workers: int | None = None) -> int:
    """Threads per worker of a local cluster: ``dask.threads_per_worker``, else the cores per worker."""
    return section.threads_per_worker or max(1, (os.cpu_count() or 1) // (n_workers or section.n_workers))


@contextmanager
def dask_client(section: DaskSection, imports: Sequence[str] = (), gpus: Sequence[str] = ()) -> Iterator[object]:
    """Yield a ``distributed.Client`` for ``section``; closes what it started. The workers of a local
    cluster have imported :data:`WORKER_IMPORTS` and ``imports`` (for example the model library
    that the run's models need) when it is handed out. With ``gpus`` (:func:`visible_gpus`) a local
    cluster has one worker process per GPU, each seeing only its own (``CUDA_VISIBLE_DEVICES``) and
    offering the resource ``GPU: 1``; ``dask.threads_per_worker`` defaults to the CPU cores per GPU."""
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
        except TypeError as exc:  # distributed's words for a tls:// address without TLS settings
            if not section.scheduler.startswith("tls://"):
                raise
            raise ClusterError(
                f"cannot connect to the Dask scheduler at {section.scheduler}: no TLS settings for the client "
                f"({exc}); give Dask's distributed.comm.tls.ca-file, .client.cert and .client.key (for example "
                "DASK_DISTRIBUTED__COMM__TLS__CA_FILE, DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT and "
                "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY): see docs/deployment.md"
            ) from None
        try:
            yield client
        finally:
            client.close()
        return

    from pipeline.run.gpus import gpu_cluster

    gpus = list(gpus)
    n_workers = len(gpus) or section.n_workers
    threads = local_threads(section, n_workers)
    with _without_malloc_trim():
        cluster = gpu_cluster(gpus, threads, section.memory_limit) if gpus else LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads,
            processes=True,
            memory_limit=section.memory_limit,
            # this machine only, any free port: never "port 8787 is in use" beside another cluster
            dashboard_address="127.0.0.1:0",
            env=worker_env(),
            silence_logs=logging.WARNING,
        )
    try:
        client = Client(cluster)
    except BaseException:
        cluster.close()
        raise
    log.info("started a local Dask cluster: %d worker process(es) x %d thread(s)%s", n_workers, threads,
             f", one per GPU ({', '.join(gpus)})" if gpus else "")
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


class RunCluster:
    """The Dask client of a run, possibly still starting in a background thread."""

    def __init__(self, get: Any, starting: bool = False, own: bool = False, gpu: bool = False) -> None:
        self._get = get
        self.starting = starting
        self.own = own  # started by this run for this run alone (a local cluster)
        self.gpu = gpu  # the inference runs on the cluster's GPU workers only
        self._current = ExitStack()
        self._entered = False

    def wait(self, timer: Any) -> Any:
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
    def for_run(cls, cfg: Any, client: Any, models: Any, resources: ExitStack, timer: Any) -> RunCluster:
        """The run's Dask client: the caller's, a connection to ``dask.scheduler``, or a local cluster
        started in the background while this process builds the inference graphs."""
        from pipeline.run.gpus import gpus_for, uses_gpu_workers

        if client is not None:
            return cls(lambda: client, gpu=uses_gpu_workers(cfg.model.device, client))
        if cfg.dask.scheduler:
            with timer("start-cluster"):
                started = resources.enter_context(dask_client(cfg.dask))
            return cls(lambda: started, gpu=uses_gpu_workers(cfg.model.device, started))
        gpus = gpus_for(cfg.model.device)
        # distributed is imported here first: the starting thread and this one importing it at once
        # can find it half initialized ("cannot import name 'Server' from partially initialized module")
        import distributed  # noqa: F401

        return cls.start_local(cfg.dask, resources, worker_imports(models), gpus)

    @classmethod
    def start_local(cls, section: Any, resources: ExitStack, imports: Sequence[str] = (),
                    gpus: Sequence[str] = ()) -> RunCluster:
        from concurrent.futures import ThreadPoolExecutor

        def start() -> tuple[Any, Any]:
            context = dask_client(section, imports, gpus)
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
        return cls(lambda: future.result()[1], starting=True, own=True, gpu=bool(gpus))


def worker_imports(models: Sequence[Any]) -> tuple[str, ...]:
    """What the workers import beyond the task modules before the inference: the model library,
    when a model needs it (the shipped default does not)."""
    from pipeline.model.architectures import PLAIN_UNET, canonical_architecture

    needs_smp = any(canonical_architecture(m.architecture) != PLAIN_UNET for m in models)
    return ("segmentation_models_pytorch",) if needs_smp else ()

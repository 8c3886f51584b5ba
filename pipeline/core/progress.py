"""Progress for long Dask computations.

On a terminal a progress bar is shown (Dask's own: the distributed text bar
when a client is active, the local-scheduler bar otherwise). In logs (nightly
jobs, no terminal) a start line and an end line with the elapsed time are
written instead, so log files stay readable.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import dask

from pipeline.core.errors import PipelineError

log = logging.getLogger(__name__)


class WorkerDeathError(PipelineError, RuntimeError):
    """A task killed every worker that ran it (Dask's ``KilledWorker``): almost always a worker
    that ran out of memory and was restarted by its nanny, or a crash in native code. Transient: the
    nightly job retries the scene (``region.retries``)."""

    transient = True


def _task_name(key: Any) -> str:
    """The readable part of a Dask task key (``('predict-3f2a...', 0, 1)`` -> ``predict``)."""
    from dask.utils import key_split

    try:
        return str(key_split(key))
    except Exception:  # noqa: BLE001 - only for a message
        return str(key)


def worker_death_message(exc: BaseException, label: str) -> str:
    """What :class:`WorkerDeathError` says for a ``KilledWorker`` raised while computing ``label``:
    the stage and task, how many workers died running it, and what to try."""
    task = getattr(exc, "task", None)
    allowed = getattr(exc, "allowed_failures", None)
    if not isinstance(allowed, int):
        allowed = dask.config.get("distributed.scheduler.allowed-failures", None)
    last = getattr(exc, "last_worker", None)
    address = getattr(last, "address", last)
    tries = (f"it ran on {allowed + 1} workers in turn and each one died (the first try and "
             f"{allowed} retries: distributed.scheduler.allowed-failures)" if isinstance(allowed, int)
             else "every worker that ran it died")
    return (
        f"stage {label!r}: task {_task_name(task)} {task!r} killed its worker(s): {tries}"
        + (f", the last one {address}" if address else "")
        + ". Workers die like this mostly when they run out of memory (their nanny restarts them at the "
        "memory limit) or crash in native code; the worker logs say which. Try less memory per task: a "
        "smaller grid.block_size or model.batch_size (e.g. 1024 and 8), fewer threads per worker "
        "(dask.threads_per_worker); or more memory per worker (dask.memory_limit, fewer dask.n_workers)"
    )


@contextmanager
def worker_deaths_explained(label: str) -> Iterator[None]:
    """Turn a ``distributed.KilledWorker`` raised inside this block into :class:`WorkerDeathError`
    (:func:`worker_death_message`) instead of a bare traceback. For computations that do not go
    through :func:`compute`."""
    try:
        yield
    except Exception as exc:
        killed = _killed_worker_type()
        if killed is not None and isinstance(exc, killed):
            raise WorkerDeathError(worker_death_message(exc, label)) from None
        raise


def _killed_worker_type() -> type[BaseException] | None:
    try:
        from distributed import KilledWorker
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    return KilledWorker  # type: ignore[no-any-return]


def _client() -> Any:
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def _interactive() -> bool:
    return sys.stderr.isatty() and logging.getLogger().level <= logging.INFO


_BEFORE_COMPUTE: contextvars.ContextVar[Callable[[], Any] | None] = contextvars.ContextVar(
    "before_compute", default=None)


@contextmanager
def before_first_compute(fn: Callable[[], Any]) -> Iterator[None]:
    """Within this block, call ``fn`` once, right before the first :func:`compute`: a run builds its
    graphs while its cluster is still starting, and waits for the cluster only when it computes."""
    done = False

    def once() -> None:
        nonlocal done
        if not done:
            done = True
            fn()

    token = _BEFORE_COMPUTE.set(once)
    try:
        yield
    finally:
        _BEFORE_COMPUTE.reset(token)


def about_to_compute() -> None:
    """Run the :func:`before_first_compute` hook now, if there is one and it has not run: for code
    about to build something that depends on the scheduler (a distributed lock)."""
    hook = _BEFORE_COMPUTE.get()
    if hook is not None:
        hook()


def compute(obj: Any, label: str) -> Any:
    """Compute a Dask collection (or a list of them, in one computation) with progress reporting;
    returns its result.

    A list must hold collections of one kind (arrays, or delayed objects): Dask
    returns the results of a mixed list grouped by kind, not in the list's order.

    A task that killed every worker it ran on raises :class:`WorkerDeathError` naming ``label``,
    the task and what to try, instead of Dask's ``KilledWorker``.
    """
    if isinstance(obj, list | tuple):
        kinds = {type(x).__name__ for x in obj if dask.is_dask_collection(x)}
        if len(kinds) > 1:
            raise TypeError(f"compute: a list of one kind of collection expected, got {sorted(kinds)}")
    about_to_compute()
    t0 = time.perf_counter()
    log.info("%s ...", label)
    with worker_deaths_explained(label):
        result = _compute(obj, label)
    log.info("%s done in %.1f s", label, time.perf_counter() - t0)
    return result


def _compute(obj: Any, label: str) -> Any:
    client = _client()
    if client is not None:
        future = client.compute(obj)  # a list of futures for a list or tuple of collections
        futures = future if isinstance(future, list) else [future]
        if _interactive():
            from distributed import progress

            print(label, file=sys.stderr)
            progress(*futures, notebook=False)
            print(file=sys.stderr)
        result = [f.result() for f in futures] if isinstance(future, list) else future.result()
    elif _interactive():
        from dask.diagnostics import ProgressBar

        with ProgressBar(out=sys.stderr):
            (result,) = dask.compute(obj)
    else:
        (result,) = dask.compute(obj)
    return result

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

log = logging.getLogger(__name__)


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
    """
    if isinstance(obj, list | tuple):
        kinds = {type(x).__name__ for x in obj if dask.is_dask_collection(x)}
        if len(kinds) > 1:
            raise TypeError(f"compute: a list of one kind of collection expected, got {sorted(kinds)}")
    about_to_compute()
    t0 = time.perf_counter()
    log.info("%s ...", label)
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
    log.info("%s done in %.1f s", label, time.perf_counter() - t0)
    return result

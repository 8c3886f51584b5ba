"""Scenes in flight at once: a bounded pool of threads in the job's process.

Each scene runs in a thread of the job's process (its tasks run on the cluster); outcomes are
handed back to the job's thread as they finish, so the state is written from one thread only.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def scenes_in_flight(setting: int | str, client: Any) -> int:
    """How many scenes run at once: ``setting``, or for ``auto`` half the cluster's worker processes
    (each scene's blocks run on every worker; a second scene keeps them busy while the first writes
    its outputs in this process), at least 1 and at most 4."""
    if setting != "auto":
        return max(1, int(setting))
    try:
        workers = len(client.nthreads())
    except Exception:  # noqa: BLE001 - a client that cannot say runs one scene at a time
        return 1
    return max(1, min(4, workers // 2))


def for_each_in_flight(items: Sequence[T], run: Callable[[int, T], R], width: int,
                       done: Callable[[int, T, R], bool]) -> None:
    """``run(i, item)`` for each item (``i`` from 1), at most ``width`` at once, and ``done(i, item,
    result)`` in this thread as each finishes; once ``done`` returns False no further item starts
    (those running finish). ``width`` 1 runs them one after another in this thread. An exception
    of ``run`` stops the starting of items and is raised once those running have finished."""
    if width <= 1:
        for i, item in enumerate(items, 1):
            if not done(i, item, run(i, item)):
                return
        return
    queue = iter(enumerate(items, 1))
    pending: dict[Future[R], tuple[int, T]] = {}
    with ThreadPoolExecutor(width, thread_name_prefix="scene") as pool:

        def start_next() -> None:
            nxt = next(queue, None)
            if nxt is not None:
                pending[pool.submit(contextvars.copy_context().run, run, *nxt)] = nxt

        for _ in range(width):
            start_next()
        going = True
        error: BaseException | None = None
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    i, item = pending.pop(future)
                    try:
                        result = future.result()
                    except Exception as exc:  # noqa: BLE001 - raised below, after the others
                        error = error or exc
                        going = False
                        continue
                    if not done(i, item, result):
                        going = False
                    if going:
                        start_next()
        except BaseException:  # Ctrl-C: nothing more starts; the scenes running finish
            for future in pending:
                future.cancel()
            raise
    if error is not None:
        raise error

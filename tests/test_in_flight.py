"""Scenes in flight at once: at most ``width`` at a time, outcomes in the caller's thread, a stop
that lets the running ones finish, an error raised once they have."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.run.in_flight import for_each_in_flight, scenes_in_flight


def test_two_run_at_once_and_never_more() -> None:
    barrier = threading.Barrier(2, timeout=10)  # only passes when two items run together
    running, most, lock = [0], [0], threading.Lock()
    threads: set[str] = set()
    done: list[int] = []

    def run(i: int, item: str) -> str:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        barrier.wait() if i <= 2 else time.sleep(0.01)
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return item.upper()

    def record(i: int, item: str, result: str) -> bool:
        threads.add(threading.current_thread().name)
        done.append(i)
        assert result == item.upper()
        return True

    for_each_in_flight(list("abcdef"), run, 2, record)
    assert sorted(done) == [1, 2, 3, 4, 5, 6] and most[0] == 2
    assert threads == {threading.current_thread().name}  # outcomes come back in the caller's thread


def test_a_stop_lets_the_running_finish_and_starts_nothing_more() -> None:
    started: list[int] = []

    def run(i: int, item: int) -> int:
        started.append(i)
        time.sleep(0.05 if i == 1 else 0.2)
        return item

    recorded: list[int] = []
    for_each_in_flight(list(range(10)), run, 2, lambda i, item, r: recorded.append(i) or i != 1)
    assert sorted(started) == [1, 2] and sorted(recorded) == [1, 2]


def test_an_error_is_raised_after_the_others_finish() -> None:
    finished: list[int] = []

    def run(i: int, item: int) -> int:
        if i == 1:
            raise RuntimeError("boom")
        time.sleep(0.1)
        finished.append(i)
        return item

    with pytest.raises(RuntimeError, match="boom"):
        for_each_in_flight(list(range(5)), run, 2, lambda i, item, r: True)
    assert finished == [2]


def test_one_at_a_time_runs_in_the_callers_thread() -> None:
    names: list[str] = []
    for_each_in_flight([1, 2], lambda i, item: names.append(threading.current_thread().name), 1,
                       lambda i, item, r: True)
    assert names == [threading.current_thread().name] * 2


class _Client:
    def __init__(self, workers: int) -> None:
        self.workers = workers

    def nthreads(self) -> dict[str, int]:
        return {f"tcp://w{i}": 2 for i in range(self.workers)}


@pytest.mark.parametrize(("setting", "workers", "width"), [("auto", 1, 1), ("auto", 2, 1), ("auto", 4, 2),
                                                           ("auto", 40, 4), (3, 1, 3)])
def test_auto_is_half_the_workers_from_one_to_four(setting, workers: int, width: int) -> None:
    assert scenes_in_flight(setting, _Client(workers)) == width

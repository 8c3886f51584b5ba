"""Progress reporting for long computations."""

from __future__ import annotations

import logging

import dask
import dask.array as da
import pytest

from pipeline.core import progress
from pipeline.core.progress import compute


def test_compute_returns_the_result_and_logs_start_and_end(caplog) -> None:
    arr = da.ones((64, 64), chunks=16)
    with caplog.at_level(logging.INFO, logger="pipeline.core.progress"):
        assert progress.compute(arr.sum(), "summing") == 64 * 64
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "summing ..."
    assert messages[-1].startswith("summing done in ")


def test_terminal_gets_a_progress_bar(monkeypatch, capsys) -> None:
    monkeypatch.setattr(progress, "_interactive", lambda: True)
    assert progress.compute(da.arange(10, chunks=2).sum(), "bar") == 45
    assert "100% Completed" in capsys.readouterr().err


def test_a_list_of_mixed_collections_is_refused() -> None:
    """Dask returns a mixed list's results grouped by kind: refused instead of silently reordered."""
    arr = da.ones((4, 4), chunks=2)
    assert [float(x) for x in compute([arr.sum(), arr.max() * 3], "two arrays")] == [16.0, 3.0]
    with pytest.raises(TypeError, match="one kind"):
        compute([arr.sum(), dask.delayed(lambda: 1)(), arr.max()], "mixed")


def test_the_hook_runs_once_right_before_the_first_computation(caplog) -> None:
    """A run builds its graphs while its cluster starts and waits for it only when it computes."""
    events: list[str] = []
    arr = da.ones((4, 4), chunks=2)
    with progress.before_first_compute(lambda: events.append("wait")):
        events.append("build")
        assert compute(arr.sum(), "first") == 16
        events.append("computed")
        progress.about_to_compute()  # already ran: nothing more
        assert compute(arr.max(), "second") == 1
    assert events == ["build", "wait", "computed"]
    compute(arr.sum(), "outside")  # outside the block the hook is gone
    assert events == ["build", "wait", "computed"]

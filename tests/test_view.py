"""``python -m pipeline view PATH``: which report a path means, and the localhost server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from queue import Empty, Queue

import pytest
from conftest import ROOT
from test_html_report import make_region, make_run_folder

from pipeline.core.errors import InputError


def _state(out: Path, args: dict) -> Path:
    import json

    state = {"region": args["name"], "started": args["started"], "finished": args["finished"],
             "scenes": {o["config"]: o for o in args["outcomes"]}, "merged": str(args["merged"])}
    path = out / f"{args['name']}.region_state.json"
    path.write_text(json.dumps(state))
    return path


def test_what_a_path_means(tmp_path: Path) -> None:
    from pipeline.cli.view import resolve_target
    from pipeline.report import write_html_report

    run_dir, report = make_run_folder(tmp_path)
    write_html_report(run_dir, report)
    for path in (run_dir, run_dir / "report.html", run_dir / "report.json", run_dir.parent):
        target = resolve_target(path)
        assert target.root == run_dir.resolve() and target.pages == ["report.html"] and not target.generated


def test_a_run_without_a_page_gets_one_in_memory(tmp_path: Path) -> None:
    from pipeline.cli.view import resolve_target

    run_dir, _ = make_run_folder(tmp_path)
    before = sorted(p.name for p in run_dir.iterdir())
    target = resolve_target(run_dir.parent)  # the scene folder: its LATEST run
    assert target.pages == ["report.html"] and target.generated["report.html"].startswith(b"<!DOCTYPE html>")
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing written, no sidecar


def test_a_region_folder(tmp_path: Path) -> None:
    from pipeline.cli.view import resolve_target
    from pipeline.report import write_region_report

    args = make_region(tmp_path)
    _state(tmp_path, args)
    target = resolve_target(tmp_path)  # only the state file: the page in memory
    assert target.root == tmp_path.resolve() and target.pages == ["night.report.html"]
    assert b"Region night" in target.generated["night.report.html"]
    assert resolve_target(tmp_path / "night.region_state.json").pages == ["night.report.html"]
    write_region_report(**args)
    target = resolve_target(tmp_path)
    assert target.pages == ["night.report.html"] and not target.generated


def test_no_report_here(tmp_path: Path) -> None:
    from pipeline.cli.view import resolve_target

    with pytest.raises(InputError, match="no report here"):
        resolve_target(tmp_path)
    with pytest.raises(InputError, match="no such file"):
        resolve_target(tmp_path / "missing")
    (tmp_path / "LATEST").write_text("run-gone\n")
    with pytest.raises(InputError, match="not a run folder"):
        resolve_target(tmp_path)


# -- the server, as a user runs it --------------------------------------------------------------------
def _start(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str, list[str]]:
    """``python -m pipeline view ARGS`` in the background; the process, the first address it printed,
    and the lines it printed up to it."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    for key in [k for k, v in full_env.items() if v is None]:
        del full_env[key]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "-q", "view", *args], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: list[str] = []
    queue: Queue[str | None] = Queue()

    def read() -> None:  # a thread: readline blocks
        assert proc.stdout is not None
        for line in proc.stdout:
            queue.put(line.rstrip("\n"))
        queue.put(None)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            line = queue.get(timeout=1)
        except Empty:
            continue
        if line is None:
            break
        lines.append(line)
        if line.startswith("http://"):
            proc.lines = queue  # type: ignore[attr-defined]  # the rest, for _stop
            return proc, line.strip(), lines
    proc.kill()
    raise AssertionError("view printed no address: " + "\n".join(lines))


def _stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """Ctrl-C; the exit status and what the process printed after its address."""
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=30)
    queue: Queue[str | None] = proc.lines  # type: ignore[attr-defined]
    rest = []
    while (line := queue.get(timeout=10)) is not None:
        rest.append(line)
    return rc, "\n".join(rest)


def test_serve_a_run_until_ctrl_c(tmp_path: Path) -> None:
    from pipeline.report import write_html_report

    run_dir, report = make_run_folder(tmp_path)
    page = write_html_report(run_dir, report).read_bytes()
    proc, url, lines = _start([str(run_dir.parent)])
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/report.html")
        assert "127.0.0.1 only" in lines[0] and "Ctrl-C" in lines[0]
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200 and resp.read() == page
            assert resp.headers["Content-Type"].startswith("text/html")
        root = url.rsplit("/", 1)[0] + "/"
        with urllib.request.urlopen(root, timeout=10) as resp:  # the folder's address: the report
            assert resp.url == url and resp.read() == page
        with urllib.request.urlopen(root + "S2_TEST_landslides.gpkg", timeout=10) as resp:  # the page's link
            assert resp.read() == (run_dir / "S2_TEST_landslides.gpkg").read_bytes()
    finally:
        rc, out = _stop(proc)
    assert rc == 0 and "stopped" in out and "Traceback" not in out


def test_a_page_made_in_memory_is_served(tmp_path: Path) -> None:
    run_dir, _ = make_run_folder(tmp_path)
    proc, url, lines = _start([str(run_dir), "--port", "0"])
    try:
        assert "made in memory" in lines[0]
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert b"Landslides \xe2\x80\x94 S2_TEST" in resp.read()
    finally:
        rc, _ = _stop(proc)
    assert rc == 0 and not (run_dir / "report.html").exists()


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    run_dir, _ = make_run_folder(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "pipeline", "view", str(run_dir), "--port", str(port)], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "--port" in out.stderr


@pytest.mark.parametrize("display", [False, True])
def test_open_only_with_a_display(tmp_path: Path, display: bool) -> None:
    """``--open`` starts the browser (here ``$BROWSER``, a script that records the address) only
    where there is a display; without one it says so."""
    run_dir, _ = make_run_folder(tmp_path)
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\necho "$1" > {opened}\n')
    browser.chmod(0o755)
    env = {"BROWSER": str(browser), "DISPLAY": ":99" if display else None, "WAYLAND_DISPLAY": None}
    proc, url, lines = _start([str(run_dir), "--open"], env=env)  # type: ignore[arg-type]
    try:
        if display:
            deadline = time.monotonic() + 20
            while not opened.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert opened.exists() and opened.read_text().strip() == url
        else:
            time.sleep(1.0)
            assert not opened.exists()
    finally:
        rc, out = _stop(proc)
    assert rc == 0
    assert ("no display here" in out) is not display


def test_the_command_is_listed() -> None:
    for args in (["--help"], ["view", "--help"]):
        out = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        assert out.returncode == 0 and "view" in out.stdout
    assert "--port" in out.stdout and "--open" in out.stdout and "LATEST" in out.stdout

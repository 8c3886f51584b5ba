"""The command line lists its commands and fails cleanly."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

COMMANDS = ["run", "region", "validate", "stack", "demo-data", "train", "evaluate"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=180)


def test_help_lists_every_subcommand() -> None:
    proc = _cli("--help")
    assert proc.returncode == 0
    for name in COMMANDS:
        assert name in proc.stdout


def test_each_subcommand_has_help() -> None:
    for name in COMMANDS:
        proc = _cli(name, "--help")
        assert proc.returncode == 0, (name, proc.stderr)
        assert "usage:" in proc.stdout


def test_missing_config_is_a_clean_error(tmp_path) -> None:
    proc = _cli("run", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2
    assert "config file not found" in proc.stderr
    assert "Traceback" not in proc.stderr

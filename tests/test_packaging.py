"""Packaging and layout: conda and pyproject list the same dependencies; every module says its job."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from conftest import ROOT

# conda-forge spells a few packages differently from PyPI.
_CONDA_NAMES = {"dask[array,distributed]": "dask"}


def _normalize(req: str) -> tuple[str, str]:
    req = req.replace(" ", "")
    match = re.match(r"^([A-Za-z0-9_.\-\[\],]+)(.*)$", req)
    assert match, req
    name, spec = match.groups()
    name = _CONDA_NAMES.get(name, name).lower().replace("_", "-")
    # conda uses a single '=' for exact pins of python; normalize '==' too.
    return name, spec.replace("==", "=")


def _pyproject_requirements() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = data["project"]["dependencies"] + data["project"]["optional-dependencies"]["dev"]
    return dict(_normalize(r) for r in reqs)


def _environment_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    out: dict[str, str] = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for pip_req in dep.get("pip", []):
                if not pip_req.startswith("-"):
                    out.update([_normalize(pip_req)])
        elif not dep.startswith(("python=", "pip")) or dep.startswith("pip:"):
            out.update([_normalize(dep)])
    return out


def test_environment_yml_matches_pyproject() -> None:
    py = _pyproject_requirements()
    env = _environment_requirements()
    assert py == env, (
        f"only in pyproject: {sorted(set(py.items()) - set(env.items()))}; "
        f"only in environment.yml: {sorted(set(env.items()) - set(py.items()))}"
    )


def test_torch_pair_is_pinned_exactly() -> None:
    py = _pyproject_requirements()
    assert py["torch"] == "=2.14.1"
    assert py["torchvision"] == "=0.29.1"


def test_environment_pins_python_311() -> None:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]


def test_the_block_wise_postprocessing_does_not_import_geopandas() -> None:
    """The workers' block-wise modules stay light: importing them does not import GeoPandas (only
    the writers that need it do)."""
    import subprocess
    import sys

    code = (
        "import sys, postprocess\n"
        "assert 'geopandas' not in sys.modules and 'postprocess.gpkg' not in sys.modules\n"
        "import postprocess.morphology, postprocess.objects, postprocess.vectorize\n"
        "assert 'geopandas' not in sys.modules\n"
        "import postprocess.gpkg\n"
        "print('geopandas' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "True"  # the check can see an import of GeoPandas


def _modules() -> list[Path]:
    return sorted(p for top in ("pipeline", "tiling", "postprocess") for p in (ROOT / top).rglob("*.py"))


def test_every_module_states_its_job_and_stays_small() -> None:
    """A newcomer reads each module's job in its first docstring line; no module grows past 400 lines."""
    import ast

    for path in _modules():
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text))
        assert doc and doc.strip().split("\n")[0].strip(), f"{path}: no docstring saying what it does"
        assert len(text.splitlines()) <= 400, f"{path}: {len(text.splitlines())} lines"


def test_the_architecture_page_lists_every_module() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    sections = {s.split("`", 2)[1].rstrip("/"): s for s in text.split("\n### ")[1:]}
    for path in _modules():
        package = path.parent.relative_to(ROOT).as_posix()
        if path.name == "__init__.py" and package != "pipeline":
            assert f"`{package}/`" in text, package  # in the packages table
            continue
        assert package in sections and f"`{path.name}`" in sections[package], f"{path} not in docs/architecture.md"


def test_tiling_and_postprocess_use_only_the_shared_core_of_pipeline() -> None:
    """The stage libraries depend on ``pipeline.core`` alone, never on the application's packages."""
    import ast

    for path in sorted(p for top in ("tiling", "postprocess") for p in (ROOT / top).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name == "pipeline" or name.startswith("pipeline."):
                    assert name.startswith("pipeline.core"), f"{path}: imports {name}"

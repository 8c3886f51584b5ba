"""docs/configuration.md and docs/schema/*.schema.json are what the config models give now, and the
example configs are valid under the schemas.

When a test here fails because a model changed, regenerate the files with
``python -m pipeline config-docs --out docs/`` and commit them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT
from pydantic import BaseModel

from pipeline.cli import config_docs
from pipeline.cli.config_docs import REGENERATE, config_files, generated_files, json_schema, markdown
from pipeline.core.yamlio import load_yaml

DOCS = ROOT / "docs"
# files starting with "_" are scratch copies, not examples; scene templates of regions are checked apart
EXAMPLES = sorted(p for p in (ROOT / "configs").glob("*.yaml")
                  if not p.name.startswith("_") and not p.name.endswith("_template.yaml"))
TEMPLATES = sorted((ROOT / "configs").glob("*_template.yaml"))


def _kind(data: dict[str, Any]) -> str:
    """Which model an example config is for, from its top-level keys."""
    if "scenes" in data or "products" in data:
        return "region"
    if "data" in data:
        return "train"
    if "scene" in data:
        return "scene"
    raise AssertionError(f"not a scene, region or training config: keys {sorted(data)}")


def _as_json(data: Any) -> Any:
    """The YAML data as an editor's YAML language server sees it (dates are strings there)."""
    return json.loads(json.dumps(data, default=str))


@pytest.mark.parametrize("rel", sorted(generated_files()))
def test_checked_in_file_is_what_the_generator_gives(rel: str) -> None:
    expected = generated_files()[rel]
    path = DOCS / rel
    assert path.is_file(), f"{path} is missing; generate it with: {REGENERATE}"
    assert path.read_text(encoding="utf-8") == expected, (
        f"{path} is out of date with the pydantic models; regenerate it with: {REGENERATE}"
    )


def test_generated_files_are_the_same_on_every_machine() -> None:
    for rel, text in generated_files().items():
        assert str(ROOT) not in text, rel
        assert str(config_docs.PACKAGE_DIR) not in text, rel
    assert generated_files() == generated_files()


def test_markdown_says_how_it_is_generated() -> None:
    head = "\n".join(markdown().splitlines()[:6])
    assert REGENERATE in head


def _fields(model: type[BaseModel], internal: frozenset[str]) -> list[tuple[type[BaseModel], str]]:
    out = []
    for name, field in model.model_fields.items():
        if name in internal:
            continue
        out.append((model, name))
        sub = config_docs._section_model(field.annotation)
        if sub is not None:
            out += _fields(sub, frozenset())
    return out


@pytest.mark.parametrize("cfg", config_files(), ids=lambda c: c.key)
def test_every_key_is_listed_with_its_description(cfg: config_docs.ConfigFile) -> None:
    text = markdown()
    for model, name in _fields(cfg.model, cfg.internal):
        field = model.model_fields[name]
        rows = [line for line in text.splitlines() if line.startswith(f"| `{name}` |")]
        assert rows, f"{model.__name__}.{name} is not listed"
        want = config_docs._cell(field.description or "")
        assert any(row.endswith(f"| {want} |") for row in rows), (model.__name__, name)


@pytest.mark.parametrize("cfg", config_files(), ids=lambda c: c.key)
def test_schema_is_the_models_schema_less_internal_fields(cfg: config_docs.ConfigFile) -> None:
    schema = json_schema(cfg)
    raw = cfg.model.model_json_schema()
    assert set(schema["properties"]) == set(raw["properties"]) - cfg.internal
    assert set(schema["$defs"]) == set(raw.get("$defs", {}))
    assert "source" not in schema["properties"]
    assert "source" not in schema.get("required", [])


def test_scene_schema_keeps_user_keys_excluded_from_dumps() -> None:
    scene = next(c for c in config_files() if c.key == "scene")
    props = json_schema(scene)["$defs"]["SceneSection"]["properties"]
    assert "verify_checksums" in props  # excluded from fingerprints, but a key users set
    assert props["safe"]["anyOf"][0] == {"format": "path", "type": "string"}


def test_examples_cover_every_kind() -> None:
    kinds = {_kind(load_yaml(p)) for p in EXAMPLES}
    assert kinds == {"scene", "region", "train"}


def test_every_template_is_named_by_a_region_and_loads() -> None:
    from pipeline.core.region_config import load_region_config
    from pipeline.core.template import load_template

    named = {load_region_config(p).template for p in EXAMPLES if _kind(load_yaml(p)) == "region"}
    assert TEMPLATES and set(TEMPLATES) <= {t.resolve() for t in named if t is not None}
    for path in TEMPLATES:
        assert "dem" in load_template(path)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_is_valid_under_its_schema(path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    data = load_yaml(path)
    cfg = next(c for c in config_files() if c.key == _kind(data))
    schema = json.loads((DOCS / "schema" / f"{cfg.key}.schema.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    validator.check_schema(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(_as_json(data))]
    assert not errors, errors
    # and the models agree
    cfg.model.model_validate(data, context={"base_dir": path.resolve().parent})


def test_schema_catches_misspelt_keys_and_bad_values() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    scene = json.loads((DOCS / "schema" / "scene.schema.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(scene)
    good = {"scene": {"safe": "S2.SAFE"}, "dem": {"path": "dem.tif"}}
    assert not list(validator.iter_errors(good))
    assert list(validator.iter_errors({**good, "grid": {"resolutoin": 10}}))
    assert list(validator.iter_errors({**good, "grid": {"block_size": 100}}))
    assert list(validator.iter_errors({**good, "model": {"ensemble": "median"}}))
    assert list(validator.iter_errors({**good, "source": "x.yaml"}))
    assert list(validator.iter_errors({"scene": {"safe": "S2.SAFE"}}))  # dem is required


def test_check_reports_stale_files_and_how_to_regenerate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert config_docs.main(["--out", str(tmp_path)]) == 0
    assert config_docs.main(["--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "schema" / "train.schema.json").write_text("{}\n", encoding="utf-8")
    capsys.readouterr()
    assert config_docs.main(["--out", str(tmp_path), "--check"]) == 1
    err = capsys.readouterr().err
    assert "train.schema.json" in err and REGENERATE in err


def test_cli_subcommand_writes_the_docs(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline", "config-docs", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert proc.returncode == 0, proc.stderr
    for rel, text in generated_files().items():
        assert (tmp_path / rel).read_text(encoding="utf-8") == text

"""Configuration reference and JSON Schemas, generated from the pydantic models.

``python -m pipeline config-docs --out docs/`` (or ``python -m pipeline.cli.config_docs --out docs/``)
writes

* ``docs/configuration.md``: every section and key of ``scene.yaml``
  (:class:`pipeline.core.config.SceneConfig`), ``region.yaml``
  (:class:`pipeline.core.region_config.RegionConfig`) and the training YAML
  (:class:`pipeline.training.config.TrainConfig`) with its type, default and the
  ``Field`` description of the model (empty where the model has none);
* ``docs/schema/{scene,region,train}.schema.json``: ``Model.model_json_schema()``
  for editors, less what is not a user key or depends on the machine (see
  :func:`json_schema`).

``--check`` writes nothing and exits 1 when the files under ``--out`` differ from
what the models give now. ``tests/test_config_docs.py`` checks the same, so the
checked-in files cannot drift from the models.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import re
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from pipeline.core.config import SceneConfig
from pipeline.core.region_config import RegionConfig

REGENERATE = "python -m pipeline config-docs --out docs/"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
MARKDOWN_NAME = "configuration.md"
SCHEMA_DIR = "schema"
JSON_SCHEMA_DRAFT = "https://json-schema.org/draft/2020-12/schema"


@dataclass(frozen=True)
class ConfigFile:
    """One kind of YAML file: its name in the docs, its model, its schema file."""

    key: str  # schema file stem: docs/schema/<key>.schema.json
    title: str  # how the docs name the file
    model: type[BaseModel]
    example: str  # an example config in configs/
    intro: str
    #: top-level fields that are not keys of the YAML file (the loader sets them)
    internal: frozenset[str] = frozenset()


def config_files() -> list[ConfigFile]:
    """The three kinds of YAML files, in the order the docs list them."""
    from pipeline.training.config import TrainConfig  # imports numpy and torch; only needed here

    return [
        ConfigFile(
            "scene", "scene.yaml", SceneConfig, "configs/slovenia.yaml",
            "One scene: `python -m pipeline run scene.yaml` (check it first with `python -m pipeline validate scene.yaml`).",
            # `source` is the file the config was read from: set by the loader, excluded from dumps,
            # and refused as a key in the YAML file
            frozenset({"source"}),
        ),
        ConfigFile(
            "region", "region.yaml", RegionConfig, "configs/region.yaml",
            "Run: `python -m pipeline region region.yaml`.",
            frozenset({"source"}),
        ),
        ConfigFile(
            "train", "training YAML", TrainConfig, "configs/train_default.yaml",
            "Run: `python -m pipeline train train.yaml`.",
        ),
    ]


# --------------------------------------------------------------------------
# JSON Schema
# --------------------------------------------------------------------------
def _is_machine_path(value: Any) -> bool:
    """True for a value that names a file of this installation (an absolute path in the package)."""
    return json.dumps(str(PACKAGE_DIR))[1:-1] in json.dumps(value)


def _clean(node: Any) -> None:
    """Drop, in place, defaults that repeat a whole section (the section's own keys carry their
    defaults) or that name a file of this installation (model.path: the packaged model)."""
    if isinstance(node, dict):
        if "default" in node and ("$ref" in node or _is_machine_path(node["default"])):
            del node["default"]
        for value in node.values():
            _clean(value)
    elif isinstance(node, list):
        for value in node:
            _clean(value)


def json_schema(cfg: ConfigFile) -> dict[str, Any]:
    """``cfg.model.model_json_schema()`` (validation mode, JSON Schema draft 2020-12), less

    * the internal top-level fields (``source``: not a key of the YAML file);
    * defaults of whole sections (repeated by the keys of the section) and defaults that are
      paths of this installation (``model.path``: the packaged default model), so the file is
      the same on every machine.

    Paths (``"format": "path"``) are relative to the YAML file that names them.
    """
    schema = copy.deepcopy(cfg.model.model_json_schema())
    for name in cfg.internal:
        schema.get("properties", {}).pop(name, None)
        if name in schema.get("required", []):
            schema["required"].remove(name)
    _clean(schema)
    head = {
        "$schema": JSON_SCHEMA_DRAFT,
        "$comment": (f"Generated from pipeline's pydantic models by `{REGENERATE}`; do not edit. "
                     "Paths (format: path) are relative to the YAML file that names them."),
    }
    return {**head, **schema}


def schema_text(cfg: ConfigFile) -> str:
    return json.dumps(json_schema(cfg), indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------
def slug(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _cell(text: str) -> str:
    """Text for a table cell: one line; ``|``, ``<``, ``>`` and ``*`` kept literal."""
    text = " ".join(text.split())
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")


def _summary(model: type[BaseModel]) -> str:
    """The first paragraph of a model's docstring ("" without one)."""
    doc = model.__dict__.get("__doc__") or ""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a section field (``X``, ``X | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1:
            return models[0]
    return None


def _code(value: Any) -> str:
    """A value as it would be written in YAML (strings bare unless empty)."""
    if isinstance(value, str):
        # quoted where YAML would read the bare text as something else (`"1"`, `"null"`, `""`)
        return f"`{value}`" if value and yaml.safe_load(value) == value else f"`{json.dumps(value)}`"
    return f"`{json.dumps(to_jsonable_python(value), ensure_ascii=False)}`"


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    factory = field.default_factory
    value = factory() if factory is not None else field.default  # type: ignore[call-arg]
    if value is None:
        return "`null`"
    if _section_model(field.annotation) is not None:
        return "section defaults"
    if isinstance(value, Path):
        if value.is_absolute() and PACKAGE_DIR in value.parents:
            return f"{_code(value.relative_to(PACKAGE_DIR.parent).as_posix())} (shipped with the package)"
        return _code(value.as_posix())
    return _code(value)


_BOUNDS = (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"))


def _type(node: dict[str, Any], link: str | None) -> str:
    """A readable type of a property of the JSON Schema; ``link`` is the Markdown link of a
    section (``$ref``)."""
    if "$ref" in node:
        return f"section, see {link}" if link else "section"
    if "anyOf" in node:
        parts = [_type(sub, link) for sub in node["anyOf"] if sub.get("type") != "null"]
        if any(sub.get("type") == "null" for sub in node["anyOf"]):
            parts.append("`null`")
        return " or ".join(parts)
    if "enum" in node:
        return "one of " + ", ".join(_code(v) for v in node["enum"])
    if "const" in node:
        return _code(node["const"])
    kind = node.get("type")
    if kind == "array":
        if "prefixItems" in node:
            text = "[" + ", ".join(_type(item, None) for item in node["prefixItems"]) + "]"
        else:
            text = "list of " + _type(node.get("items", {}), link)
            if node.get("minItems"):
                text += f" (at least {node['minItems']})"
        return text
    if kind == "object":
        extra = node.get("additionalProperties")
        return f"mapping of string to {_type(extra, link)}" if isinstance(extra, dict) and extra else "mapping"
    text = node["format"] if kind == "string" and node.get("format") in ("path", "date") else kind or "any"
    bounds = [f"{sign} {node[key]}" for key, sign in _BOUNDS if key in node]
    return f"{text} ({', '.join(bounds)})" if bounds else text


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """The schema of a section field (``$ref`` directly or in ``anyOf``)."""
    refs = [node] + node.get("anyOf", [])
    for ref in refs:
        if "$ref" in ref:
            return schema["$defs"][ref["$ref"].rsplit("/", 1)[-1]]  # type: ignore[no-any-return]
    raise KeyError(node)


def _sections(cfg: ConfigFile) -> list[str]:
    """Markdown for one YAML file: a table per section, nested sections linked."""
    schema = json_schema(cfg)
    out: list[str] = []

    def heading(path: tuple[str, ...]) -> str:
        return f"{cfg.title}: `{'.'.join(path)}`" if path else f"{cfg.title}: top level"

    def table(model: type[BaseModel], node: dict[str, Any], path: tuple[str, ...]) -> None:
        title = heading(path)
        out.append(f"### {title}\n")
        if path and _summary(model):
            out.append(_cell(_summary(model)) + "\n")
        rows = ["| key | type | default | description |", "|---|---|---|---|"]
        nested: list[tuple[type[BaseModel], dict[str, Any], tuple[str, ...]]] = []
        for name, field in model.model_fields.items():
            if not path and name in cfg.internal:
                continue
            key = field.alias or name
            prop = node["properties"][key]
            sub = _section_model(field.annotation)
            link = None
            if sub is not None:
                link = f"[`{'.'.join(path + (key,))}`](#{slug(heading(path + (key,)))})"
                nested.append((sub, _resolve(schema, prop), path + (key,)))
            rows.append(
                f"| `{key}` | {_cell(_type(prop, link))} | {_cell(_default(field))} | "
                f"{_cell(field.description or '')} |"
            )
        out.append("\n".join(rows) + "\n")
        for sub, sub_node, sub_path in nested:
            table(sub, sub_node, sub_path)

    out.append(f"## {cfg.title}\n")
    intro = f"{_summary(cfg.model)} {cfg.intro}".strip()
    out.append(f"{intro} Example: [`{cfg.example}`](../{cfg.example}). "
               f"JSON Schema: [`{SCHEMA_DIR}/{cfg.key}.schema.json`]({SCHEMA_DIR}/{cfg.key}.schema.json).\n")
    table(cfg.model, schema, ())
    return out


def markdown() -> str:
    files = config_files()
    parts = [
        "# Configuration reference\n",
        f"<!-- Generated by `{REGENERATE}` from the pydantic models in pipeline/core/config.py and "
        "pipeline/training/config.py; do not edit by hand. -->\n",
        f"This file is generated from the pydantic models (`pipeline/core/config.py`, `pipeline/training/config.py`) by "
        f"`{REGENERATE}`, together with the JSON Schemas in [`{SCHEMA_DIR}/`]({SCHEMA_DIR}/); do not edit it by "
        "hand. `tests/test_config_docs.py` fails when it is out of date.\n",
        "Rules for every file:\n",
        "* Unknown keys are errors, and so is a key given twice; the error names the file, the line and the key.\n"
        "* Paths (type `path`) are relative to the YAML file that names them; `~` is expanded.\n"
        "* A key left out takes its default; a section left out takes the defaults of all its keys. "
        "Keys marked **required** have no default.\n"
        "* `null` is written `null` (or `~`) in YAML. A description left empty is one the model does not give.\n",
        "Editors: the JSON Schemas give completion and checks in editors with a YAML language server "
        "(VS Code's YAML extension, for example) with a first line such as\n",
        "```yaml\n# yaml-language-server: $schema=../docs/schema/scene.schema.json\n```\n",
        "(the path relative to the YAML file). The schemas check types, ranges and key names only: rules "
        "across keys (exactly one of `scene.safe`, `scene.bands_dir`, `scene.bands`, for example) and the "
        "files themselves are checked by `python -m pipeline validate scene.yaml`.\n",
        "Contents:\n",
        "\n".join(f"* [{c.title}](#{slug(c.title)})" for c in files) + "\n",
    ]
    for cfg in files:
        parts += _sections(cfg)
    return "\n".join(parts).rstrip("\n") + "\n"


# --------------------------------------------------------------------------
# Files and command line
# --------------------------------------------------------------------------
def generated_files() -> dict[str, str]:
    """Relative path under the docs folder -> text."""
    files = {MARKDOWN_NAME: markdown()}
    for cfg in config_files():
        files[f"{SCHEMA_DIR}/{cfg.key}.schema.json"] = schema_text(cfg)
    return files


def stale_files(out: Path) -> list[str]:
    """The generated files under ``out`` that are missing or differ from what the models give now."""
    return [rel for rel, text in generated_files().items()
            if not (out / rel).is_file() or (out / rel).read_text(encoding="utf-8") != text]


def write(out: Path) -> list[Path]:
    written = []
    for rel, text in generated_files().items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
        written.append(path)
    return written


def add_config_docs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("docs"),
                   help=f"docs folder: writes {MARKDOWN_NAME} and {SCHEMA_DIR}/*.schema.json there (default: docs)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 when the files under --out are not what the models give now")


def cli_config_docs(args: argparse.Namespace) -> int:
    out: Path = args.out
    if args.check:
        stale = stale_files(out)
        for rel in stale:
            print(f"out of date: {out / rel}", file=sys.stderr)
        if stale:
            print(f"regenerate with: {REGENERATE}", file=sys.stderr)
            return 1
        print(f"{out}: configuration docs and schemas are up to date")
        return 0
    for path in write(out):
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.cli.config_docs", description=__doc__.splitlines()[0])
    add_config_docs_arguments(parser)
    return cli_config_docs(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

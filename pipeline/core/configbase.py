"""The base of every typed config: strict pydantic models read from safe YAML, paths relative to the file."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, ValidationInfo

from pipeline.core.errors import ConfigError
from pipeline.core.yamlio import line_of, load_yaml


def _relative_to_config(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    value = value.expanduser()
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return value


RelPath = Annotated[Path, AfterValidator(_relative_to_config)]


def int_or_auto(minimum: int) -> Any:
    """The type of a setting that is an integer of at least ``minimum`` or ``auto``."""
    what = "a positive integer" if minimum == 1 else f"{minimum} or more,"

    def check(value: int | str) -> int | str:
        if isinstance(value, int) and value < minimum:
            raise ValueError(f"must be {what} or 'auto', got {value}")
        return value

    return Annotated[int | Literal["auto"], AfterValidator(check)]


#: a positive integer or ``auto``
PositiveOrAuto = int_or_auto(1)
#: 0 or more, or ``auto``
CountOrAuto = int_or_auto(0)


def has_glob(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` holds a glob pattern (``*``, ``?``, ``[``)."""
    return any(ch in os.fspath(path) for ch in "*?[")


def glob_matches(pattern: Path) -> list[Path]:
    """The paths matching the absolute ``pattern``, sorted."""
    return sorted(Path(pattern.anchor).glob(str(pattern.relative_to(pattern.anchor))))


def is_remote_path(text: str | os.PathLike[str]) -> bool:
    """True for a path GDAL would not treat as a plain local file: a ``/vsi...`` virtual file
    system (``/vsicurl/``, ``/vsimem/``, ``/vsizip/``, ...) or a URL (``scheme://``)."""
    value = os.fspath(text).strip()
    return value.lower().startswith("/vsi") or "://" in value


#: A scene id names output folders and files: ASCII letters, digits, ``.``, ``_`` and ``-``,
#: not starting with a dot (so never ``.`` or ``..``), at most :data:`SCENE_ID_MAX` characters.
SCENE_ID_MAX = 120
_SCENE_ID = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{SCENE_ID_MAX - 1}}}")
SCENE_ID_RULE = (f"use 1 to {SCENE_ID_MAX} letters, digits, '.', '_' or '-', not starting with '.' "
                 "(the id names output folders and files)")


def is_safe_scene_id(value: str) -> bool:
    """True when ``value`` can be used as a scene id (:data:`SCENE_ID_RULE`)."""
    return bool(_SCENE_ID.fullmatch(value))


def scene_id_from_name(name: str) -> str:
    """A safe scene id made from a product or folder name: characters outside the safe set
    become ``_``, leading dots are dropped, at most :data:`SCENE_ID_MAX` characters
    (``scene`` when nothing is left)."""
    text = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")[:SCENE_ID_MAX]
    return text or "scene"


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors, values are not coerced loosely."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _format_validation(path: Path, data: Any, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        field = ".".join(str(p) for p in loc) or "(top level)"
        line = line_of(data, loc)
        where = f"{path}:{line}" if line else str(path)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required field missing"
        lines.append(f"{where}: {field}: {msg}")
    return "\n".join(lines)


def validate_data(model: type[Strict], data: Any, path: Path) -> Any:
    """Validate ``data`` read from ``path`` into ``model`` (paths relative to the file's folder);
    errors name the file, the line and the field."""
    try:
        return model.model_validate(data, context={"base_dir": Path(path).resolve().parent})
    except ValidationError as exc:
        raise ConfigError(_format_validation(Path(path), data, exc)) from None


def load_strict(model: type[Strict], path: Path, check: Callable[[Any], list[tuple[tuple[str, ...], str]]] | None = None
                ) -> Any:
    """Read ``path`` (strict, safe YAML) into ``model``; errors name the file, the line and the field.

    ``check`` returns further problems of a valid config as (field location, message); paths in the
    file are relative to its folder; the result's ``source`` is the file.
    """
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    if "source" in data:
        raise ConfigError(f"{path}:{line_of(data, ('source',))}: source: unknown key")
    cfg = validate_data(model, data, path)
    if check is not None:
        problems = [f"{path}:{line_of(data, loc) or '?'}: {'.'.join(loc)}: {msg}" for loc, msg in check(cfg)]
        if problems:
            raise ConfigError("\n".join(problems))
    return cfg.model_copy(update={"source": path.resolve()})

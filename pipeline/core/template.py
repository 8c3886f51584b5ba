"""Scene templates: one scene YAML without its product, for the products a region finds.

A template holds every setting of a scene (dem, model, mask, postprocess,
grid, output options ...) but not where the bands are: ``scene.safe``,
``scene.bands_dir``, ``scene.bands``, ``scene.scl``, ``scene.id`` and
``scene.acquisition_date`` come from each product. Paths in the template are
relative to the template file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pipeline.core.config import AoiSection, SceneConfig, _model_fit
from pipeline.core.configbase import validate_data
from pipeline.core.errors import ConfigError
from pipeline.core.yamlio import line_of, load_yaml

#: ``scene`` keys each product sets; a template that sets them is an error
PRODUCT_KEYS = ("safe", "bands_dir", "bands", "scl", "id", "acquisition_date")


def load_template(path: Path, region: Path | None = None) -> dict[str, Any]:
    """The template's data, checked by validating it with a placeholder product; errors name the
    template file, the line and the field (and the region file that names it)."""
    path = Path(path)
    named = f" (template of {region})" if region else ""
    if not path.is_file():
        raise ConfigError(f"{region or path}: template: file not found: {path}")
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}{named}: expected a mapping of sections at the top level")
    scene = data.get("scene") or {}
    if not isinstance(scene, dict):
        raise ConfigError(f"{path}:{line_of(data, ('scene',)) or '?'}{named}: scene: expected a mapping")
    for key in ("source", *(f"scene.{k}" for k in PRODUCT_KEYS)):
        loc = tuple(key.split("."))
        if (scene if len(loc) == 2 else data).get(loc[-1]) is not None:
            raise ConfigError(f"{path}:{line_of(data, loc) or '?'}{named}: {key}: a template does not name "
                              "a product; the region finds them (products:)")
    scene_config(path, data, {"safe": path.parent / "placeholder.SAFE"})
    return data


def scene_config(path: Path, data: dict[str, Any], product: dict[str, Any], aoi: AoiSection | None = None
                 ) -> SceneConfig:
    """The scene config of one product: the template ``data`` (read from ``path``) with the
    ``product``'s scene keys, and the region's ``aoi`` where the template has none."""
    merged = copy.deepcopy(data)
    merged["scene"] = {**(data.get("scene") or {}), **product}
    if aoi is not None and merged.get("aoi") is None:
        merged["aoi"] = aoi.model_dump()
    cfg: SceneConfig = validate_data(SceneConfig, merged, path)
    problems = [f"{path}: {'.'.join(loc)}: {msg}" for loc, msg in _model_fit(cfg)]
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg.model_copy(update={"source": Path(path).resolve()})

"""The region config: the nightly job's scenes, the products it finds, one output tree.

``region.yaml`` is read like a scene config (:mod:`pipeline.core.config`): strict, paths relative
to the file, errors naming the file, the line and the field.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from pydantic import Field, model_validator

from pipeline.core.config import AoiSection, DaskSection, OutputSection
from pipeline.core.configbase import PositiveOrAuto, RelPath, Strict, glob_matches, has_glob, load_strict
from pipeline.core.errors import ConfigError


class ProductSearch(Strict):
    """Where a region's Sentinel-2 products arrive, and which of them a night uses."""

    paths: list[RelPath] = Field(
        default_factory=list,
        description="globs of SAFE products (.SAFE folders or their .zip) or of per-band folders (date and level "
        "from the folder name: 20180910, L2A)",
    )
    stac: list[RelPath] = Field(
        default_factory=list,
        description="STAC ItemCollection JSON files on disk (asset files must be local; relative hrefs are "
        "relative to the JSON file)",
    )
    start: dt.date | None = Field(None, description="first sensing day (UTC) used, inclusive")
    end: dt.date | None = Field(None, description="last sensing day (UTC) used, inclusive; default: none")
    last_days: int | None = Field(
        None, ge=1, description="instead of start: the window holds the last N days up to end (default: today)",
    )
    max_cloud_cover: float | None = Field(
        None, ge=0, le=100, allow_inf_nan=False,
        description="skip products whose metadata states more cloud cover (percent of the tile)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ProductSearch:
        if not self.paths and not self.stac:
            raise ValueError("give products.paths (folder globs) or products.stac (ItemCollection files)")
        if self.start is not None and self.last_days is not None:
            raise ValueError("give products.start or products.last_days, not both")
        if self.start and self.end and self.start > self.end:
            raise ValueError(f"products.start {self.start} is after products.end {self.end}")
        return self

    def window(self, today: dt.date) -> tuple[dt.date | None, dt.date | None]:
        """The date window (first, last day; None: open) on the night of ``today`` (UTC)."""
        if self.last_days is None:
            return self.start, self.end
        end = self.end or today
        return end - dt.timedelta(days=self.last_days - 1), end


class RegionConfig(Strict):
    """The nightly job: scenes found in product folders and catalogues or listed, one output tree."""

    name: str = "region"
    scenes: list[RelPath] = Field(default_factory=list, description="scene YAML files (globs allowed)")
    products: ProductSearch | None = Field(None, description="products the job finds by itself")
    template: RelPath | None = Field(
        None,
        description="scene YAML for the products found: every setting of a scene (dem, model, mask, "
        "postprocess, grid ...) without scene.safe, scene.bands_dir or scene.bands",
    )
    aoi: AoiSection | None = Field(
        None, description="area of interest: products whose footprint misses it are skipped, scenes are cut to it",
    )
    output: OutputSection = Field(default_factory=dict, validate_default=True)  # type: ignore[arg-type]
    dask: DaskSection = DaskSection()
    retries: int = Field(1, ge=0)
    scenes_in_flight: PositiveOrAuto = Field(
        "auto",
        description="scenes run at once (each scene's blocks use every worker; a second scene keeps them busy "
        "while the first writes its outputs in the job's process, about 1.2 GB there per full-size scene in flight): a "
        "positive integer, or auto: half the cluster's worker processes, 1 to 4",
    )
    source: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _work(self) -> RegionConfig:
        if not self.scenes and self.products is None:
            raise ValueError("give scenes (scene YAML files) or products (where the job finds them)")
        if self.products is not None and self.template is None:
            raise ValueError("products need a template: the scene YAML every product runs with")
        return self


def load_region_config(path: Path) -> RegionConfig:
    """Read and validate a region YAML file (scene globs are expanded, the template is checked)."""
    cfg: RegionConfig = load_strict(RegionConfig, path)
    if cfg.template is not None:
        from pipeline.core.template import load_template

        load_template(cfg.template, path)
    expanded: list[Path] = []
    for p in cfg.scenes:
        if has_glob(p):
            matches = glob_matches(p)
            if not matches:
                raise ConfigError(f"{path}: scenes: pattern {p} matches no file")
            expanded += matches
        else:
            expanded.append(p)
    return cfg.model_copy(update={"scenes": expanded})

"""The night's work of a region: its scene YAML files, the products it finds, and how each is run.

A found product runs with the region's template; a zipped one is unpacked for its run, or left
packed when its recorded run is still valid.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.core.config import SceneConfig
from pipeline.core.errors import PipelineError
from pipeline.core.region_config import RegionConfig
from pipeline.run.products import Filters, Product, find_products
from pipeline.run.region import SceneOutcome, _attempt_scene, _Work

log = logging.getLogger(__name__)


def night_work(cfg: RegionConfig, today: dt.date) -> tuple[list[_Work], list[SceneOutcome]]:
    """The scenes to run tonight (the listed scene YAML files, then the products found, oldest
    first) and the products found but not used, as ``excluded`` outcomes with their reasons."""
    work = [_Work(str(p), yaml=p) for p in cfg.scenes]
    excluded: list[SceneOutcome] = []
    search = cfg.products
    if search is None:
        return work, excluded
    start, end = search.window(today)
    products, skipped = find_products(search.paths, search.stac,
                                      Filters(start, end, search.max_cloud_cover, region_aoi(cfg)))
    window = f"{start or 'any time'} to {end or 'now'}"
    log.info("region %s: %d product(s) found for %s, %d not used", cfg.name, len(products) + len(skipped),
             window, len(skipped))
    for s in skipped:
        log.info("not used: %s: %s", s.source, s.reason)
        excluded.append(SceneOutcome(config=s.source, status="excluded", scene_id=s.id, reason=s.reason,
                                     **_described(s.product)))
    work += [_Work(p.source, product=p) for p in products]
    return work, excluded


def region_aoi(cfg: RegionConfig) -> Any:
    """The region's area of interest as a lon/lat geometry; None without one."""
    if cfg.aoi is None:
        return None
    import shapely
    from rasterio.crs import CRS

    from pipeline.stack.scene_grid import aoi_bounds

    bounds, geoms, _ = aoi_bounds(cfg.aoi, CRS.from_epsg(4326))
    return shapely.union_all(geoms) if geoms else shapely.box(*bounds)


def _described(product: Product | None) -> dict[str, Any]:
    """What the state and the region's page show of a product found: sensing time, footprint."""
    if product is None:
        return {}
    import shapely

    footprint = None
    if product.footprint is not None:
        footprint = shapely.geometry.mapping(product.footprint)
    return {"sensing": product.sensing.isoformat() if product.sensing else None, "footprint": footprint}


class ProductJobs:
    """Runs the products of one night with the region's template."""

    def __init__(self, cfg: RegionConfig, completed: dict[str, dict[str, dict[str, Any]]]) -> None:
        from pipeline.core.template import load_template

        assert cfg.template is not None
        self.cfg, self.completed = cfg, completed
        self.template = load_template(cfg.template, cfg.source)
        self._models: dict[Path, str] = {}
        self._keys: dict[str, str] = {}

    def attempt(self, product: Product, force: bool, client: Any, tag: str) -> SceneOutcome:
        """Run ``product`` (retrying as a scene YAML's run is retried); never raises for its failure."""
        from pipeline.run.product_scenes import product_scene, unpacked

        if product.kind == "safe_zip" and (done := self._still_valid(product, force)) is not None:
            return done

        @contextmanager
        def scene() -> Iterator[SceneConfig]:
            with unpacked(product, self.cfg) as safe:
                yield product_scene(product, self.cfg, self.template, safe)

        outcome = _attempt_scene(scene, product.source, self.cfg, force, client, tag)
        for key, value in _described(product).items():
            setattr(outcome, key, value)
        return outcome

    def remember(self, product: Product, outcome: SceneOutcome) -> None:
        """Keep a zipped product's key with its run's record (after :func:`record_run`)."""
        key = self._keys.get(product.source)
        if key is None or not outcome.geopackage:
            return
        record = self.completed[product.source][str(Path(outcome.geopackage).parent)]
        record.update(zip_key=key, n_polygons=outcome.n_polygons)

    def _still_valid(self, product: Product, force: bool) -> SceneOutcome | None:
        """The outcome of a zipped product whose recorded run is still valid (not unpacked again)."""
        from pipeline.run.product_scenes import model_checksums, product_scene, zip_key, zip_record

        try:
            scene_cfg = product_scene(product, self.cfg, self.template)
            key = zip_key(product, scene_cfg, model_checksums(scene_cfg, self._models))
        except (PipelineError, OSError) as exc:
            log.debug("%s: no key for its recorded run (%s)", product.source, exc)
            return None
        self._keys[product.source] = key
        if force:
            return None
        for rec in (self.completed.get(product.source) or {}).values():
            if zip_record(rec, key) is not None:
                log.info("%s: up to date (%s), left packed", product.source, Path(rec["geopackage"]).parent)
                return SceneOutcome(config=product.source, status="skipped", scene_id=rec.get("scene_id"),
                                    geopackage=str(rec["geopackage"]), n_polygons=rec.get("n_polygons"),
                                    seconds=0.0, **_described(product))
        return None

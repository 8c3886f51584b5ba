"""Typed configuration for scene and region runs.

``scene.yaml`` and ``region.yaml`` are parsed with a strict safe loader
(:mod:`pipeline.core.yamlio`) into pydantic models that forbid unknown keys. Paths
are relative to the YAML file that names them. Errors name the file, the line
and the field, for example::

    scene.yaml:7: dem.path: file not found: /data/dem.tif
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.configbase import (
    SCENE_ID_RULE,
    PositiveOrAuto,
    RelPath,
    Strict,
    is_remote_path,
    is_safe_scene_id,
    load_strict,
)
from pipeline.core.errors import PipelineError

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "default.safetensors"


class SceneSection(Strict):
    """Where the Sentinel-2 bands come from. Exactly one of safe, bands_dir, bands."""

    id: str | None = Field(None, description="scene id used in outputs; default from the product name")
    safe: RelPath | None = Field(None, description="Sentinel-2 L1C or L2A .SAFE directory")
    bands_dir: RelPath | None = Field(None, description="folder of per-band GeoTIFF/COG/JP2 files (names contain B02, B8A, ...)")
    bands: dict[str, RelPath] | None = Field(None, description="explicit mapping band name -> file")
    scl: RelPath | None = Field(None, description="scene classification layer (L2A SCL) for per-band inputs")
    dn_offset: float = Field(0.0, allow_inf_nan=False, description="additive offset of per-band files: reflectance = (DN + offset) / quantification; SAFE products read it from their metadata")
    quantification: float = Field(10000.0, gt=0, allow_inf_nan=False, description="quantification value of per-band files")
    nodata: float | None = Field(0.0, description="DN no-data value of per-band files (JP2/TIFF without a nodata tag)")
    acquisition_date: dt.date | None = None
    level: Literal["L1C", "L2A"] | None = Field(
        None,
        description=(
            "processing level of per-band files (L1C top of atmosphere, L2A surface reflectance); "
            "SAFE products read it from their metadata. Checked against the levels the models serve"
        ),
    )

    allow_vrt: bool = Field(
        False,
        description="accept GDAL VRT files as band or SCL files (sources must be local GeoTIFF/COG or "
        "JPEG 2000 files; raw-file bands and Python pixel functions are always refused)",
    )
    verify_checksums: bool = Field(
        True,
        # not part of a run's fingerprint (model_dump leaves it out): it checks inputs, it does not
        # change results
        exclude=True,
        description="SAFE products: check the band files and SCL a run reads, and the product metadata, "
        "against the MD5 checksums listed in manifest.safe (a flipped bit in a JPEG 2000 codestream "
        "otherwise decodes to wrong pixels without an error); a mismatch is an error. Costs one read "
        "of those files (about 2 s per GB on one core; files already verified by this process are not hashed again)",
    )

    @field_validator("id")
    @classmethod
    def _safe_id(cls, value: str | None) -> str | None:
        if value is not None and not is_safe_scene_id(value):
            raise ValueError(f"scene.id {value!r} is not a safe name: {SCENE_ID_RULE}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> SceneSection:
        given = [k for k in ("safe", "bands_dir", "bands") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of scene.safe, scene.bands_dir or scene.bands"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


class DemSection(Strict):
    """Elevation model in any CRS and resolution, plus an optional precomputed slope."""

    path: RelPath
    void_values: list[float] = Field(
        default_factory=lambda: [-9999.0, -32768.0, -32767.0],
        description="values treated as voids besides the file's nodata and NaN (add 0 for SRTM-style voids)",
    )
    slope: RelPath | None = Field(None, description="precomputed slope in degrees; default: Horn's method on the 10 m grid")
    allow_vrt: bool = Field(
        False,
        description="accept GDAL VRT files as DEM or slope (sources must be local GeoTIFF/COG or JPEG 2000 "
        "files; raw-file bands and Python pixel functions are always refused)",
    )


class AoiSection(Strict):
    """Area of interest: a bounding box with its CRS, or a vector file."""

    bbox: tuple[float, float, float, float] | None = None
    crs: str = "EPSG:4326"
    path: RelPath | None = None

    @model_validator(mode="after")
    def _one(self) -> AoiSection:
        if (self.bbox is None) == (self.path is None):
            raise ValueError("give exactly one of aoi.bbox or aoi.path")
        if self.bbox is not None and not (self.bbox[2] > self.bbox[0] and self.bbox[3] > self.bbox[1]):
            raise ValueError("aoi.bbox must be [minx, miny, maxx, maxy] with max > min")
        return self


class GridSection(Strict):
    crs: str = Field("auto", description="'auto' = the scene's UTM zone, or any CRS string (EPSG:32633)")
    resolution: float = Field(10.0, gt=0, allow_inf_nan=False, description="pixel size in units of grid.crs")
    block_size: int = Field(2048, ge=256, le=16384, description="processing block edge in pixels")


class MaskSection(Strict):
    """What the valid-data mask excludes: Sentinel-2 L2A scene classes (SCL), and the clouds a detector
    finds in L1C scenes, which have no SCL."""

    cloud: bool = Field(True, description="exclude the SCL cloud classes (8, 9: medium and high probability)")
    cloud_shadow: bool = Field(True, description="exclude the SCL cloud shadow class (3)")
    cirrus: bool = Field(True, description="exclude the SCL thin cirrus class (10)")
    snow: bool = Field(True, description="exclude the SCL snow and ice class (11)")
    water: bool = Field(False, description="exclude the SCL water class (6)")
    cloud_buffer_m: float = Field(
        40.0, ge=0, le=1000,
        description="grow excluded cloud, cloud shadow and cirrus areas (SCL) and detected clouds by this "
        "distance: cloud edges are bright and hazy and are otherwise mistaken for fresh scars",
    )
    cloud_detector: Literal["auto", "s2cloudless", "none"] = Field(
        "auto",
        description="cloud mask computed from the bands: auto = s2cloudless for L1C scenes that have its "
        "bands (B01 B02 B04 B05 B08 B8A B09 B10 B11 B12; a warning and no cloud mask when one is missing), "
        "the SCL classes above for L2A; s2cloudless = always (an error when a band is missing or the scene "
        "is L2A); none = no detector (an SCL still excludes its classes). Detected clouds are the mean "
        "s2cloudless probability over 220 m above cloud_probability, grown by 110 m + cloud_buffer_m; "
        "cloud shadows are not detected",
    )
    cloud_probability: float = Field(
        0.4, gt=0, lt=1, allow_inf_nan=False,
        description="s2cloudless threshold: pixels whose cloud probability, averaged over 220 m, is above "
        "this are clouds (lower masks more: haze and bright ground too)",
    )

    def buffered_scl_classes(self) -> list[int]:
        """Excluded classes whose areas are grown by ``cloud_buffer_m`` (clouds, shadows, cirrus)."""
        return [c for c in self.excluded_scl_classes() if c in (3, 8, 9, 10)]

    def excluded_scl_classes(self) -> list[int]:
        classes = [0, 1]  # no data, saturated/defective
        if self.cloud_shadow:
            classes.append(3)
        if self.water:
            classes.append(6)
        if self.cloud:
            classes += [8, 9]
        if self.cirrus:
            classes.append(10)
        if self.snow:
            classes.append(11)
        return sorted(classes)


class ModelSection(Strict):
    path: RelPath | list[RelPath] = Field(DEFAULT_MODEL, description="model artefact, or a list for an ensemble")
    weights: list[Annotated[float, Field(allow_inf_nan=False)]] | None = Field(None, description="ensemble member weights")
    ensemble: Literal["mean", "vote"] = "mean"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    batch_size: PositiveOrAuto = Field(
        "auto", description="windows per forward pass (a positive integer), or auto: the device's policy")
    overlap: int = Field(32, ge=0, description="px shared by neighbouring windows; smaller than the model's tile size")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    tta: bool = False
    uncertainty: bool = False

    @property
    def paths(self) -> list[Path]:
        return list(self.path) if isinstance(self.path, list) else [self.path]


#: The bands each postprocessing rule on the scene's reflectance reads.
RULE_BANDS: dict[str, tuple[str, ...]] = {"max_mean_ndvi": ("B04", "B08"), "max_mean_ndwi": ("B03", "B08")}


class PostprocessSection(Strict):
    threshold: float | None = Field(None, gt=0, lt=1, description="default: the model artefact's threshold")
    opening_radius_m: float = Field(10.0, ge=0, allow_inf_nan=False)
    closing_radius_m: float = Field(10.0, ge=0, allow_inf_nan=False)
    min_area_m2: float = Field(500.0, ge=0, allow_inf_nan=False)
    max_hole_m2: float = Field(500.0, ge=0, allow_inf_nan=False)
    min_mean_slope_deg: float | None = Field(
        10.0, ge=0, le=90,
        description=(
            "drop detections whose mean slope is below this (degrees; null keeps all): bare fields, gravel bars "
            "and roads on flat ground. The 50 landslides of the labelled training patches have mean slopes of "
            "23.6 degrees and more"
        ),
    )
    max_mean_ndvi: float | None = Field(None, ge=-1, le=1, description="drop detections greener than this (needs B04, B08)")
    max_mean_ndwi: float | None = Field(
        None, ge=-1, le=1,
        description="drop detections wetter than this: mean NDWI (B03 - B08) / (B03 + B08); open water is "
        "above 0, bare soil and rock below (needs B03, B08)",
    )
    simplify_m: float = Field(0.0, ge=0, allow_inf_nan=False)

    def rule_bands(self) -> dict[str, tuple[str, ...]]:
        """The bands of each configured rule that reads the scene's reflectance (:data:`RULE_BANDS`)."""
        return {rule: bands for rule, bands in RULE_BANDS.items() if getattr(self, rule) is not None}


class OutputSection(Strict):
    dir: RelPath = Field(Path("output"), validate_default=True, description="output folder, relative to the YAML file")
    crs: Literal["grid", "EPSG:4326"] = "grid"
    probability_cog: bool = True
    mask_cog: bool = False
    quicklook: bool = True
    save_stack: bool = False

    @field_validator("dir", mode="before")
    @classmethod
    def _local_dir(cls, value: Any) -> Any:
        if isinstance(value, (str, os.PathLike)) and is_remote_path(value):
            raise ValueError(
                f"{os.fspath(value)!r} is not a local folder: GDAL virtual file systems (/vsi...) and "
                "URLs cannot hold the outputs; give a folder on disk"
            )
        return value


class DaskSection(Strict):
    scheduler: str | None = Field(None, description="address of an existing Dask scheduler; default: a local cluster")
    n_workers: int = Field(1, ge=1)
    threads_per_worker: int | None = Field(None, ge=1)
    memory_limit: str = "auto"


class ReferenceSection(Strict):
    """Known landslide polygons to score a run's detections against (object recall and precision)."""

    path: RelPath = Field(..., description="reference polygons: GeoPackage, shapefile or zipped shapefile")
    layer: str | None = Field(None, description="layer of a multi-layer file")
    iou: float = Field(0.1, gt=0, le=1, description="intersection over union that matches a detection to a reference")


class SceneConfig(Strict):
    scene: SceneSection
    dem: DemSection
    aoi: AoiSection | None = None
    channels: list[str] | None = Field(None, description="channels to stack; default: what the model asks for")
    grid: GridSection = GridSection()
    mask: MaskSection = MaskSection()
    model: ModelSection = ModelSection()
    postprocess: PostprocessSection = PostprocessSection()
    output: OutputSection = Field(default_factory=dict, validate_default=True)  # type: ignore[arg-type]
    dask: DaskSection = DaskSection()
    reference: ReferenceSection | None = Field(
        None, description="reference polygons; the run prints object recall and precision against them",
    )
    source: Path | None = Field(None, exclude=True, description="the YAML file this came from")


def model_tile_size(path: Path) -> int | None:
    """The window edge (``tile_size``) a model artefact declares, from its header only; None when
    the file is missing or not a readable artefact (loading the models reports that, with its own
    message)."""
    from pipeline.model.artefact import read_metadata

    try:
        return read_metadata(path).tile_size
    except (PipelineError, OSError, ValueError):
        return None


def _model_fit(cfg: SceneConfig) -> list[tuple[tuple[str, ...], str]]:
    """Settings that contradict the configured model artefacts: (field location, message).

    ``model.overlap`` must be smaller than the models' window (their ``tile_size``); otherwise a run
    fails only at inference, after the stack and the cluster have been set up.
    """
    tiles = {p: t for p in cfg.model.paths if (t := model_tile_size(p)) is not None}
    if tiles and cfg.model.overlap >= min(tiles.values()):
        path, tile = min(tiles.items(), key=lambda item: item[1])
        return [(("model", "overlap"),
                 f"{cfg.model.overlap} px must be smaller than the model's window of {tile} px "
                 f"(tile_size of {path}); the default is 32")]
    return []


def load_scene_config(path: Path) -> SceneConfig:
    """Read and validate a scene YAML file (and ``model.overlap`` against the models' window size)."""
    return load_strict(SceneConfig, path, check=_model_fit)  # type: ignore[no-any-return]

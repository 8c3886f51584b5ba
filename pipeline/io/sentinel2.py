"""Sentinel-2 scene inputs: the band files of a SAFE product, a folder or a band mapping.

Finding a scene (:func:`read_scene`) locates its band files and parses the
product metadata without opening a raster; :class:`SceneInputs` opens each band
when asked (:meth:`SceneInputs.open_band`) and checks the files a run reads
against the product's ``manifest.safe`` (:mod:`pipeline.io.safe_checksums`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.core.channels import S2_BANDS, canonical
from pipeline.core.config import SceneSection
from pipeline.core.configbase import is_safe_scene_id, scene_id_from_name
from pipeline.core.errors import ConfigError, InputError
from pipeline.io.allow_list import VrtPolicy, check_local_path
from pipeline.io.raster_source import RasterSource, open_raster
from pipeline.io.safe_checksums import ChecksumCheck, verify_manifest_checksums
from pipeline.io.safe_metadata import SafeMetadata, parse_safe_metadata

log = logging.getLogger(__name__)

#: Special values of Sentinel-2 band files (MTD ``Special_Values``): 0 is NODATA and
#: 65535 SATURATED. Neither is a measurement, so both become no data.
SAFE_SPECIAL_VALUES: tuple[float, ...] = (0.0, 65535.0)

#: Extensions of per-band raster files recognised in a folder.
RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".vrt")

_BAND_TOKEN = re.compile(r"(?<![A-Za-z0-9])(B(?:8A|0?[1-9]|1[0-2])|SCL)(?![A-Za-z0-9])", re.IGNORECASE)

#: Band files of a product by band (or ``SCL``) and resolution in metres.
_Candidates = dict[str, dict[int, Path]]


@dataclass(frozen=True)
class BandFile:
    """Where one Sentinel-2 band lives and how its DN become reflectance."""

    path: Path
    offset: float = 0.0
    quantification: float = 10000.0
    nodata: tuple[float, ...] = (0.0,)
    use_file_nodata: bool = True


@dataclass(frozen=True)
class SceneInputs:
    """The bands a scene can supply (found, not yet opened) plus product facts."""

    product: str                      # "S2_L2A", "S2_L1C" or "bands"
    scene_id: str
    acquisition_date: dt.date | None
    bands: dict[str, BandFile]
    scl: Path | None = None
    metadata: SafeMetadata | None = None
    origin: Path | None = None        # SAFE or folder the bands came from
    allow_vrt: bool = False           # scene.allow_vrt: band and SCL files may be (checked) VRTs
    #: SAFE products: their ``manifest.safe`` (None when the product has none, or for per-band files)
    manifest: Path | None = None
    #: what :meth:`with_verified_checksums` found (None: not asked); see :class:`ChecksumCheck`
    checksums: ChecksumCheck | None = None

    def __post_init__(self) -> None:
        # the id names output folders: never "..", a path or anything outside the safe set
        if not is_safe_scene_id(self.scene_id):
            raise InputError(f"{self.describe()}: scene id {self.scene_id!r} is not a safe name; set scene.id")

    def describe(self) -> str:
        """Human-readable origin for messages."""
        where = str(self.origin) if self.origin else "the band mapping"
        return f"{self.product} input {where}"

    @property
    def _vrt(self) -> VrtPolicy:
        return VrtPolicy(self.allow_vrt, "scene.allow_vrt")

    def open_band(self, name: str) -> RasterSource:
        """Open (metadata only) and validate the file of band ``name``."""
        bf = self.bands[name]
        return open_raster(bf.path, f"band {name}", nodata=bf.nodata, use_file_nodata=bf.use_file_nodata,
                           offset=bf.offset, scale=1.0 / bf.quantification, vrt=self._vrt)

    def open_scl(self) -> RasterSource | None:
        """Open the scene classification layer, if the scene has one."""
        if self.scl is None:
            return None
        return open_raster(self.scl, "scene classification layer (SCL)", use_file_nodata=False, vrt=self._vrt)

    def files_read(self, names: Sequence[str], *, scl: bool = True) -> list[tuple[Path, str]]:
        """(file, role) of what reading bands ``names`` (and the SCL) reads: the product metadata
        (offsets, quantification), the band files and the SCL file."""
        files: list[tuple[Path, str]] = []
        if self.metadata is not None and self.metadata.source is not None:
            files.append((self.metadata.source, "product metadata"))
        files += [(self.bands[n].path, f"band {n}") for n in dict.fromkeys(names) if n in self.bands]
        if scl and self.scl is not None:
            files.append((self.scl, "scene classification layer (SCL)"))
        return files

    def with_verified_checksums(self, names: Sequence[str], *, scl: bool = True,
                                threads: int | None = None) -> SceneInputs:
        """This scene with :attr:`checksums` set, after checking the files that reading bands
        ``names`` (and the SCL) reads against the checksums of the product's ``manifest.safe``.

        Raises :class:`InputError` naming every file whose checksum (or size) differs from the
        listed one, with both values. Files the manifest does not list, a product without a
        manifest and per-band inputs are not verified (:attr:`ChecksumCheck.verified` False, with
        the reason). Files are hashed in ``threads`` threads (default: up to 4, the CPU count);
        a file already verified in this process, unchanged since (size, modification time), is
        not hashed again.
        """
        files = self.files_read(names, scl=scl)
        if self.origin is None or not self.product.startswith("S2_"):
            check = ChecksumCheck(False, reason="per-band files carry no checksums (only SAFE products do)",
                                  unlisted=tuple(str(p) for p, _ in files))
        elif self.manifest is None:
            check = ChecksumCheck(False, reason=f"no manifest.safe in {self.origin}",
                                  unlisted=tuple(str(p) for p, _ in files))
            log.info("%s: no manifest.safe: checksums of the band files not verified", self.origin)
        else:
            check = verify_manifest_checksums(self.manifest, self.origin, files, threads=threads)
        return replace(self, checksums=check)


# ---------------------------------------------------------------------------
# finding a scene
# ---------------------------------------------------------------------------
def read_scene(section: SceneSection, verify: Sequence[str] | None = None) -> SceneInputs:
    """Find the bands of the scene described by ``section`` (SAFE, folder or mapping).

    ``verify``: the bands about to be read; with ``scene.verify_checksums`` (the default) the
    files that reading them reads are checked against the product's ``manifest.safe``
    (:meth:`SceneInputs.with_verified_checksums`), and the returned scene's ``checksums`` says
    what was verified.
    """
    inputs = _find_scene(section)
    return inputs if verify is None else verify_scene_files(inputs, section, verify)


def verify_scene_files(scene: SceneInputs, section: SceneSection, names: Sequence[str]) -> SceneInputs:
    """``scene`` with its ``checksums`` set: the files that reading bands ``names`` (and the SCL)
    reads checked against the product's ``manifest.safe`` when ``section.verify_checksums`` is on
    (:meth:`SceneInputs.with_verified_checksums`); raises :class:`InputError` on a mismatch."""
    if section.verify_checksums:
        return scene.with_verified_checksums(names)
    return replace(scene, checksums=ChecksumCheck(False, reason="off (scene.verify_checksums: false)"))


def _find_scene(section: SceneSection) -> SceneInputs:
    if section.safe is not None:
        inputs = read_safe(section.safe, section.id)
        if section.scl is not None:
            inputs = replace(inputs, scl=section.scl)
    elif section.bands_dir is not None:
        inputs = read_band_folder(section.bands_dir, section)
    else:
        assert section.bands is not None
        inputs = read_band_mapping(section.bands, section)
    return replace(inputs, allow_vrt=section.allow_vrt) if section.allow_vrt else inputs


def _band_token(name: str) -> str | None:
    """``B02``/``B8A``/``SCL`` named in a Sentinel-2 file name, or None."""
    tokens = {m.group(1).upper() for m in _BAND_TOKEN.finditer(Path(name).stem)}
    if len(tokens) != 1:
        return None
    token = tokens.pop()
    return token if token == "SCL" else canonical(token)


def _name_of(path: Path) -> str:
    """The last component of ``path`` made absolute (``data/..`` names its real folder, not ``..``)."""
    return Path(os.path.abspath(path)).name


# ---------------------------------------------------------------------------
# SAFE products
# ---------------------------------------------------------------------------
def read_safe(safe: Path, scene_id: str | None = None) -> SceneInputs:
    """Find the band files and metadata of a Sentinel-2 L1C or L2A SAFE directory.

    Bands are taken at their native resolution (L2A offers several). Files
    listed in the metadata but missing on disk are an error naming them.
    """
    safe = check_local_path(safe, "scene.safe", "a Sentinel-2 .SAFE directory on disk")
    mtd = _metadata_file(safe)
    meta = parse_safe_metadata(mtd)
    img = _image_folder(safe)
    candidates = _listed_files(safe, meta, mtd) if meta.image_files else _found_files(meta, img)
    bands: dict[str, BandFile] = {}
    for band in S2_BANDS:
        path = _pick_l2a_file(candidates, band)
        if path is not None:
            bands[band] = BandFile(path=path, offset=meta.offsets.get(band, 0.0),
                                   quantification=meta.quantification, nodata=SAFE_SPECIAL_VALUES,
                                   use_file_nodata=False)
    if not bands:
        raise InputError(f"{safe}: no band files found under {img}")
    scl = None
    if meta.level == "L2A":
        scl_candidates = candidates.get("SCL", {})
        scl = scl_candidates.get(20) or (scl_candidates[min(scl_candidates)] if scl_candidates else None)
        if scl is None:
            log.warning("%s: L2A product without SCL; the valid mask ignores scene classes", safe)
    if scene_id:
        product_id = scene_id.removesuffix(".SAFE")
    else:  # from the product's metadata or folder name: made safe to name output folders
        product_id = scene_id_from_name((meta.product_uri or _name_of(safe)).removesuffix(".SAFE"))
    log.info("SAFE %s: %s, baseline %s, %d bands, offsets %s", safe.name, meta.level,
             meta.processing_baseline, len(bands), sorted(set(meta.offsets.values())) or [0])
    manifest = safe / "manifest.safe"
    return SceneInputs(product=f"S2_{meta.level}", scene_id=product_id,
                       acquisition_date=meta.acquisition_date, bands=bands, scl=scl,
                       metadata=meta, origin=safe, manifest=manifest if manifest.is_file() else None)


def _metadata_file(safe: Path) -> Path:
    """The product metadata file of the SAFE directory ``safe`` (L2A first)."""
    if not safe.exists():
        raise InputError(f"{safe}: Sentinel-2 SAFE directory not found")
    if not safe.is_dir():
        raise InputError(f"{safe}: expected a Sentinel-2 .SAFE directory, found a file")
    mtd = [p for p in (safe / "MTD_MSIL2A.xml", safe / "MTD_MSIL1C.xml") if p.is_file()]
    if not mtd:
        raise InputError(
            f"{safe}: not a Sentinel-2 SAFE product: no MTD_MSIL2A.xml or MTD_MSIL1C.xml "
            "(products in the pre-2017 multi-granule format are not supported)"
        )
    return mtd[0]


def _image_folder(safe: Path) -> Path:
    """``GRANULE/<id>/IMG_DATA`` of a single-tile product."""
    granules = sorted(p for p in (safe / "GRANULE").glob("*") if p.is_dir()) if (safe / "GRANULE").is_dir() else []
    if not granules:
        raise InputError(f"{safe}: no GRANULE/<id> directory with band files")
    if len(granules) > 1:
        raise InputError(f"{safe}: {len(granules)} granules found; only single-tile products are supported")
    return granules[0] / "IMG_DATA"


def _listed_files(safe: Path, meta: SafeMetadata, mtd: Path) -> _Candidates:
    """The band files the metadata lists, which must lie inside the product and exist."""
    candidates: _Candidates = {}
    inside = os.path.normpath(os.path.abspath(safe))
    for path in (safe / f"{rel}.jp2" for rel in meta.image_files):
        if os.path.commonpath([inside, os.path.normpath(os.path.abspath(path))]) != inside:
            raise InputError(f"{path}: band file listed in {mtd.name} lies outside the product {safe}")
        token = _band_token(path.name)
        if token is None:
            continue
        if not path.is_file():
            raise InputError(f"{path}: band file listed in {mtd.name} is missing from the product")
        candidates.setdefault(token, {})[_res_of(path)] = path
    return candidates


def _found_files(meta: SafeMetadata, img: Path) -> _Candidates:
    """The band files under ``img`` by name, for metadata that lists none."""
    candidates: _Candidates = {}
    pattern = "R*m/*.jp2" if meta.level == "L2A" else "*.jp2"
    for path in sorted(img.glob(pattern)):
        token = _band_token(path.name)
        if token is not None:
            candidates.setdefault(token, {})[_res_of(path)] = path
    return candidates


def _pick_l2a_file(candidates: _Candidates, band: str) -> Path | None:
    by_res = candidates.get(band, {})
    if not by_res:
        return None
    native = S2_BANDS.get(band, 20)
    return by_res[native] if native in by_res else by_res[min(by_res)]


def _res_of(path: Path) -> int:
    """Resolution of a SAFE band file: from its R10m/R20m/R60m folder or name, else native."""
    m = re.search(r"_(10|20|60)m$", path.stem) or re.fullmatch(r"R(10|20|60)m", path.parent.name)
    if m:
        return int(m.group(1))
    token = _band_token(path.name)
    return S2_BANDS.get(token or "", 10)


# ---------------------------------------------------------------------------
# per-band files
# ---------------------------------------------------------------------------
def read_band_folder(folder: Path, section: SceneSection) -> SceneInputs:
    """Find per-band files in ``folder`` by the band token in their names (B02, b8a, ...).

    Two files naming the same band make the folder ambiguous: an error.
    A file named with ``SCL`` is used as the scene classification layer.
    """
    folder = check_local_path(folder, "scene.bands_dir", "a folder on disk")
    if not folder.is_dir():
        raise InputError(f"{folder}: scene.bands_dir: folder not found")
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in RASTER_SUFFIXES:
            continue
        token = _band_token(path.name)
        if token is not None:
            found.setdefault(token, []).append(path)
    clashes = {k: v for k, v in found.items() if len(v) > 1}
    if clashes:
        detail = "; ".join(f"{k}: {', '.join(p.name for p in v)}" for k, v in sorted(clashes.items()))
        raise InputError(
            f"{folder}: scene.bands_dir is ambiguous, several files per band ({detail}); "
            "keep one file per band or list them under scene.bands"
        )
    bands = {k: _band_file(v[0], section) for k, v in found.items() if k != "SCL"}
    if not bands:
        raise InputError(
            f"{folder}: scene.bands_dir holds no band files (expected names containing B01..B12 or B8A "
            f"with one of {', '.join(RASTER_SUFFIXES)})"
        )
    scl = section.scl or (found["SCL"][0] if "SCL" in found else None)
    return SceneInputs(product="bands", scene_id=section.id or scene_id_from_name(_name_of(folder)),
                       acquisition_date=section.acquisition_date, bands=bands, scl=scl, origin=folder)


def read_band_mapping(mapping: Mapping[str, Path], section: SceneSection) -> SceneInputs:
    """Per-band files given explicitly (band name -> file). Files are checked when opened."""
    bands: dict[str, BandFile] = {}
    for name, path in mapping.items():
        try:
            band = canonical(name)
        except ValueError:
            raise ConfigError(f"scene.bands.{name}: unknown band; expected one of {', '.join(S2_BANDS)}") from None
        if band not in S2_BANDS:
            raise ConfigError(f"scene.bands.{name}: not a Sentinel-2 band; expected one of {', '.join(S2_BANDS)}")
        if band in bands:
            raise ConfigError(f"scene.bands: band {band} given twice")
        bands[band] = _band_file(Path(path), section)
    if not bands:
        raise ConfigError("scene.bands: empty mapping; give at least one band file")
    first = next(iter(bands.values())).path
    return SceneInputs(product="bands", scene_id=section.id or scene_id_from_name(_name_of(first.parent)),
                       acquisition_date=section.acquisition_date, bands=bands, scl=section.scl, origin=None)


def _band_file(path: Path, section: SceneSection) -> BandFile:
    nodata = () if section.nodata is None else (float(section.nodata),)
    return BandFile(path=path, offset=section.dn_offset, quantification=section.quantification,
                    nodata=nodata, use_file_nodata=True)

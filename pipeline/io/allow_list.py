"""The input allow-list: which local files may be opened as rasters, and with which GDAL driver.

Inputs are local GeoTIFF/COG or JPEG 2000 files, and GDAL VRTs over such files
only where a config option opts in. Everything is decided from the file's first
bytes and the VRT's XML before GDAL parses the file, so opening an input never
reads an arbitrary file as pixels and never makes a network request.
"""

from __future__ import annotations

import functools
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import rasterio

from pipeline.core.configbase import is_remote_path
from pipeline.core.errors import InputError
from pipeline.io.gdal import error_detail
from pipeline.io.xmlutil import local_name

#: GDAL drivers of JPEG 2000 files, in order of preference (the first one this GDAL has is used).
JP2_DRIVERS = ("JP2OpenJPEG", "JP2KAK", "JP2ECW", "JP2MrSID", "JPEG2000")

#: What an input raster may be, for messages.
EXPECTED_FORMATS = "a GeoTIFF/COG or JPEG 2000 file"

#: Nested VRTs deeper than this are refused (and a VRT that names itself).
_VRT_MAX_DEPTH = 8


@dataclass(frozen=True)
class VrtPolicy:
    """Whether GDAL VRT inputs are accepted, and the config option that says so (named in messages)."""

    allowed: bool = False
    option: str = "allow_vrt"


#: VRT inputs off (the default of every config option that allows them).
NO_VRT = VrtPolicy()


def check_local_path(path: str | os.PathLike[str], role: str, expected: str = EXPECTED_FORMATS) -> Path:
    """``path`` as a :class:`Path` when it names a local file system path, else :class:`InputError`.

    GDAL virtual file systems (``/vsicurl/``, ``/vsimem/``, ``/vsizip/``, ...) and URLs
    (``scheme://``) are refused: inputs are local files, and opening one never makes a
    network request.
    """
    if is_remote_path(path):
        raise InputError(
            f"{os.fspath(path)}: {role} must be on the local disk; GDAL virtual file systems (/vsi...) "
            f"and URLs are not accepted (expected {expected})"
        )
    return Path(path)


@functools.lru_cache(maxsize=1)
def _jp2_driver() -> str:
    with rasterio.Env() as env:
        have = env.drivers()
    return next((name for name in JP2_DRIVERS if name in have), JP2_DRIVERS[0])


def _sniff_driver(path: Path) -> str | None:
    """The only GDAL driver ``path`` may be opened with, from its first bytes: GTiff (classic and
    BigTIFF, COG included), a JPEG 2000 driver (JP2 boxes or a raw codestream) or VRT; None for
    anything else."""
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "GTiff"
    if head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or head[:4] == b"\xff\x4f\xff\x51":
        return _jp2_driver()
    if b"<vrtdataset" in head.lower():
        return "VRT"
    return None


def input_driver(path: str | os.PathLike[str], role: str, vrt: VrtPolicy = NO_VRT) -> str:
    """Check ``path`` against the input allow-list and return the one GDAL driver to open it with.

    Accepted: a local regular file that is a GeoTIFF/COG or JPEG 2000 file, or, when ``vrt``
    allows it, a GDAL VRT whose sources are all accepted by the same rules (nested VRTs
    included) and that has no raw-file band (``VRTRawRasterBand``) and no Python pixel
    function. Everything is decided from the file's bytes and the VRT's XML before GDAL parses
    the file. Raises :class:`InputError` naming the file and what was expected.
    """
    return _allowed_driver(path, role, vrt, ())


def _allowed_driver(path: str | os.PathLike[str], role: str, vrt: VrtPolicy, chain: tuple[str, ...]) -> str:
    path = check_local_path(path, role)
    if not path.exists():
        raise InputError(f"{path}: {role} file not found")
    if path.is_dir():
        raise InputError(f"{path}: {role} must be a raster file, found a directory")
    if not path.is_file():
        raise InputError(f"{path}: {role} must be a regular file ({EXPECTED_FORMATS})")
    try:
        driver = _sniff_driver(path)
    except OSError as exc:
        raise InputError(f"{path}: {role} cannot be read ({error_detail(exc)})") from None
    if driver is None:
        raise InputError(
            f"{path}: {role} cannot be opened as a raster: expected {EXPECTED_FORMATS}"
            + (" or a GDAL VRT" if vrt.allowed else "")
        )
    if driver == "VRT":
        if not vrt.allowed:
            raise InputError(
                f"{path}: {role} is a GDAL VRT, and VRT inputs are off (expected {EXPECTED_FORMATS}); "
                f"set {vrt.option}: true to accept VRTs over local GeoTIFF/JPEG 2000 files"
            )
        _check_vrt(path, role, vrt, chain)
    return driver


def _check_vrt(path: Path, role: str, vrt: VrtPolicy, chain: tuple[str, ...]) -> None:
    """Refuse a VRT with a raw-file band, a Python pixel function or a source that the allow-list
    refuses. GDAL matches VRT element and attribute names without regard to case; so does this."""
    key = os.path.realpath(path)
    if key in chain or len(chain) >= _VRT_MAX_DEPTH:
        raise InputError(f"{path}: {role}: VRTs nested too deep or naming themselves")
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise InputError(f"{path}: {role} is not a valid GDAL VRT ({error_detail(exc)})") from None
    for el in root.iter():
        tag = local_name(el.tag).lower()
        attrs = {k.lower(): v for k, v in el.attrib.items()}
        if tag == "vrtrasterband" and attrs.get("subclass", "").strip().lower() == "vrtrawrasterband":
            raise InputError(
                f"{path}: {role}: band {attrs.get('band', '?')} is a VRTRawRasterBand (raw bytes of a file "
                f"read as pixels), which is never accepted; VRT bands must take their pixels from "
                f"{EXPECTED_FORMATS}"
            )
        language = (el.text or "").strip().lower() if tag == "pixelfunctionlanguage" else ""
        if tag == "pixelfunctioncode" or language not in ("", "c"):
            raise InputError(
                f"{path}: {role}: VRT with a Python pixel function is not accepted (only GDAL's built-in "
                "pixel functions)"
            )
        if tag in ("sourcefilename", "sourcedataset"):
            _check_vrt_source(path, role, el, vrt, (*chain, key))


def _check_vrt_source(path: Path, role: str, el: ET.Element, vrt: VrtPolicy, chain: tuple[str, ...]) -> None:
    """A VRT's ``<SourceFilename>`` (or ``<SourceDataset>``) ``el`` passes the allow-list itself."""
    attrs = {k.lower(): v for k, v in el.attrib.items()}
    text = (el.text or "").strip()
    if not text:
        raise InputError(f"{path}: {role}: VRT <{local_name(el.tag)}> is empty")
    relative = attrs.get("relativetovrt", "0").strip() == "1"
    if is_remote_path(text):
        check_local_path(text, f"{role} (a source of the VRT {path})")
    source = path.parent / text if relative else Path(text)
    _allowed_driver(source, f"{role} (a source of the VRT {path})", vrt, chain)

"""Reading an uploaded file: a Landslide4Sense HDF5 patch or a GeoTIFF chip, in physical units.

The file's kind is told from its first bytes (not its name). Both are read with the training
readers (:func:`pipeline.training.patch_readers.read_image`), so the app sees what training and
inference see: Landslide4Sense patches multiplied back by the dataset's divisors
(:data:`pipeline.core.channels.L4S_DIVISOR`), chips in the units the form (or the file's ``UNITS``
tag) declares, physical by default. The shape and band names are checked first, from the file's
header, so that a wrong file is refused with a message for the page before anything large is read.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine
from rasterio.crs import CRS

from pipeline.app.form import UploadError
from pipeline.core.channels import L4S_CHANNELS
from pipeline.core.errors import PipelineError
from pipeline.core.grid import Grid
from pipeline.training.patch_readers import UNITS, read_image

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: the largest image accepted, in pixels (rows x columns)
MAX_PIXELS = 64_000_000
#: the grid of an upload without georeference: pixel units, never written to a download
LOCAL_CRS = CRS.from_wkt('LOCAL_CS["pixels of an upload without georeference",LOCAL_DATUM["none",32767],'
                         'UNIT["metre",1],AXIS["X",EAST],AXIS["Y",NORTH]]')
_L4S_SHAPE = f"(128, 128, {len(L4S_CHANNELS)}): rows x columns x the channels {', '.join(L4S_CHANNELS)}, band-last"


@dataclass(frozen=True)
class InputImage:
    """An uploaded image in physical units, with its georeference when it had one."""

    filename: str
    kind: str  # "Landslide4Sense HDF5 patch" or "GeoTIFF chip"
    image: np.ndarray  # (C, H, W) float32 physical units
    valid: np.ndarray  # (H, W) bool
    channels: tuple[str, ...]
    units: str  # how the file stored its values
    crs: CRS | None = None
    transform: Affine | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.image.shape[1]), int(self.image.shape[2]))

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None and self.transform is not None

    def grid(self) -> Grid:
        """The image's grid: its own when georeferenced and north-up, else a local pixel grid."""
        rows, cols = self.shape
        t = self.transform
        if self.georeferenced and t is not None and t.b == 0 and t.d == 0 and t.e < 0:
            return Grid(self.crs, t, cols, rows)  # type: ignore[arg-type]
        return Grid(LOCAL_CRS, Affine(1.0, 0.0, 0.0, 0.0, -1.0, float(rows)), cols, rows)


def sniff(head: bytes) -> str | None:
    """``"h5"``, ``"tif"`` or None from a file's first bytes."""
    if head.startswith(HDF5_SIGNATURE):
        return "h5"
    if head[:4] in TIFF_SIGNATURES:
        return "tif"
    return None


def read_upload(filename: str, data: bytes | memoryview, units: str | None = None) -> InputImage:
    """The uploaded file's image; :class:`UploadError` with a message for the page when it is not
    a usable patch or chip. ``units`` (chips only): ``physical``, ``dn``, ``l4s``, or None for the
    file's ``UNITS`` tag (physical without one)."""
    name = filename or "the upload"
    if len(data) == 0:
        raise UploadError(f"{name} is empty (0 bytes): choose a Landslide4Sense .h5 patch or a GeoTIFF chip")
    kind = sniff(bytes(data[:8]))
    if kind is None:
        raise UploadError(f"{name} is neither an HDF5 file nor a GeoTIFF (its first bytes say neither): "
                          "upload a Landslide4Sense .h5 patch or a GeoTIFF chip")
    if units is not None and units not in UNITS:
        raise UploadError(f"unknown units {units!r}; choose one of {', '.join(UNITS)}")
    with tempfile.TemporaryDirectory(prefix="landslide-app-") as tmp:
        path = Path(tmp) / f"upload.{kind}"
        with open(path, "wb") as f:
            f.write(data)
        try:
            if kind == "h5":
                _check_h5(path, name)
                return _read(path, name, "Landslide4Sense HDF5 patch", None, None)
            crs, transform, tag = _check_tif(path, name)
            return _read(path, name, "GeoTIFF chip", units or tag, (crs, transform))
        except PipelineError as exc:
            raise UploadError(_for_page(str(exc), path, name)) from None


def _read(path: Path, name: str, kind: str, units: str | None,
          georef: tuple[CRS | None, Affine | None] | None) -> InputImage:
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        patch = read_image(path, units=units)
    crs, transform = georef if georef is not None else (None, None)
    return InputImage(name, kind, patch.image, patch.valid, patch.channels, units or "l4s", crs, transform)


def _for_page(message: str, path: Path, name: str) -> str:
    """A reader's message about the temporary copy, about the uploaded file instead."""
    text = message.replace(str(path), name)
    if "far above any reflectance" in text:
        text += " (here: choose the units of the chip in the form)"
    return text


def _check_h5(path: Path, name: str) -> None:
    """Refuse an HDF5 file without one (rows, columns, 14) numeric image."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            datasets = [k for k in h5 if isinstance(h5[k], h5py.Dataset)]
            key = "img" if "img" in datasets else (datasets[0] if len(datasets) == 1 else None)
            if key is None:
                raise UploadError(f"{name}: no image dataset 'img' in the HDF5 file (it has {datasets or 'none'}); "
                                  f"a Landslide4Sense patch holds 'img' of shape {_L4S_SHAPE}")
            shape, dtype = tuple(h5[key].shape), h5[key].dtype
    except OSError as exc:
        raise UploadError(f"{name}: not a readable HDF5 file ({exc})") from None
    if len(shape) != 3 or shape[-1] != len(L4S_CHANNELS) or min(shape) < 1:
        raise UploadError(f"{name}: {key!r} has shape {shape}, but a Landslide4Sense patch is {_L4S_SHAPE}")
    if dtype.kind not in "fiu":
        raise UploadError(f"{name}: {key!r} holds {dtype} values, not numbers")
    _check_size(shape[0], shape[1], name)


def _check_tif(path: Path, name: str) -> tuple[CRS | None, Affine | None, str]:
    """Refuse a TIFF without named bands (or the 14 Landslide4Sense ones); its CRS and transform
    (None without a CRS) and the units its ``UNITS`` tag declares (physical without one)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                count, rows, cols = src.count, src.height, src.width
                described = all(src.descriptions)
                crs, transform = src.crs, src.transform
                tag = src.tags().get("UNITS", "physical").lower()
    except (RasterioError, OSError) as exc:
        raise UploadError(f"{name}: not a readable GeoTIFF ({exc})") from None
    if not described and count != len(L4S_CHANNELS):
        raise UploadError(
            f"{name}: {count} band(s) without names: name every band in the GeoTIFF's band descriptions "
            f"(B02, B03, B04, ..., SLOPE, DEM), or give the {len(L4S_CHANNELS)} Landslide4Sense channels in "
            f"their order ({', '.join(L4S_CHANNELS)})"
        )
    _check_size(rows, cols, name)
    return (None, None, tag) if crs is None else (crs, transform, tag)


def _check_size(rows: int, cols: int, name: str) -> None:
    if rows * cols > MAX_PIXELS:
        raise UploadError(f"{name}: {rows} x {cols} pixels is more than this app takes ({MAX_PIXELS:,} pixels); "
                          "cut a smaller chip, or run the scene through python -m pipeline run")


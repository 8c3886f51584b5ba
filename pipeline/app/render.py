"""The files of a result: the PNGs the page shows and the downloads (``.npy`` and GeoTIFF).

PNGs are at most :data:`MAX_DISPLAY` pixels on their longest edge (larger chips are shown
decimated; downloads are always full size). The probability uses the report's colour ramp
(:data:`pipeline.report.rasters.PROBABILITY_RAMP`); pixels without valid input are transparent.
GeoTIFFs carry the upload's CRS and transform when it was a georeferenced GeoTIFF, and no
georeference otherwise.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np

from pipeline.app.compare import NO_DATA, Comparison, ModelResult
from pipeline.report.rasters import PROBABILITY_RAMP, display_factor, palette_png, ramp_table

MAX_DISPLAY = 1024
#: colours of the mask (not landslide, landslide) and of the overlay's landslide pixels
MASK_COLOURS = ((24, 24, 24), (255, 255, 255))
OVERLAY_FILL = np.array([255, 40, 40], dtype=np.float32)
OVERLAY_EDGE = np.array([255, 255, 0], dtype=np.uint8)
#: agreement ramp: no model flags the pixel -> every model does
AGREEMENT_RAMP: tuple[tuple[float, str], ...] = ((0.0, "#f2f2f2"), (0.5, "#f4a259"), (1.0, "#b2182b"))
_GREY = (128, 128, 128)


def _small(arr: np.ndarray) -> np.ndarray:
    """``arr`` (H, W, ...) decimated so that its longest edge is at most :data:`MAX_DISPLAY`."""
    f = display_factor(arr.shape[:2], MAX_DISPLAY)
    return arr[::f, ::f] if f > 1 else arr


def rgb_png(comparison: Comparison) -> bytes:
    """The true colour, or a grey square when the upload has no B04/B03/B02."""
    return _rgb_bytes(_small(_background(comparison)))


def _background(comparison: Comparison) -> np.ndarray:
    if comparison.rgb is not None:
        return comparison.rgb
    return np.full((*comparison.source.shape, 3), _GREY, dtype=np.uint8)


def _rgb_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def probability_png(result: ModelResult) -> bytes:
    """The probability on the colour ramp (codes 0..254), transparent without valid input."""
    p = _small(result.probability)
    codes = np.full(p.shape, 255, dtype=np.uint8)
    finite = np.isfinite(p)
    codes[finite] = np.clip(np.rint(p[finite] * 254), 0, 254).astype(np.uint8)
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[:255] = ramp_table(PROBABILITY_RAMP, 255)
    return palette_png(codes, colours, [255] * 255 + [0])


def mask_png(result: ModelResult) -> bytes:
    """The mask: landslide white on black, transparent without valid input."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[0], colours[1] = MASK_COLOURS
    alpha = [255, 255] + [0] * 254
    return palette_png(_small(result.mask), colours, alpha)


def overlay_png(comparison: Comparison, result: ModelResult) -> bytes:
    """The mask on the true colour: landslide pixels tinted red, their outline yellow."""
    rgb = _small(_background(comparison)).astype(np.float32)
    flagged = _small(result.mask) == 1
    rgb[flagged] = 0.45 * rgb[flagged] + 0.55 * OVERLAY_FILL
    out = rgb.astype(np.uint8)
    out[flagged & ~_eroded(flagged)] = OVERLAY_EDGE
    return _rgb_bytes(out)


def _eroded(mask: np.ndarray) -> np.ndarray:
    """``mask`` without the pixels that touch a pixel outside it (4-neighbours; the edge counts as inside)."""
    padded = np.pad(mask, 1, mode="edge")
    return (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
            & padded[1:-1, :-2] & padded[1:-1, 2:])


def agreement_colours(n_models: int) -> list[tuple[int, int, int]]:
    """The colour of each count 0..n_models on :data:`AGREEMENT_RAMP`."""
    return [tuple(int(v) for v in c) for c in ramp_table(AGREEMENT_RAMP, n_models + 1)]  # type: ignore[misc]


def agreement_png(comparison: Comparison) -> bytes:
    """How many models flag each pixel, on :data:`AGREEMENT_RAMP`; transparent without valid input."""
    n = len(comparison.results)
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[: n + 1] = agreement_colours(n)
    alpha = [255] * (n + 1) + [0] * (255 - n)
    return palette_png(_small(comparison.agreement), colours, alpha)


# -- downloads ---------------------------------------------------------------------------------
def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as a ``.npy`` file."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def geotiff_bytes(comparison: Comparison, array: np.ndarray, *, description: str,
                  tags: dict[str, str] | None = None) -> bytes:
    """One-band GeoTIFF of ``array`` (float32 with NaN no data, or uint8 with :data:`NO_DATA`),
    georeferenced as the upload was (when it was)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.io import MemoryFile

    source = comparison.source
    floating = array.dtype.kind == "f"
    profile = {"driver": "GTiff", "height": array.shape[0], "width": array.shape[1], "count": 1,
               "dtype": "float32" if floating else "uint8", "nodata": float("nan") if floating else NO_DATA,
               "compress": "deflate"}
    if source.georeferenced:
        profile.update(crs=source.crs, transform=source.transform)
    with warnings.catch_warnings(), rasterio.Env(GDAL_PAM_ENABLED="NO"), MemoryFile() as mem:
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with mem.open(**profile) as dst:
            dst.write(array.astype(profile["dtype"], copy=False), 1)
            dst.set_band_description(1, description)
            dst.update_tags(SOURCE=source.filename, **(tags or {}))
        return bytes(mem.read())


def model_tags(result: ModelResult) -> dict[str, str]:
    """The tags of a model's downloads: which model, at which threshold."""
    return {"MODEL": result.entry.name, "MODEL_SHA256": result.entry.artefact.sha256 or "",
            "THRESHOLD": f"{result.threshold:.6g}"}


def legend_css(colours: Sequence[tuple[int, int, int]]) -> list[str]:
    """CSS colours (``rgb(r, g, b)``) of ``colours``."""
    return [f"rgb({r}, {g}, {b})" for r, g, b in colours]

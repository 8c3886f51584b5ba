"""The report's raster layers: the probability as a colour-ramped PNG (no data transparent), the
"no valid input" shading, the uncertainty, and the true-colour quicklook.

Each layer covers the grid's footprint exactly (its bounds are the grid's, or for the quicklook
the part of the grid it was averaged from) and is at most ``max_size`` pixels on its longest
edge: a raster is read decimated by GDAL (averaging the valid pixels; from the COG's overviews
where it has them), never in full. Palette PNGs keep the layers small.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.probability import PROB_NODATA

#: Longest edge, in pixels, of a raster layer in the page.
MAX_SIZE = 2048

#: Colour ramps, as (position 0..1, "#rrggbb") stops.
PROBABILITY_RAMP: tuple[tuple[float, str], ...] = (
    (0.0, "#440154"), (0.25, "#3b528b"), (0.5, "#21918c"), (0.75, "#5ec962"), (1.0, "#fde725"))
POLYGON_RAMP: tuple[tuple[float, str], ...] = ((0.0, "#ffb000"), (0.5, "#ff2a00"), (1.0, "#ff00d4"))
UNCERTAINTY_RAMP: tuple[tuple[float, str], ...] = ((0.0, "#000004"), (0.5, "#b63679"), (1.0, "#fcfdbf"))
#: The shading of pixels without valid input: RGB and alpha.
NO_DATA_RGBA = (225, 225, 225, 165)


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def ramp_table(stops: Sequence[tuple[float, str]], n: int) -> np.ndarray:
    """(n, 3) uint8 colours of ``stops`` linearly interpolated at ``n`` positions from 0 to 1."""
    pos = np.array([s[0] for s in stops], dtype=np.float64)
    rgb = np.array([_rgb(s[1]) for s in stops], dtype=np.float64)
    t = np.linspace(0.0, 1.0, n)
    return np.stack([np.interp(t, pos, rgb[:, k]) for k in range(3)], axis=1).round().astype(np.uint8)


def css_gradient(stops: Sequence[tuple[float, str]]) -> str:
    """A CSS ``linear-gradient`` (left to right) of ``stops``."""
    return "linear-gradient(to right, " + ", ".join(f"{c} {p * 100:g}%" for p, c in stops) + ")"


def display_factor(shape: tuple[int, int], max_size: int = MAX_SIZE) -> int:
    """Smallest integer factor that brings the longest edge of ``shape`` to at most ``max_size``."""
    return max(1, math.ceil(max(shape) / max_size))


def palette_png(codes: np.ndarray, colours: np.ndarray, alpha: Sequence[int]) -> bytes:
    """A palette PNG of uint8 ``codes`` with ``colours`` (256, 3) and per-code ``alpha`` (256)."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(codes, dtype=np.uint8), mode="P")
    image.putpalette(np.asarray(colours, dtype=np.uint8).reshape(-1).tolist())
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=9, transparency=bytes(int(a) for a in alpha))
    return buf.getvalue()


@dataclass(frozen=True)
class ProbabilityLayers:
    """The probability and no-valid-input layers as PNGs (the latter None when every pixel is valid)."""

    probability_png: bytes
    no_data_png: bytes | None
    shape: tuple[int, int]  # (rows, cols) of the PNGs
    factor: float  # grid pixels per PNG pixel (the largest of the two axes)
    valid_fraction: float  # share of the PNG's pixels with a probability


def _read_decimated(path: Path, shape: tuple[int, int], max_size: int, resampling: str = "average") -> np.ndarray:
    """Band 1 of ``path`` read onto at most ``max_size`` pixels, the whole extent (GDAL skips no data
    when it averages). GDAL's auxiliary metadata is off: nothing is written beside the file."""
    import rasterio
    from rasterio.enums import Resampling

    with rasterio.Env(GDAL_PAM_ENABLED="NO"), rasterio.open(path) as src:
        rows, cols = src.height, src.width
        f = display_factor((rows, cols), max_size)
        out_shape = (max(1, math.ceil(rows / f)), max(1, math.ceil(cols / f))) if f > 1 else (rows, cols)
        return src.read(1, out_shape=out_shape, resampling=getattr(Resampling, resampling))


def probability_layers(path: Path, max_size: int = MAX_SIZE) -> ProbabilityLayers:
    """The colour-ramped probability (codes ``0..254`` -> :data:`PROBABILITY_RAMP`, 255 transparent)
    and the shading of the pixels without valid input, from ``probability.tif``."""
    import rasterio

    with rasterio.Env(GDAL_PAM_ENABLED="NO"), rasterio.open(path) as src:
        full = (src.height, src.width)
    codes = _read_decimated(path, full, max_size)
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[:PROB_NODATA] = ramp_table(PROBABILITY_RAMP, PROB_NODATA)
    alpha = [255] * PROB_NODATA + [0]
    prob_png = palette_png(codes, colours, alpha)
    missing = codes == PROB_NODATA
    no_data_png = None
    if missing.any():
        shade = np.zeros((256, 3), dtype=np.uint8)
        shade[1] = NO_DATA_RGBA[:3]
        no_data_png = palette_png(missing.astype(np.uint8), shade, [0, NO_DATA_RGBA[3]])
    factor = max(full[0] / codes.shape[0], full[1] / codes.shape[1])
    return ProbabilityLayers(prob_png, no_data_png, codes.shape, factor, float(1.0 - missing.mean()))


@dataclass(frozen=True)
class UncertaintyLayer:
    png: bytes
    vmax: float  # the value drawn in the ramp's last colour


def uncertainty_layer(path: Path, max_size: int = MAX_SIZE) -> UncertaintyLayer | None:
    """The uncertainty raster (float, NaN for no data) ramped from 0 to its 99th percentile; None
    when it holds no finite value."""
    import rasterio

    with rasterio.Env(GDAL_PAM_ENABLED="NO"), rasterio.open(path) as src:
        full = (src.height, src.width)
        nodata = src.nodata
    values = _read_decimated(path, full, max_size).astype(np.float32)
    finite = np.isfinite(values)
    if nodata is not None and not math.isnan(nodata):
        finite &= values != nodata
    if not finite.any():
        return None
    vmax = float(np.percentile(values[finite], 99))
    vmax = vmax if vmax > 0 else float(values[finite].max()) or 1.0
    codes = np.full(values.shape, 255, dtype=np.uint8)
    codes[finite] = np.clip(np.round(values[finite] / vmax * 254), 0, 254).astype(np.uint8)
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[:255] = ramp_table(UNCERTAINTY_RAMP, 255)
    return UncertaintyLayer(palette_png(codes, colours, [255] * 255 + [0]), vmax)


@dataclass(frozen=True)
class Quicklook:
    data: bytes
    mime: str
    cols_covered: int  # grid pixels covered by the image, from the grid's origin
    rows_covered: int


def quicklook_image(path: Path, grid_shape: tuple[int, int] | None, max_size: int = MAX_SIZE,
                    quality: int = 85) -> Quicklook:
    """The quicklook for the page: JPEG (``quality``) unless the PNG is smaller, downsampled to
    ``max_size`` if larger; the part of the grid it covers.

    The run averages the grid by an integer factor ``f`` over whole multiples of ``f`` pixels (the
    last partial block of each axis is left out): an image of ``w x h`` pixels on a grid of
    ``W x H`` covers ``w*f x h*f`` pixels from the grid's top-left corner. An image that does not
    fit that rule is taken to cover the whole grid."""
    from PIL import Image

    raw = path.read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        im.load()
        image = im.convert("RGB")
    w, h = image.size
    covered_cols, covered_rows = w, h
    if grid_shape is not None:
        rows, cols = grid_shape
        f = max(1, math.ceil(max(rows, cols) / max(w, h, 1)))
        for cand in (f, f - 1, f + 1):
            if cand >= 1 and cols // cand == w and rows // cand == h:
                covered_cols, covered_rows = w * cand, h * cand
                break
        else:
            covered_cols, covered_rows = cols, rows
    if max(w, h) > max_size:
        k = max(w, h) / max_size
        image = image.resize((max(1, round(w / k)), max(1, round(h / k))), Image.Resampling.BOX)
        raw = b""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, optimize=True)
    jpeg = buf.getvalue()
    if raw and path.suffix.lower() == ".png" and len(raw) <= len(jpeg):
        return Quicklook(raw, "image/png", covered_cols, covered_rows)
    return Quicklook(jpeg, "image/jpeg", covered_cols, covered_rows)

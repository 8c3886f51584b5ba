"""Reflectance of the demo's surface classes, the atmosphere above them, and their measurement from patches.

:data:`SPECTRA` holds the medians of the labelled Landslide4Sense patches per
class (:func:`patch_spectra`), turned into surface reflectance by inverting
:data:`ATMOSPHERE`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.channels import S2_BANDS, SLOPE
from pipeline.demo.sentinel2 import Product

#: Classes of :data:`SPECTRA`, in column order.
SPECTRA_CLASSES = ("forest", "meadow", "bare", "rock", "scar", "water", "cloud")
#: Surface reflectance per class (L2A, BOA); columns as in :data:`SPECTRA_CLASSES`.
#: Rule and source: medians of the 15 labelled Landslide4Sense patches (shared
#: ``l4s/train``, Sentinel-2 L1C top-of-atmosphere) per class of
#: :func:`patch_classes`, B8A = B08 (the patches have no B8A), inverted
#: through :data:`ATMOSPHERE` and clipped at 0 (:func:`patch_spectra`),
#: rounded to 4 decimals.
#: The patches hold no snow, so the scene has none. A class darker at the top
#: of the atmosphere than the path reflectance (B10 of water) is clipped to 0
#: at the surface. ``cloud`` is hand-set (the patches hold no clouds).
#: tests/test_demo.py recomputes these from the patches.
SPECTRA: dict[str, tuple[float, ...]] = {
    "B01": (0.0151, 0.0225, 0.0797, 0.0449, 0.0483, 0.0039, 0.55),
    "B02": (0.0189, 0.0301, 0.0957, 0.0699, 0.0689, 0.0036, 0.56),
    "B03": (0.0342, 0.0447, 0.1023, 0.0835, 0.0808, 0.0019, 0.57),
    "B04": (0.0226, 0.0380, 0.1071, 0.0937, 0.0904, 0.0007, 0.58),
    "B05": (0.0610, 0.0700, 0.1206, 0.0997, 0.1090, 0.0017, 0.59),
    "B06": (0.1777, 0.1545, 0.1612, 0.1275, 0.1486, 0.0071, 0.60),
    "B07": (0.2176, 0.1830, 0.1823, 0.1392, 0.1647, 0.0091, 0.60),
    "B08": (0.2253, 0.1859, 0.1655, 0.1316, 0.1663, 0.0070, 0.61),
    "B8A": (0.2229, 0.1839, 0.1637, 0.1302, 0.1646, 0.0069, 0.61),
    "B09": (0.2437, 0.1994, 0.1574, 0.1960, 0.1966, 0.0194, 0.58),
    "B10": (0.0040, 0.0080, 0.0080, 0.0140, 0.0040, 0.0000, 0.25),
    "B11": (0.1161, 0.1263, 0.2040, 0.1593, 0.1986, 0.0047, 0.45),
    "B12": (0.0526, 0.0660, 0.1628, 0.1176, 0.1516, 0.0023, 0.33),
}

#: L1C top of atmosphere ~ path + transmittance * surface (clear-sky, reflectance units). The path
#: terms are the dark-object values of the labelled Landslide4Sense patches (the 0.5th percentile of
#: each band's top-of-atmosphere reflectance; B8A as B08); the transmittances are typical clear-sky ones.
ATMOSPHERE: dict[str, tuple[float, float]] = {
    "B01": (0.078, 0.75), "B02": (0.050, 0.80), "B03": (0.030, 0.86), "B04": (0.016, 0.90),
    "B05": (0.015, 0.90), "B06": (0.020, 0.92), "B07": (0.022, 0.93), "B08": (0.019, 0.93),
    "B8A": (0.019, 0.94), "B09": (0.012, 0.35), "B10": (0.001, 0.05), "B11": (0.006, 0.92),
    "B12": (0.002, 0.88),
}


def class_spectrum(name: str, product: Product = "L2A") -> dict[str, float]:
    """Band -> reflectance of class ``name`` in :data:`SPECTRA`: surface (L2A) or top of atmosphere (L1C)."""
    if name not in SPECTRA_CLASSES:
        raise ValueError(f"class {name!r}: expected one of {', '.join(SPECTRA_CLASSES)}")
    col = SPECTRA_CLASSES.index(name)
    if product == "L2A":
        return {b: SPECTRA[b][col] for b in SPECTRA}
    return {b: ATMOSPHERE[b][0] + ATMOSPHERE[b][1] * SPECTRA[b][col] for b in SPECTRA}


def surface_from_toa(band: str, toa: float) -> float:
    """Invert the demo's atmosphere, ``toa = path + trans * surface``, clipped at 0."""
    path, trans = ATMOSPHERE[band]
    return max(0.0, (toa - path) / trans)


#: Fewest pixels a class needs in :func:`patch_spectra` to get a data-derived spectrum.
MIN_CLASS_PIXELS = 50
#: Classes of :func:`patch_classes`, in the order their pixel rules claim pixels.
PATCH_CLASSES = ("scar", "snow", "water", "rock", "bare", "forest", "meadow")


@dataclass(frozen=True)
class PatchSpectra:
    """What :func:`patch_spectra` found: per-class pixel counts and median spectra.

    ``toa``: median top-of-atmosphere reflectance per class and band (L1C,
    B8A copied from B08); ``surface``: the same inverted through
    :data:`ATMOSPHERE`, clipped at 0. Classes with fewer than
    :data:`MIN_CLASS_PIXELS` pixels have a count but no spectrum.
    """

    counts: dict[str, int]
    toa: dict[str, dict[str, float]]
    surface: dict[str, dict[str, float]]


def patch_classes(image: np.ndarray, mask: np.ndarray, channels: Sequence[str]) -> dict[str, np.ndarray]:
    """Boolean class masks of one Landslide4Sense patch (physical units, L1C TOA).

    Pixel rules, first rule wins (NDVI = (B08-B04)/(B08+B04), NDWI =
    (B03-B08)/(B03+B08), NDSI = (B03-B11)/(B03+B11)):

    - ``scar``: landslide pixels (mask 1); every other class is mask 0;
    - ``snow``: NDSI > 0.4 and B03 > 0.3 (bright; dark high-NDSI pixels are shadow or water);
    - ``water``: NDWI > 0 on slopes under 15 degrees (steeper NDWI > 0 pixels are terrain shadow);
    - ``rock`` (bare rock outcrop): NDVI < 0.25, B04 >= 0.06 (not shadow), slope >= 30 degrees;
    - ``bare`` (gravel, roads, field or clear-cut soil): the same on slopes under 15 degrees;
    - ``forest``: NDVI >= 0.65;
    - ``meadow``: 0.45 <= NDVI < 0.65.

    Pixels no rule claims (shadows, mixed NDVI 0.25-0.45, bare ground at 15-30
    degrees, which may be soil or rock) are left out.
    """
    idx = {c: i for i, c in enumerate(channels)}
    b03, b04, b08, b11 = (image[idx[c]].astype(np.float64) for c in ("B03", "B04", "B08", "B11"))
    slope = image[idx[SLOPE]]
    with np.errstate(divide="ignore", invalid="ignore"):
        ndvi = (b08 - b04) / (b08 + b04)
        ndwi = (b03 - b08) / (b03 + b08)
        ndsi = (b03 - b11) / (b03 + b11)
    finite = np.isfinite(image).all(axis=0) & np.isfinite(ndvi) & np.isfinite(ndwi) & np.isfinite(ndsi)
    bare_like = (ndvi < 0.25) & (b04 >= 0.06)
    rules = {
        "scar": mask == 1,
        "snow": (ndsi > 0.4) & (b03 > 0.3),
        "water": (ndwi > 0) & (slope < 15.0),
        "rock": bare_like & (slope >= 30.0),
        "bare": bare_like & (slope < 15.0),
        "forest": ndvi >= 0.65,
        "meadow": (ndvi >= 0.45) & (ndvi < 0.65),
    }
    free = finite.copy()
    out: dict[str, np.ndarray] = {}
    for name in PATCH_CLASSES:
        sel = rules[name] & free
        if name != "scar":
            sel &= mask == 0
        out[name] = sel
        free &= ~sel
    return out


def patch_spectra(root: Path) -> PatchSpectra:
    """Per-class pixel counts and median spectra of the labelled patches under ``root``.

    ``root`` is a folder with ``img``/``mask`` (e.g. the shared
    ``l4s/train``). Pixels are classed by :func:`patch_classes`; the median of
    each class's pixels over all patches is its spectrum. The patches carry
    no B8A: its value is B08's. Surface reflectance inverts the demo's
    atmosphere (:func:`surface_from_toa`).
    """
    from pipeline.training.patch_files import find_patches
    from pipeline.training.patch_readers import read_image, read_mask

    pixels: dict[str, list[np.ndarray]] = {c: [] for c in PATCH_CLASSES}
    channels: tuple[str, ...] | None = None
    for rec in find_patches(root, require_masks=True):
        patch = read_image(rec.image)
        assert rec.mask is not None
        mask, mask_valid = read_mask(rec.mask)
        channels = patch.channels
        valid = patch.valid & mask_valid
        for name, sel in patch_classes(patch.image, mask, channels).items():
            pixels[name].append(patch.image[:, sel & valid])
    assert channels is not None
    idx = {c: i for i, c in enumerate(channels)}
    counts: dict[str, int] = {}
    toa: dict[str, dict[str, float]] = {}
    surface: dict[str, dict[str, float]] = {}
    for name, parts in pixels.items():
        values = np.concatenate(parts, axis=1)
        counts[name] = int(values.shape[1])
        if counts[name] < MIN_CLASS_PIXELS:
            continue
        median = np.median(values.astype(np.float64), axis=1)
        toa[name] = {b: float(median[idx["B08" if b == "B8A" else b]]) for b in S2_BANDS}
        surface[name] = {b: surface_from_toa(b, v) for b, v in toa[name].items()}
    return PatchSpectra(counts, toa, surface)

"""Reading one training patch: its image in physical units, its mask, the channels asked for.

* Landslide4Sense HDF5 patches: dataset ``img`` is float64 (128, 128, 14)
  band-last in :data:`pipeline.core.channels.L4S_CHANNELS` order, ``mask`` is
  uint8 (128, 128) in {0, 1}.
* GeoTIFF chips: images are band-first; channel names come from the band
  descriptions (``B02``, ``SLOPE``...), from ``source_channels``, or are the
  Landslide4Sense order for 14 bands. Pixels that are nodata or non-finite in
  any band are invalid.

Every reader returns physical units (reflectance, degrees, metres; see
:data:`pipeline.core.channels.UNITS`). Landslide4Sense patches are multiplied
back by the dataset's published divisors (:data:`pipeline.core.channels.L4S_DIVISOR`).
Chips declare their units (``units``: ``physical``, ``dn`` or ``l4s``, from
the training config or the file's ``UNITS`` metadata tag) and are taken as
physical otherwise; a chip whose reflectance bands look like digital numbers
is refused rather than guessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.channels import L4S_CHANNELS, S2_BANDS, canonical, physical_factors
from pipeline.core.errors import ChannelError, InputError
from pipeline.training.patch_files import H5_SUFFIXES, TIF_SUFFIXES, PatchRecord

UNITS = ("physical", "dn", "l4s")
#: A reflectance above this in the median of a band means the values are not reflectance.
_MAX_MEDIAN_REFLECTANCE = 1.5


@dataclass(frozen=True)
class Patch:
    """One patch in memory (physical values, before normalization)."""

    image: np.ndarray  # (C, H, W) float32 physical units, in the order of ``channels``
    valid: np.ndarray  # (H, W) bool
    mask: np.ndarray | None  # (H, W) uint8 in {0, 1}
    channels: tuple[str, ...]


@dataclass(frozen=True)
class PatchFormat:
    """How patch files store their values: the names of unnamed GeoTIFF bands (``source_channels``)
    and the ``units`` of chips (see the module's docstring); None: what the files say."""

    source_channels: tuple[str, ...] | None = None
    units: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "source_channels", tuple(self.source_channels) if self.source_channels else None)


def canonical_channels(names: Sequence[str], where: str) -> tuple[str, ...]:
    """Canonical spellings of ``names``; :class:`ChannelError` naming ``where`` for an unknown or repeated one."""
    try:
        out = tuple(canonical(n) for n in names)
    except ValueError as exc:
        raise ChannelError(f"{where}: {exc}") from None
    if len(set(out)) != len(out):
        raise ChannelError(f"{where}: channel names repeat: {list(out)}")
    return out


def _h5_dataset(h5: object, path: Path, preferred: str) -> np.ndarray:
    import h5py

    assert isinstance(h5, h5py.File)
    if preferred in h5:
        return np.asarray(h5[preferred][()])
    datasets = [k for k in h5 if isinstance(h5[k], h5py.Dataset)]
    if len(datasets) == 1:
        return np.asarray(h5[datasets[0]][()])
    raise InputError(f"{path}: HDF5 dataset {preferred!r} not found (has {datasets})")


@dataclass(frozen=True)
class _Raw:
    """A patch file's bands as stored: (C, H, W) float32, valid pixels, band descriptions, units tag."""

    image: np.ndarray
    valid: np.ndarray
    descriptions: tuple[str | None, ...]
    units: str


def _read_h5_image(path: Path) -> _Raw:
    import h5py

    with h5py.File(path, "r") as h5:
        arr = _h5_dataset(h5, path, "img")
    if arr.ndim != 3:
        raise InputError(f"{path}: img must be (H, W, C) band-last, got shape {arr.shape}")
    image = np.ascontiguousarray(np.moveaxis(arr, -1, 0), dtype=np.float32)
    return _Raw(image, np.ones(image.shape[1:], dtype=bool), (None,) * image.shape[0], "l4s")


def _read_tif_image(path: Path) -> _Raw:
    import rasterio

    with rasterio.open(path) as src:
        return _Raw(src.read(out_dtype="float32"), src.dataset_mask() > 0, tuple(src.descriptions),
                    src.tags().get("UNITS", "physical").lower())


def _read_raw_image(path: Path) -> _Raw:
    suffix = path.suffix.lower()
    try:
        if suffix in H5_SUFFIXES:
            return _read_h5_image(path)
        if suffix in TIF_SUFFIXES:
            return _read_tif_image(path)
        raise InputError(f"{path}: unsupported patch format (expected .h5/.hdf5/.tif/.tiff)")
    except (OSError, KeyError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path}: cannot read patch: {exc}") from None


def _channel_names(path: Path, raw: _Raw, source_channels: Sequence[str] | None) -> tuple[str, ...]:
    count = raw.image.shape[0]
    if source_channels is not None:
        names = canonical_channels(source_channels, f"{path}: source_channels")
    elif all(raw.descriptions):
        names = canonical_channels([str(d) for d in raw.descriptions], f"{path}: band descriptions")
    elif count == len(L4S_CHANNELS):
        names = L4S_CHANNELS
    else:
        raise ChannelError(
            f"{path}: {count} bands without names; give data.source_channels "
            f"(the Landslide4Sense order {', '.join(L4S_CHANNELS)} is assumed only for 14 bands)"
        )
    if len(names) != count:
        raise ChannelError(f"{path}: {count} bands but {len(names)} channel names {list(names)}")
    return names


def read_image(path: Path, source_channels: Sequence[str] | None = None, units: str | None = None) -> Patch:
    """Read one image patch as (C, H, W) float32 physical values with its channel names and valid mask.

    ``units`` says how the file stores its values (see the module's docstring); by default
    Landslide4Sense HDF5 patches are ``l4s`` and GeoTIFF chips say so in their ``UNITS`` tag
    or are ``physical``.
    """
    path = Path(path)
    raw = _read_raw_image(path)
    names = _channel_names(path, raw, source_channels)
    image, valid = raw.image, raw.valid
    valid &= np.isfinite(image).all(axis=0)
    to_physical(image, names, units or raw.units or "physical", valid, path)
    return Patch(image=image, valid=valid, mask=None, channels=names)


def to_physical(image: np.ndarray, channels: Sequence[str], units: str, valid: np.ndarray, where: Path) -> None:
    """Convert ``image`` (C, H, W) from ``units`` to physical units in place, with a plausibility check.

    Raises :class:`ChannelError` when the units are unknown or a reflectance band's median is
    far above 1 (digital numbers, or Landslide4Sense values, declared as reflectance).
    """
    if units not in UNITS:
        raise ChannelError(f"{where}: unknown units {units!r}; expected one of {', '.join(UNITS)}")
    try:
        factors = physical_factors(list(channels), units)
    except ValueError as exc:
        raise ChannelError(f"{where}: {exc}") from None
    for band, factor in zip(image, factors, strict=True):
        if factor != 1.0:
            band *= np.float32(factor)
    if valid.any():
        for name, band in zip(channels, image, strict=True):
            median = float(np.median(band[valid])) if name in S2_BANDS else 0.0
            if median > _MAX_MEDIAN_REFLECTANCE:
                raise ChannelError(
                    f"{where}: band {name} has median {median:g} in units {units!r}, far above any "
                    "reflectance; declare the units of the chips (data.units: dn for digital numbers, "
                    "l4s for Landslide4Sense scaling, or a UNITS tag in the GeoTIFF)"
                )


def read_mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a mask patch: (labels uint8 in {0, 1}, valid bool). Non-zero is landslide."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in H5_SUFFIXES:
            import h5py

            with h5py.File(path, "r") as h5:
                arr = _h5_dataset(h5, path, "mask")
            valid = np.ones(arr.shape[-2:], dtype=bool)
        elif suffix in TIF_SUFFIXES:
            import rasterio

            with rasterio.open(path) as src:
                arr = src.read(1)
                valid = src.read_masks(1) > 0
        else:
            raise InputError(f"{path}: unsupported mask format (expected .h5/.hdf5/.tif/.tiff)")
    except (OSError, KeyError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path}: cannot read mask: {exc}") from None
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise InputError(f"{path}: mask must be (H, W), got shape {arr.shape}")
    return (arr > 0).astype(np.uint8), valid


def channel_indices(available: Sequence[str], wanted: Sequence[str]) -> list[int]:
    """Indices of ``wanted`` channels (any spelling: ``B2``, ``slope``) in ``available``."""
    avail = [canonical(a) for a in available]
    out = []
    for name in canonical_channels(wanted, "channels"):
        if name not in avail:
            raise ChannelError(
                f"channel {name} is not in the patches (they hold {', '.join(avail)})"
            )
        out.append(avail.index(name))
    return out


def load_patch(
    record: PatchRecord,
    channels: Sequence[str] | None = None,
    source_channels: Sequence[str] | None = None,
    units: str | None = None,
) -> Patch:
    """Read a patch with its mask, keeping ``channels`` (default: all) in that order."""
    patch = read_image(record.image, source_channels, units)
    image, names = patch.image, patch.channels
    if channels is not None:
        idx = channel_indices(names, channels)
        image = image[idx]
        names = tuple(names[i] for i in idx)
    valid = patch.valid
    mask = None
    if record.mask is not None:
        mask, mask_valid = read_mask(record.mask)
        if mask.shape != image.shape[1:]:
            raise InputError(
                f"{record.mask}: mask shape {mask.shape} differs from image {record.image} {image.shape[1:]}"
            )
        valid = valid & mask_valid
    return Patch(image=np.ascontiguousarray(image), valid=valid, mask=mask, channels=names)

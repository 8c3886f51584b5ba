"""Running the chosen models on one upload, and how far their masks agree; the store of results.

Each model runs alone through the scenes' tiled inference and stitching
(:func:`pipeline.inference.tiled.predict`) with Dask's synchronous scheduler in this process: a
patch as large as the model's window is one window, a larger chip is cut into overlapping windows
and blended as a scene is. Its mask is ``probability >= threshold`` at the model's own threshold.
The agreement is the per-pixel count of models that flag a pixel and the pairwise intersection
over union of the masks (over pixels valid for both).
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import combinations

import numpy as np

from pipeline.app.catalogue import ModelEntry
from pipeline.app.form import UploadError
from pipeline.app.inputs import InputImage
from pipeline.inference.options import InferenceOptions
from pipeline.model.artefact import MissingChannelsError

#: mask and agreement value of pixels without valid input
NO_DATA = 255
TRUE_COLOUR = ("B04", "B03", "B02")


@dataclass(frozen=True)
class Source:
    """What was uploaded, without its pixels."""

    filename: str
    kind: str
    shape: tuple[int, int]
    channels: tuple[str, ...]
    units: str
    level: str
    crs: object | None  # rasterio CRS when the upload was georeferenced
    transform: object | None  # its affine transform

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None and self.transform is not None


@dataclass
class ModelResult:
    """One model's prediction on the upload."""

    entry: ModelEntry
    probability: np.ndarray  # (H, W) float32 in [0, 1], NaN where no valid input
    threshold: float

    @cached_property
    def mask(self) -> np.ndarray:
        """(H, W) uint8: 1 landslide, 0 not, :data:`NO_DATA` without valid input."""
        p = self.probability
        with np.errstate(invalid="ignore"):
            out = (p >= self.threshold).astype(np.uint8)
        out[np.isnan(p)] = NO_DATA
        return out

    @property
    def landslide_fraction(self) -> float:
        """Share of the valid pixels in the mask."""
        valid = self.mask != NO_DATA
        return float((self.mask == 1).sum() / valid.sum()) if valid.any() else 0.0


@dataclass
class Comparison:
    """The models' results on one upload, kept under ``id``; ``images`` caches the rendered files."""

    id: str
    source: Source
    rgb: np.ndarray | None  # (H, W, 3) uint8 stretched true colour, None without B04/B03/B02
    results: list[ModelResult]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (model name, why)
    images: dict[str, bytes] = field(default_factory=dict)

    def result(self, model_id: str) -> ModelResult | None:
        return next((r for r in self.results if r.entry.id == model_id), None)

    @cached_property
    def agreement(self) -> np.ndarray:
        """(H, W) uint8: how many models flag each pixel; :data:`NO_DATA` where none had valid input."""
        masks = np.stack([r.mask for r in self.results])
        count = (masks == 1).sum(axis=0).astype(np.uint8)
        count[(masks == NO_DATA).all(axis=0)] = NO_DATA
        return count

    @cached_property
    def iou(self) -> dict[tuple[str, str], float | None]:
        """Intersection over union of each pair of masks (by model id); None when both are empty."""
        return {(a.entry.id, b.entry.id): mask_iou(a.mask, b.mask) for a, b in combinations(self.results, 2)}


def mask_iou(a: np.ndarray, b: np.ndarray) -> float | None:
    """IoU of two masks over the pixels valid in both; None when neither flags any."""
    both = (a != NO_DATA) & (b != NO_DATA)
    fa, fb = (a == 1) & both, (b == 1) & both
    union = int((fa | fb).sum())
    return None if union == 0 else float((fa & fb).sum() / union)


def runnable(entries: Sequence[ModelEntry], channels: Sequence[str]) -> tuple[list[ModelEntry], list[tuple[str, str]]]:
    """The models the upload's channels can feed, and (name, message) for the others;
    :class:`UploadError` when none can run (naming every missing channel)."""
    ok, skipped = [], []
    for entry in entries:
        try:
            entry.artefact.check_channels(channels)
        except MissingChannelsError as exc:
            skipped.append((entry.name, str(exc).replace("the scene cannot supply", "the upload lacks")))
        else:
            ok.append(entry)
    if not ok:
        raise UploadError("; ".join(message for _, message in skipped))
    return ok, skipped


def predict_probability(image: InputImage, entry: ModelEntry, options: InferenceOptions, level: str | None) -> np.ndarray:
    """``entry``'s probability on ``image`` (H, W) float32 through the tiled inference."""
    import dask
    import xarray as xr

    from pipeline.inference.tiled import predict

    data = xr.DataArray(image.image, dims=("band", "y", "x"), coords={"band": list(image.channels)})
    valid = xr.DataArray(image.valid, dims=("y", "x"))
    prediction = predict(data, valid, image.grid(), [entry.artefact], options, level=level)
    with dask.config.set(scheduler="synchronous"):
        return np.asarray(prediction.probability.data.compute(), dtype=np.float32)


def true_colour(image: InputImage) -> np.ndarray | None:
    """(H, W, 3) uint8 B04/B03/B02 stretched between their 2nd and 98th percentiles, or None."""
    from postprocess.quicklook import stretch

    if not all(b in image.channels for b in TRUE_COLOUR):
        return None
    rgb = image.image[[image.channels.index(b) for b in TRUE_COLOUR]].astype(np.float32)
    rgb[:, ~image.valid] = np.nan
    return stretch(rgb)


def compare(image: InputImage, entries: Sequence[ModelEntry], options: InferenceOptions,
            level: str | None) -> Comparison:
    """Run ``entries`` (those the upload can feed) on ``image``; a new :class:`Comparison`."""
    ok, skipped = runnable(entries, image.channels)
    results = [ModelResult(e, predict_probability(image, e, options, level), e.threshold) for e in ok]
    source = Source(image.filename, image.kind, image.shape, image.channels, image.units, level or "",
                    image.crs, image.transform)
    return Comparison(secrets.token_hex(8), source, true_colour(image), results, skipped)


class ResultStore:
    """The last ``capacity`` comparisons in memory, by id (the oldest go first)."""

    def __init__(self, capacity: int = 20) -> None:
        self.capacity = max(1, int(capacity))
        self._items: OrderedDict[str, Comparison] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, comparison: Comparison) -> None:
        with self._lock:
            self._items[comparison.id] = comparison
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, comparison_id: str) -> Comparison | None:
        with self._lock:
            return self._items.get(comparison_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

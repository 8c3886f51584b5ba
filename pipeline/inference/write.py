"""Writing a prediction: the probability COG, and the uncertainty and kept layers, from one model run."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import xarray as xr

from pipeline.core import probability
from pipeline.core.errors import ConfigError
from pipeline.inference.options import Prediction


def write_probability(
    prediction: Prediction,
    path: str | os.PathLike[str],
    dtype: Literal["uint8", "float16", "float32"] = "uint8",
) -> Path:
    """Write the probability raster as a tiled COG (via :func:`pipeline.io.cog.write_cog`).

    ``uint8`` scales [0, 1] to 0..254 with 255 as nodata; float types keep
    NaN as nodata.
    """
    return write_prediction(prediction, path, dtype=dtype)[0]


def write_prediction(
    prediction: Prediction,
    path: str | os.PathLike[str],
    *,
    uncertainty_path: str | os.PathLike[str] | None = None,
    layers_path: str | os.PathLike[str] | None = None,
    dtype: Literal["uint8", "float16", "float32"] = "uint8",
    probability_cog: bool = True,
    also: Callable[[Any], Sequence[Any]] | None = None,
) -> Any:
    """Write the probability COG, and the uncertainty COG and kept layers when asked, in one computation.

    The model runs once for all of them (they come from the same block
    tasks; writing them one after the other would run it again for each).
    The kept layers (:attr:`Prediction.layers`, float32, one band each in
    their order, NaN as no data) go to a plain tiled GeoTIFF at
    ``layers_path``, an intermediate file for later stages of the run.
    ``probability_cog=False`` writes the probability as a plain tiled
    GeoTIFF instead (uncompressed, no overviews: for a caller that reads it
    back at once and makes the COG later, :func:`pipeline.io.cog.cog_from_tiff`).
    Returns the paths written, probability first.

    ``also`` is called with the probability as it is stored (a dask array:
    uint8 codes with 255 for no data, or floats with NaN) and returns more
    dask collections to compute in the same computation, from the same
    blocks (:func:`pipeline.io.cog.write_rasters`); the result is then
    ``(paths, their values)``.
    """
    from pipeline.io.cog import RasterOutput, write_rasters

    prob = prediction.probability
    if dtype == "uint8":
        outputs = [RasterOutput(probability.encode(prob), Path(path), "uint8", probability.PROB_NODATA,
                                tags=dict(probability.TAGS), cog=probability_cog)]
    elif dtype in ("float16", "float32"):
        outputs = [RasterOutput(prob, Path(path), dtype, float("nan"), cog=probability_cog)]
    else:
        raise ConfigError(f"probability dtype must be uint8, float16 or float32, got {dtype!r}")
    if uncertainty_path is not None:
        if prediction.uncertainty is None:
            raise ConfigError("no uncertainty to write: it needs test-time augmentation or an ensemble")
        outputs.append(RasterOutput(prediction.uncertainty, Path(uncertainty_path), "float32", float("nan")))
    if layers_path is not None and prediction.layers:
        names = list(prediction.layers)
        stacked = xr.concat([prediction.layers[n] for n in names], dim="band")
        outputs.append(RasterOutput(stacked, Path(layers_path), "float32", float("nan"), band_names=names,
                                    cog=False))
    if also is None:
        return write_rasters(outputs, prediction.grid)
    return write_rasters(outputs, prediction.grid, also=lambda stored: also(stored[0]))

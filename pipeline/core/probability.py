"""The probability raster's uint8 encoding: ``round(p x 254)``, 255 for no data.

One byte per pixel (an eighth of float32 on disk), written by the inference, read back by
the later stages of a run and described in the rasters' QGIS styles.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Codes per unit of probability: code = round(probability x PROB_SCALE).
PROB_SCALE = 254.0
#: The code of a pixel without a probability (no valid input).
PROB_NODATA = 255


def encode(prob: Any) -> Any:
    """Probability (xarray, NaN for no data) -> float codes ``0..254`` and 255, lazily.

    ``DataArray.round``, not ``np.round``: the latter would compute a lazy raster at once.
    """
    import xarray as xr

    return xr.where(prob.isnull(), float(PROB_NODATA), (prob * PROB_SCALE).round())


def code_table() -> np.ndarray:
    """uint8 code -> probability: ``code / 254`` in float32 (the division, not a product with a
    rounded 1/254: 127 is exactly 0.5), 255 -> NaN."""
    table = np.arange(256, dtype=np.float32) / np.float32(PROB_SCALE)
    table[PROB_NODATA] = np.nan
    return table


def decode(codes: np.ndarray) -> np.ndarray:
    """Stored uint8 codes -> probability (float32, NaN for no data)."""
    return code_table()[codes]


#: Tags of the stored band that say how to read it (GDAL's scale and offset).
TAGS = {"scale": str(1 / PROB_SCALE), "offset": "0"}

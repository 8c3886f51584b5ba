"""Dask arrays from whatever a caller holds: a dask array, an xarray DataArray or a numpy array."""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np


def as_dask(array: Any, chunks: Any, *, rechunk: bool = True) -> da.Array:
    """``array`` as a dask array: a DataArray's data, numpy arrays wrapped in ``chunks``; a dask
    array is rechunked to ``chunks`` unless ``rechunk`` is False (then its own chunks stay)."""
    data = getattr(array, "data", array)
    if not isinstance(data, da.Array):
        return da.from_array(np.asarray(data), chunks=chunks)
    if rechunk and data.chunks != chunks:
        data = data.rechunk(chunks)
    return data

"""The run's intermediate rasters, read back lazily by the stages after the inference."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core import probability as probability_encoding
from pipeline.core.grid import Grid


def open_stored(path: Path, grid: Grid, block: int, band: int = 1, *, probability: bool = False,
               like: Any = None) -> Any:
    """One band of an intermediate GeoTIFF of this run as a lazy (y, x) float32 DataArray, in chunks of
    whole tiles of the file (the multiple of its tile edge nearest to ``block``): every tile is read
    once. ``like``: take that array's chunks instead (the layers the postprocessing reads together
    must share one block layout)."""
    import dask.array as da
    import rasterio
    import xarray as xr

    from pipeline.core.georeference import grid_coords
    from pipeline.stack.lazy_arrays import StoredBand

    with rasterio.open(path) as ds:
        tile_rows, tile_cols = ds.block_shapes[band - 1]
        shape = (ds.height, ds.width)
    rows, cols = (t * max(1, round(block / t)) for t in (tile_rows, tile_cols))
    chunks: Any = (rows, cols) if like is None else like.chunks
    if shape != grid.shape:
        raise RuntimeError(f"{path}: {shape[1]} x {shape[0]} px, not the run's grid {grid.width} x {grid.height}")
    layer = StoredBand(path, band, grid, probability_encoding.code_table() if probability else None)
    arr = da.from_array(layer, chunks=chunks, asarray=False, lock=False, meta=np.empty((0, 0), np.float32),
                        name=f"stored-{path.name.strip('.')}-{band}-{uuid.uuid4().hex[:12]}")
    return xr.DataArray(arr, dims=("y", "x"), coords=grid_coords(grid))



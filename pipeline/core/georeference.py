"""Grid-referenced DataArrays: the pixel-centre coordinates of a grid, its CRS and transform."""

from __future__ import annotations

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from pipeline.core.grid import Grid


def grid_coords(grid: Grid) -> dict[str, np.ndarray]:
    """``y`` and ``x``: the map coordinates of the centres of ``grid``'s rows and columns."""
    t = grid.transform
    return {
        "y": t.f + (np.arange(grid.height) + 0.5) * t.e,
        "x": t.c + (np.arange(grid.width) + 0.5) * t.a,
    }


def georeference(arr: xr.DataArray, grid: Grid) -> xr.DataArray:
    """``arr`` with ``grid``'s CRS and transform written (rioxarray)."""
    arr = arr.rio.write_crs(grid.crs)
    return arr.rio.write_transform(grid.transform)

"""The terrain inputs: the DEM (any CRS) and an optional precomputed slope layer."""

from __future__ import annotations

from pipeline.core.config import DemSection
from pipeline.io.allow_list import VrtPolicy
from pipeline.io.raster_source import RasterSource, open_raster


def open_dem(section: DemSection) -> RasterSource:
    """Open the DEM (any CRS); voids are its nodata, ``void_values`` and NaN."""
    return open_raster(section.path, "DEM", nodata=section.void_values, use_file_nodata=True, vrt=_vrt(section))


def open_slope(section: DemSection) -> RasterSource | None:
    """Open the precomputed slope layer (degrees), if one is configured."""
    if section.slope is None:
        return None
    return open_raster(section.slope, "slope layer", use_file_nodata=True, vrt=_vrt(section))


def _vrt(section: DemSection) -> VrtPolicy:
    """VRT inputs as ``dem.allow_vrt`` says."""
    return VrtPolicy(section.allow_vrt, "dem.allow_vrt")

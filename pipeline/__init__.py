"""Landslide mapping pipeline: Sentinel-2 + DEM -> landslide polygons."""

__version__ = "0.1.0"

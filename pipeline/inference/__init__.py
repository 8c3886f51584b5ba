"""Tiled inference: a stacked scene to a landslide probability raster, window by window on Dask."""

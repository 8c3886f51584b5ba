"""Postprocessing: from a probability raster to landslide polygons and output files.

- :mod:`postprocess.polygons`: the one call from a probability raster to
  attributed polygons and the cleaned mask (:func:`~postprocess.polygons.polygons_from_probability`).
- :mod:`postprocess.objects`: the cleaning, steps 1 to 5, and the labelled objects with their
  statistics; :mod:`postprocess.morphology` (threshold, opening and closing in metres),
  :mod:`postprocess.areas` (min-area, holes), :mod:`postprocess.terrain_rules` (slope, NDVI,
  NDWI) and :mod:`postprocess.packed_mask` (masks kept one bit per pixel) do its steps.
- :mod:`postprocess.labels`: connected components across dask blocks;
  :mod:`postprocess.label_stats`: their per-label statistics.
- :mod:`postprocess.vectorize`: polygons per block, merged across blocks.
- :mod:`postprocess.attributes`: the attribute schema and stable ids.
- :mod:`postprocess.gpkg`: atomic, indexed, QGIS-styled GeoPackage (:mod:`postprocess.style`).
- :mod:`postprocess.quicklook`: true-colour PNG with outlines.
- :mod:`postprocess.raster_style`: QGIS styles beside the run's rasters.

The package imports nothing itself: the Dask workers import the block-wise
modules (morphology, areas, labels, vectorize) and never need GeoPandas.
"""

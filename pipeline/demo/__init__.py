"""The built-in demo input: a small synthetic Sentinel-2 product, a DEM and the true scars.

``python -m pipeline demo-data DIR`` (:func:`pipeline.demo.write.write_demo_data`)
writes, generated in code and deterministic for a seed:

- a Sentinel-2 L2A (or L1C) ``.SAFE`` directory in the real ESA layout and
  naming (:mod:`~pipeline.demo.safe_writer`, :mod:`~pipeline.demo.safe_metadata`);
- ``dem.tif``: an int16 DEM in EPSG:4326 at 1 arc-second with a few voids
  (:mod:`~pipeline.demo.dem`);
- ``truth_mask.tif`` and ``truth_scars.gpkg``: the landslide scars painted into
  the scene (:mod:`~pipeline.demo.truth`);
- ``scene.yaml``: a ready-to-run scene configuration with relative paths.

The scene (:class:`~pipeline.demo.scene.DemoScene`) sits in UTM zone 54N near
the 2018 Iburi earthquake (Hokkaido, Sentinel-2 tile 54TWN). Its origin is on a
60 m multiple of the tile grid, so the 10, 20 and 60 m rasters nest as in real
tiles, and its side is a multiple of 6 pixels so they cover the same extent (a
real tile is 10980 = 6 x 1830 pixels).

Where each part is painted:

- :mod:`~pipeline.demo.terrain`: steep terrain as a function of UTM
  coordinates, so the DEM is the same surface sampled at its own pixel centres;
- :mod:`~pipeline.demo.landcover` and :mod:`~pipeline.demo.clouds`: forest,
  meadows, bare fields, the river, clouds and their shadows;
- :mod:`~pipeline.demo.scars`: 6-12 landslide scars, elongated downslope
  tongues of bare soil on steep slopes;
- :mod:`~pipeline.demo.lookalikes`: bare ground that is *not* a landslide and
  not in the truth (rock outcrops, gravel bars, roads, clear-cuts), never
  within 3 pixels of a scar;
- :mod:`~pipeline.demo.spectra`: the reflectance of each class, the medians
  of the labelled Landslide4Sense patches turned into surface reflectance
  through the demo's atmosphere (only clouds keep a hand-set spectrum; there
  is no snow, the patches hold none).

Digital numbers follow the product's own encoding (:mod:`~pipeline.demo.sentinel2`):
reflectance = (DN + offset) / 10000 with offset -1000 from baseline 04.00 on, DN
0 outside the swath (a no-data corner as in real tiles).
"""

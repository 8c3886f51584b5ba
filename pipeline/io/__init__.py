"""Reading inputs (Sentinel-2 products, DEMs, raster sources) and writing cloud-optimised GeoTIFFs."""

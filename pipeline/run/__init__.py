"""Running scenes and regions: stage order, run folders and reports, the Dask cluster, the regional merge."""

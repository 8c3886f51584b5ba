"""Model artefacts: the file format, the architecture registry, input normalization, ensembles, device and precision."""

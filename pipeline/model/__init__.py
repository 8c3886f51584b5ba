"""Model artefacts: the file format, the architecture registry, input normalization, device and precision."""

"""The shared core every package uses: errors, the grid, channel names, atomic files, YAML and config, progress."""

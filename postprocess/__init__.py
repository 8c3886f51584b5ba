"""Postprocessing: from a probability raster to landslide polygons and output files.

- :mod:`postprocess.morphology`: threshold, opening/closing in metres, min-area,
  holes, terrain rules; block-wise with exactly the whole-array result.
- :mod:`postprocess.labels`: connected components across dask blocks.
- :mod:`postprocess.vectorize`: polygons per block, merged across blocks.
- :mod:`postprocess.attributes`: the attribute schema and stable ids.
- :mod:`postprocess.gpkg`: atomic, indexed, QGIS-styled GeoPackage.
- :mod:`postprocess.quicklook`: true-colour PNG with outlines.

The run orchestrator calls :func:`polygons_from_probability`, then
:func:`write_geopackage` (and optionally :func:`write_quicklook`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .attributes import COLUMNS, empty_frame
    from .gpkg import read_run_metadata, write_geopackage
    from .morphology import clean_mask, clean_objects
    from .pipeline import effective_threshold, polygons_from_probability
    from .quicklook import write_quicklook
    from .vectorize import vectorize_labels

#: Where each name lives. Imported on first use: the Dask workers import the block-wise modules
#: (morphology, labels, vectorize) and never need GeoPandas, half a second of their start.
_EXPORTS = {
    "COLUMNS": "attributes",
    "empty_frame": "attributes",
    "read_run_metadata": "gpkg",
    "write_geopackage": "gpkg",
    "clean_mask": "morphology",
    "clean_objects": "morphology",
    "effective_threshold": "pipeline",
    "polygons_from_probability": "pipeline",
    "write_quicklook": "quicklook",
    "vectorize_labels": "vectorize",
}

__all__ = [
    "COLUMNS",
    "clean_mask",
    "clean_objects",
    "effective_threshold",
    "empty_frame",
    "polygons_from_probability",
    "read_run_metadata",
    "vectorize_labels",
    "write_geopackage",
    "write_quicklook",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

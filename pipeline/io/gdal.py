"""GDAL settings for every raster read in the process, no sidecar files on reads, and the text of GDAL's errors.

Importing this module (every reader and writer of :mod:`pipeline.io` does, and so
does each Dask worker process that unpickles a raster source) switches off the
GDAL features that read arbitrary files: VRT bands over raw bytes and Python
pixel functions.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

#: GDAL configuration for every read in a process that imports this module (the pipeline and its
#: Dask worker processes): VRT bands over raw bytes of arbitrary files and Python pixel functions
#: are switched off. GDAL reads these from the environment at each use; raw bands obey the option
#: from GDAL 3.12, and the input allow-list (:mod:`pipeline.io.allow_list`) refuses them itself
#: for older GDAL.
GDAL_SAFETY_OPTIONS: dict[str, str] = {
    "GDAL_VRT_ENABLE_RAWRASTERBAND": "NO",
    "GDAL_VRT_ENABLE_PYTHON": "NO",
}
os.environ.update(GDAL_SAFETY_OPTIONS)


def error_detail(exc: BaseException) -> str:
    """The message of ``exc`` and of the errors that caused it (GDAL puts the useful part there).

    Pipeline errors are raised ``from None`` with this text, because GDAL's
    exception objects do not survive pickling to and from dask workers.
    """
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).replace("See previous exception for details.", "").strip().rstrip(".")
        if text and text not in parts:
            parts.append(text)
        current = current.__cause__ or current.__context__
    return ": ".join(parts) or type(exc).__name__


@contextmanager
def no_sidecars() -> Iterator[None]:
    """GDAL's persistent auxiliary metadata off while the block runs: opening a GeoPackage that
    has dataset metadata would otherwise leave a ``.gpkg.aux.xml`` beside it."""
    import pyogrio

    before = pyogrio.get_gdal_config_option("GDAL_PAM_ENABLED")
    pyogrio.set_gdal_config_options({"GDAL_PAM_ENABLED": "NO"})
    try:
        yield
    finally:
        pyogrio.set_gdal_config_options({"GDAL_PAM_ENABLED": before})

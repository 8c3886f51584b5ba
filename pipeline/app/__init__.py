"""The interactive model comparison (``python -m pipeline app``): upload a patch, compare the models.

A small HTTP server of the standard library on 127.0.0.1 (:mod:`pipeline.app.server`) takes a
Landslide4Sense ``.h5`` patch or a GeoTIFF chip (:mod:`pipeline.app.form`,
:mod:`pipeline.app.inputs`), runs one model or all of them through the tiled inference
(:mod:`pipeline.app.compare`), and shows the true colour, each model's probability, mask and
overlay, and their agreement (:mod:`pipeline.app.pages`, :mod:`pipeline.app.render`), with the
predictions to download as ``.npy`` and GeoTIFF.
"""

from __future__ import annotations

from pipeline.app.catalogue import Catalogue, build_catalogue
from pipeline.app.server import AppServer, make_app_server

__all__ = ["AppServer", "Catalogue", "build_catalogue", "make_app_server"]

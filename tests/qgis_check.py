"""Open a GeoPackage layer with QGIS (headless) and print what QGIS sees, as JSON.

Run with the system Python that has PyQGIS::

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 tests/qgis_check.py out.gpkg landslides

Prints one JSON object: isValid, crs (authid), featureCount, geometryType,
renderer (QGIS renderer type after opening; a stored default style makes it
``graduatedSymbol`` instead of ``singleSymbol``), classAttribute, ranges,
fields, and the style list the provider reports.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from qgis.core import QgsApplication, QgsVectorLayer

    path, layer_name = argv[1], argv[2] if len(argv) > 2 else "landslides"
    app = QgsApplication([], False)
    app.initQgis()
    try:
        layer = QgsVectorLayer(f"{path}|layername={layer_name}", layer_name, "ogr")
        out: dict[str, object] = {"isValid": bool(layer.isValid())}
        if layer.isValid():
            renderer = layer.renderer()
            out.update(
                crs=layer.crs().authid(),
                featureCount=int(layer.featureCount()),
                geometryType=int(layer.geometryType()),
                renderer=renderer.type() if renderer else None,
                fields=[f.name() for f in layer.fields()],
            )
            if renderer is not None and renderer.type() == "graduatedSymbol":
                out["classAttribute"] = renderer.classAttribute()
                out["ranges"] = [[r.lowerValue(), r.upperValue(), r.label()] for r in renderer.ranges()]
            count, ids, names, descriptions, error = layer.listStylesInDatabase()
            out["storedStyles"] = list(names)
            out["storedStylesError"] = error
        print(json.dumps(out), flush=True)
        del layer
    finally:
        app.exitQgis()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

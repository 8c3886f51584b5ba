"""Open GeoPackage layers with QGIS (headless) and print what QGIS sees, as JSON.

Run with the system Python that has PyQGIS::

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 tests/qgis_check.py [--layer NAME] a.gpkg [b.gpkg ...]

Prints one JSON object per file, one per line: path, isValid, crs (authid),
featureCount, geometryType, renderer (the QGIS renderer type after opening:
a stored default style makes it ``graduatedSymbol`` instead of QGIS's
``singleSymbol``), classAttribute and ranges of a graduated renderer, fields,
and the names of the styles stored in the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def describe(path: str, layer_name: str) -> dict[str, object]:
    """What QGIS reports for one layer."""
    from qgis.core import QgsVectorLayer

    layer = QgsVectorLayer(f"{path}|layername={layer_name}", layer_name, "ogr")
    out: dict[str, object] = {"path": path, "isValid": bool(layer.isValid())}
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
        _count, _ids, names, _descriptions, error = layer.listStylesInDatabase()
        out["storedStyles"] = list(names)
        out["storedStylesError"] = error
    del layer
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="landslides")
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args(argv[1:])
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from qgis.core import QgsApplication

    app = QgsApplication([], False)
    app.initQgis()
    try:
        for path in args.paths:
            print(json.dumps(describe(path, args.layer)), flush=True)
    finally:
        app.exitQgis()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

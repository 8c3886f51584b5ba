"""Open GeoPackage layers (or rasters) with QGIS (headless) and print what QGIS sees, as JSON.

Run with the system Python that has PyQGIS::

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 tests/qgis_check.py [--layer NAME] a.gpkg [b.gpkg ...]
    QT_QPA_PLATFORM=offscreen /usr/bin/python3 tests/qgis_check.py --raster [--render DIR] a.tif [b.tif ...]

Prints one JSON object per file, one per line: path, isValid, crs (authid),
featureCount, geometryType, renderer (the QGIS renderer type after opening:
a stored default style makes it ``graduatedSymbol`` instead of QGIS's
``singleSymbol``), classAttribute and ranges of a graduated renderer, fields,
and the names of the styles stored in the file.

With ``--raster``: path, isValid, crs, width, height, renderer (``singlebandpseudocolor`` when
QGIS loaded the ``.qml`` beside the raster, else QGIS's own choice, ``singlebandgray`` for one
band), band, classificationMin/Max, the colour ramp's shader type, minimum, maximum and items
(value, #rrggbb, alpha, label), the band's no data (sourceHasNoData, sourceNoData,
useSourceNoData) and the band description; with ``--render DIR`` the layer is also drawn
(QgsMapRendererParallelJob, white background, 400 px wide) to ``DIR/<name>.png`` (``png``).
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


def describe_raster(path: str, render_dir: str | None) -> dict[str, object]:
    """What QGIS reports for one raster (opened like QGIS opens a file: default style loaded)."""
    from qgis.core import QgsRasterLayer

    layer = QgsRasterLayer(path, os.path.basename(path), "gdal")
    out: dict[str, object] = {"path": path, "isValid": bool(layer.isValid())}
    if not layer.isValid():
        return out
    provider = layer.dataProvider()
    renderer = layer.renderer()
    out.update(
        crs=layer.crs().authid(), width=int(layer.width()), height=int(layer.height()),
        renderer=renderer.type() if renderer else None,
        sourceHasNoData=bool(provider.sourceHasNoDataValue(1)),
        sourceNoData=float(provider.sourceNoDataValue(1)) if provider.sourceHasNoDataValue(1) else None,
        useSourceNoData=bool(provider.useSourceNoDataValue(1)),
        bandName=layer.bandName(1),
    )
    if renderer is not None and renderer.type() == "singlebandpseudocolor":
        shader = renderer.shader().rasterShaderFunction()
        out.update(
            band=int(renderer.band()),
            classificationMin=float(renderer.classificationMin()),
            classificationMax=float(renderer.classificationMax()),
            shaderType=shader.colorRampTypeAsQString(),
            shaderMin=float(shader.minimumValue()),
            shaderMax=float(shader.maximumValue()),
            items=[[float(i.value), i.color.name(), int(i.color.alpha()), i.label] for i in shader.colorRampItemList()],
        )
    if render_dir is not None:
        out["png"] = render(layer, os.path.join(render_dir, os.path.splitext(os.path.basename(path))[0] + ".png"))
    return out


def render(layer, png: str, width: int = 400) -> str:  # noqa: ANN001 - a QgsMapLayer
    """Draw ``layer`` alone on white, offscreen, to ``png``; returns the path."""
    from qgis.core import QgsMapRendererParallelJob, QgsMapSettings
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor

    extent = layer.extent()
    height = max(1, round(width * extent.height() / extent.width()))
    settings = QgsMapSettings()
    settings.setLayers([layer])
    settings.setDestinationCrs(layer.crs())
    settings.setExtent(extent)
    settings.setOutputSize(QSize(width, height))
    settings.setBackgroundColor(QColor(255, 255, 255))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    if not job.renderedImage().save(png, "PNG"):
        raise OSError(f"cannot save {png}")
    return png


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="landslides")
    parser.add_argument("--raster", action="store_true", help="the paths are rasters")
    parser.add_argument("--render", metavar="DIR", help="with --raster: draw each raster to DIR/<name>.png")
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args(argv[1:])
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from qgis.core import QgsApplication

    app = QgsApplication([], False)
    app.initQgis()
    try:
        for path in args.paths:
            found = describe_raster(path, args.render) if args.raster else describe(path, args.layer)
            print(json.dumps(found), flush=True)
    finally:
        app.exitQgis()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

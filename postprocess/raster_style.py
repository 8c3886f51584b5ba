"""QGIS styles of the run's rasters, as ``.qml`` sidecars QGIS loads by itself.

QGIS applies ``<name>.qml`` beside ``<name>.tif`` when it opens the raster (its default style),
so ``probability.tif`` opens as a colour ramp with transparent no data instead of a grey band:

- the probability (uint8 codes: probability x 254, 255 = no data): a singleband pseudocolor
  renderer over the codes 0-254, transparent at 0 and fading in through pale yellow up to the
  threshold, where the colour steps to orange and runs on to dark red at 254 (YlOrRd, a
  perceptual ramp), so what the run maps as landslide stands out; labels give probabilities;
- the uncertainty (float32 standard deviation of the probability across augmentations or
  ensemble members, NaN = no data): transparent at 0 through blue-purple to magenta and pale
  yellow (magma-like) at :data:`UNCERTAINTY_MAX` and above.

No data is the file's own (QGIS reads 255, or NaN, from the raster); ramp limits are fixed
(``<limits>None</limits>``), so QGIS does not replace them with the layer's statistics.
The sidecars are written atomically (:func:`pipeline.core.fsutil.write_atomic`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

#: The probability raster's codes: probability x 254, 255 = no data (pipeline.run.scene.PROB_SCALE).
PROB_SCALE = 254.0
PROB_NODATA = 255
#: Upper end of the uncertainty ramp (a standard deviation of probabilities, 0.5 at most; values
#: above this get the last colour).
UNCERTAINTY_MAX = 0.15


@dataclass(frozen=True)
class RampStop:
    """One item of an interpolated colour ramp: ``value`` in the raster's own units."""

    value: float
    colour: str  # "#rrggbb"
    alpha: int  # 0-255
    label: str


def probability_stops(threshold: float, scale: float = PROB_SCALE) -> list[RampStop]:
    """The probability ramp on the stored codes (``probability x scale``), with a step at ``threshold``."""
    t = min(max(float(threshold), 0.0), 1.0)
    code = t * scale
    below = [RampStop(0.0, "#ffffb2", 0, "0.00")]
    if code > 0.01:
        below.append(RampStop(round(code - 0.01, 4), "#fecc5c", 150, f"< {t:.2f} (below the threshold)"))
    above = [RampStop(round(code, 4), "#fd8d3c", 230, f"{t:.2f} (threshold)")]
    if code < scale:
        mid = (code + scale) / 2
        above += [RampStop(round(mid, 4), "#f03b20", 245, f"{mid / scale:.2f}"),
                  RampStop(scale, "#bd0026", 255, "1.00")]
    return below + above


def uncertainty_stops(maximum: float = UNCERTAINTY_MAX) -> list[RampStop]:
    """The uncertainty ramp (magma-like: dark and transparent for certain pixels)."""
    return [
        RampStop(0.0, "#000004", 0, "0.00"),
        RampStop(maximum * 0.25, "#3b0f70", 140, f"{maximum * 0.25:.3f}"),
        RampStop(maximum * 0.5, "#8c2981", 200, f"{maximum * 0.5:.3f}"),
        RampStop(maximum * 0.75, "#de4968", 235, f"{maximum * 0.75:.3f}"),
        RampStop(maximum, "#fcfdbf", 255, f">= {maximum:.2f}"),
    ]


def pseudocolor_qml(stops: Sequence[RampStop], minimum: float, maximum: float, band: int = 1) -> str:
    """QML text of a singleband pseudocolor renderer (interpolated ramp) of ``band``, in the
    dialect QGIS 3 writes itself; the limits are fixed (no statistics)."""
    items = "\n".join(
        f"          <item alpha=\"{s.alpha}\" value=\"{s.value!r}\" label={quoteattr(s.label)} color=\"{s.colour}\"/>"
        for s in stops
    )
    lo, hi = repr(float(minimum)), repr(float(maximum))
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.22.0" styleCategories="Symbology" hasScaleBasedVisibilityFlag="0" minScale="1e+08" maxScale="0">
  <pipe>
    <provider>
      <resampling enabled="false" zoomedInResamplingMethod="nearestNeighbour" zoomedOutResamplingMethod="nearestNeighbour" maxOversampling="2"/>
    </provider>
    <rasterrenderer type="singlebandpseudocolor" band="{band}" opacity="1" alphaBand="-1" nodataColor="" classificationMin="{lo}" classificationMax="{hi}">
      <rasterTransparency/>
      <minMaxOrigin>
        <limits>None</limits>
        <extent>WholeRaster</extent>
        <statAccuracy>Exact</statAccuracy>
        <cumulativeCutLower>0.02</cumulativeCutLower>
        <cumulativeCutUpper>0.98</cumulativeCutUpper>
        <stdDevFactor>2</stdDevFactor>
      </minMaxOrigin>
      <rastershader>
        <colorrampshader colorRampType="INTERPOLATED" classificationMode="1" clip="0" minimumValue="{lo}" maximumValue="{hi}" labelPrecision="2">
{items}
        </colorrampshader>
      </rastershader>
    </rasterrenderer>
    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>
    <huesaturation saturation="0" grayscaleMode="0" colorizeOn="0" colorizeRed="255" colorizeGreen="128" colorizeBlue="128" colorizeStrength="100"/>
    <rasterresampler maxOversampling="2"/>
    <resamplingStage>resamplingFilter</resamplingStage>
  </pipe>
  <blendMode>0</blendMode>
</qgis>
"""


def probability_qml(threshold: float, scale: float = PROB_SCALE) -> str:
    """QML of the probability raster (codes 0-``scale``) with its ``threshold`` marked."""
    return pseudocolor_qml(probability_stops(threshold, scale), 0.0, scale)


def uncertainty_qml(maximum: float = UNCERTAINTY_MAX) -> str:
    """QML of the uncertainty raster (standard deviation, 0 to ``maximum`` and above)."""
    return pseudocolor_qml(uncertainty_stops(maximum), 0.0, maximum)


def sidecar_path(raster: str | os.PathLike[str]) -> Path:
    """The ``.qml`` QGIS loads by itself for ``raster`` (same base name, same folder)."""
    return Path(raster).with_suffix(".qml")


def write_qml(raster: str | os.PathLike[str], qml: str) -> Path:
    """Write ``qml`` beside ``raster`` as its default QGIS style, atomically; returns the path.
    Raises :class:`~pipeline.core.errors.DiskFull`, :class:`~pipeline.core.errors.FileSizeLimit` or
    :class:`~pipeline.core.errors.OutputError` (:func:`pipeline.core.fsutil.write_atomic`)."""
    from pipeline.core.fsutil import write_atomic

    path = sidecar_path(raster)
    write_atomic(path, qml.encode("utf-8"))
    return path


def write_raster_styles(run_dir: str | os.PathLike[str], threshold: float) -> list[Path]:
    """The ``.qml`` sidecars of the run's ``probability.tif`` and ``uncertainty.tif`` (those present)."""
    run_dir = Path(run_dir)
    written = []
    if (run_dir / "probability.tif").is_file():
        written.append(write_qml(run_dir / "probability.tif", probability_qml(threshold)))
    if (run_dir / "uncertainty.tif").is_file():
        written.append(write_qml(run_dir / "uncertainty.tif", uncertainty_qml()))
    return written


__all__ = ["RampStop", "probability_qml", "pseudocolor_qml", "sidecar_path", "uncertainty_qml", "write_qml",
           "write_raster_styles"]

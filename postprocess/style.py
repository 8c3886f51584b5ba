"""The default QGIS style of the landslide layer (QML and SLD).

A graduated fill on ``mean_prob`` in three probability classes with a dark
outline, in the QML dialect QGIS 3 writes itself. The text is generated so
that the classes can be changed without hand-editing XML; the first class
starts at 0 so that no polygon is left undrawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr


@dataclass(frozen=True)
class ProbabilityClass:
    """One class of the graduated renderer: ``lower < value <= upper`` (first: ``>=``)."""

    lower: float
    upper: float
    colour: str  # "#rrggbb"
    label: str


#: Classes of the default style (YlOrRd), on ``mean_prob``.
DEFAULT_CLASSES: tuple[ProbabilityClass, ...] = (
    ProbabilityClass(0.0, 0.7, "#fecc5c", "< 0.70"),
    ProbabilityClass(0.7, 0.85, "#fd8d3c", "0.70 - 0.85"),
    ProbabilityClass(0.85, 1.0, "#e31a1c", "0.85 - 1.00"),
)

OUTLINE_COLOUR = "#3d0c02"
OUTLINE_WIDTH_MM = 0.4
FILL_ALPHA = 200  # of 255: the background stays visible


def _rgba(colour: str, alpha: int = 255) -> str:
    c = colour.lstrip("#")
    return f"{int(c[0:2], 16)},{int(c[2:4], 16)},{int(c[4:6], 16)},{alpha}"


def _symbol(name: int, cls: ProbabilityClass) -> str:
    props = {
        "border_width_map_unit_scale": "3x:0,0,0,0,0,0",
        "color": _rgba(cls.colour, FILL_ALPHA),
        "joinstyle": "bevel",
        "offset": "0,0",
        "offset_map_unit_scale": "3x:0,0,0,0,0,0",
        "offset_unit": "MM",
        "outline_color": _rgba(OUTLINE_COLOUR),
        "outline_style": "solid",
        "outline_width": f"{OUTLINE_WIDTH_MM}",
        "outline_width_unit": "MM",
        "style": "solid",
    }
    options = "\n".join(
        f'            <Option type="QString" value={quoteattr(v)} name={quoteattr(k)}/>' for k, v in props.items()
    )
    legacy = "\n".join(f"          <prop v={quoteattr(v)} k={quoteattr(k)}/>" for k, v in props.items())
    return f"""      <symbol alpha="1" force_rhr="0" type="fill" clip_to_extent="1" name="{name}">
        <layer class="SimpleFill" enabled="1" locked="0" pass="0">
          <Option type="Map">
{options}
          </Option>
{legacy}
        </layer>
      </symbol>"""


def default_qml(field: str = "mean_prob", classes: Sequence[ProbabilityClass] = DEFAULT_CLASSES) -> str:
    """QML text of a graduated fill on ``field`` with an outline."""
    ranges = "\n".join(
        f'      <range render="true" lower="{c.lower:.15f}" upper="{c.upper:.15f}" symbol="{i}" label={quoteattr(c.label)}/>'
        for i, c in enumerate(classes)
    )
    symbols = "\n".join(_symbol(i, c) for i, c in enumerate(classes))
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.22.0" styleCategories="Symbology|Labeling|Fields" hasScaleBasedVisibilityFlag="0" minScale="100000000" maxScale="0" labelsEnabled="0">
  <renderer-v2 type="graduatedSymbol" attr={quoteattr(field)} graduatedMethod="GraduatedColor" symbollevels="0" forceraster="0" enableorderby="0" referencescale="-1">
    <ranges>
{ranges}
    </ranges>
    <symbols>
{symbols}
    </symbols>
    <classificationMethod id="Custom">
      <symmetricMode enabled="0" symmetrypoint="0" astride="0"/>
      <labelFormat format="%1 - %2" labelprecision="2" trimtrailingzeroes="1"/>
      <parameters>
        <Option/>
      </parameters>
      <extraInformation/>
    </classificationMethod>
    <rotation/>
    <sizescale/>
  </renderer-v2>
  <blendMode>0</blendMode>
  <featureBlendMode>0</featureBlendMode>
  <layerOpacity>1</layerOpacity>
  <previewExpression>"landslide_id"</previewExpression>
  <layerGeometryType>2</layerGeometryType>
</qgis>
"""


def default_sld(field: str = "mean_prob", classes: Sequence[ProbabilityClass] = DEFAULT_CLASSES,
                name: str = "landslides") -> str:
    """SLD 1.1 text equivalent to :func:`default_qml` (for tools other than QGIS)."""
    rules = []
    for i, c in enumerate(classes):
        low_op = "PropertyIsGreaterThanOrEqualTo" if i == 0 else "PropertyIsGreaterThan"
        rules.append(f"""        <se:Rule>
          <se:Name>{c.label}</se:Name>
          <ogc:Filter>
            <ogc:And>
              <ogc:{low_op}><ogc:PropertyName>{field}</ogc:PropertyName><ogc:Literal>{c.lower}</ogc:Literal></ogc:{low_op}>
              <ogc:PropertyIsLessThanOrEqualTo><ogc:PropertyName>{field}</ogc:PropertyName><ogc:Literal>{c.upper}</ogc:Literal></ogc:PropertyIsLessThanOrEqualTo>
            </ogc:And>
          </ogc:Filter>
          <se:PolygonSymbolizer>
            <se:Fill><se:SvgParameter name="fill">{c.colour}</se:SvgParameter><se:SvgParameter name="fill-opacity">{FILL_ALPHA / 255:.2f}</se:SvgParameter></se:Fill>
            <se:Stroke><se:SvgParameter name="stroke">{OUTLINE_COLOUR}</se:SvgParameter><se:SvgParameter name="stroke-width">1</se:SvgParameter></se:Stroke>
          </se:PolygonSymbolizer>
        </se:Rule>""")
    body = "\n".join(rules)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<StyledLayerDescriptor xmlns="http://www.opengis.net/sld" version="1.1.0" xmlns:se="http://www.opengis.net/se" xmlns:ogc="http://www.opengis.net/ogc" xmlns:xlink="http://www.w3.org/1999/xlink" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:schemaLocation="http://www.opengis.net/sld http://schemas.opengis.net/sld/1.1.0/StyledLayerDescriptor.xsd">
  <NamedLayer>
    <se:Name>{name}</se:Name>
    <UserStyle>
      <se:Name>{name}</se:Name>
      <se:FeatureTypeStyle>
{body}
      </se:FeatureTypeStyle>
    </UserStyle>
  </NamedLayer>
</StyledLayerDescriptor>
"""

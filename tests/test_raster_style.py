"""The QGIS styles written beside the run's rasters (postprocess.raster_style), without QGIS."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pipeline.core.errors import OutputError
from pipeline.run.folder import is_leftover
from postprocess.raster_style import (
    probability_qml,
    probability_stops,
    sidecar_path,
    uncertainty_qml,
    write_qml,
    write_raster_styles,
)


def _renderer(qml: str) -> ET.Element:
    root = ET.fromstring(qml.split("\n", 1)[1])  # after the DOCTYPE
    return root.find("pipe/rasterrenderer")


def test_probability_qml_is_a_pseudocolor_ramp_over_the_codes_with_the_threshold() -> None:
    renderer = _renderer(probability_qml(0.6))
    assert renderer.get("type") == "singlebandpseudocolor" and renderer.get("band") == "1"
    assert float(renderer.get("classificationMin")) == 0 and float(renderer.get("classificationMax")) == 254
    assert renderer.find("minMaxOrigin/limits").text == "None"  # fixed, not from statistics
    shader = renderer.find("rastershader/colorrampshader")
    assert shader.get("colorRampType") == "INTERPOLATED"
    items = [(float(i.get("value")), i.get("color"), int(i.get("alpha"))) for i in shader.findall("item")]
    assert items[0][0] == 0 and items[0][2] == 0  # probability 0 is transparent
    assert items[-1][0] == 254 and items[-1][2] == 255
    values = [v for v, _, _ in items]
    assert values == sorted(values)
    # a step at the threshold's code: the colour changes within 0.01 of 0.6 x 254
    at = [v for v in values if v == pytest.approx(0.6 * 254, abs=0.011)]
    assert len(at) == 2
    assert any("threshold" in i.get("label") for i in shader.findall("item"))


@pytest.mark.parametrize("threshold", [0.0, 1.0, 0.5, 1.7, -1])
def test_probability_stops_stay_ordered_for_any_threshold(threshold: float) -> None:
    values = [s.value for s in probability_stops(threshold)]
    assert values == sorted(values) and values[0] == 0 and 0 <= values[-1] <= 254


def test_uncertainty_qml_has_its_own_ramp() -> None:
    renderer = _renderer(uncertainty_qml())
    assert renderer.get("type") == "singlebandpseudocolor"
    colours = [i.get("color") for i in renderer.findall("rastershader/colorrampshader/item")]
    prob = [i.get("color") for i in _renderer(probability_qml(0.5)).findall("rastershader/colorrampshader/item")]
    assert len(colours) >= 3 and not set(colours) & set(prob)


def test_sidecars_are_written_beside_the_rasters_present(tmp_path: Path) -> None:
    assert sidecar_path(tmp_path / "probability.tif") == tmp_path / "probability.qml"
    assert write_raster_styles(tmp_path, 0.5) == []
    (tmp_path / "probability.tif").write_bytes(b"x")
    assert write_raster_styles(tmp_path, 0.5) == [tmp_path / "probability.qml"]
    (tmp_path / "uncertainty.tif").write_bytes(b"x")
    assert write_raster_styles(tmp_path, 0.5) == [tmp_path / "probability.qml", tmp_path / "uncertainty.qml"]
    assert (tmp_path / "probability.qml").read_text() == probability_qml(0.5)
    assert (tmp_path / "uncertainty.qml").read_text() == uncertainty_qml()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probability.qml", "probability.tif",
                                                          "uncertainty.qml", "uncertainty.tif"]


def test_a_failed_write_leaves_no_temporary_and_the_old_style(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_qml(tmp_path / "probability.tif", "old")
    import os

    def fail(*_args: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OutputError):
        write_qml(tmp_path / "probability.tif", probability_qml(0.5))
    assert [p.name for p in tmp_path.iterdir()] == ["probability.qml"]
    assert (tmp_path / "probability.qml").read_text() == "old"


def test_the_temporary_name_counts_as_a_leftover_of_an_interrupted_run() -> None:
    assert is_leftover(".probability.qml.abc123_x.tmp")
    assert not is_leftover("probability.qml")

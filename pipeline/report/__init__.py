"""HTML map reports: one self-contained, offline page per scene run and per region job.

A scene run's ``report.html`` (:func:`write_html_report`) shows, on a Leaflet map in the grid's
own coordinates, the true-colour quicklook, the probability (colour ramp, toggle, opacity), the
pixels without valid input, and the polygons coloured by mean probability with their attributes
in a popup; beside the map the run's summary (scene, date, processing level, models and their
SHA-256, threshold, counts, areas), below the stage timings and histograms of polygon area and
mean probability. A region's ``<name>.report.html`` (:func:`write_region_report`) maps the merged
polygons and each scene's footprint by outcome (completed, skipped, failed with its reason).

Pages are single files: Leaflet (vendored in ``static/leaflet``, BSD-2-Clause), the page's script,
its style and every image are inlined, and a Content Security Policy forbids any request, so a
report opens from a file, offline, anywhere. They are light views: rasters at most about
2048 pixels, polygons simplified at about a pixel and capped; the GeoPackages are the reference.
``python -m pipeline view PATH`` serves a report on localhost (:mod:`pipeline.cli.view`).
"""

from __future__ import annotations

from pipeline.report.region import (
    REGION_REPORT_SUFFIX,
    region_report_path,
    region_state_arguments,
    render_region_report,
    write_region_report,
)
from pipeline.report.scene import REPORT_HTML, render_html_report, write_html_report

__all__ = [
    "REGION_REPORT_SUFFIX",
    "REPORT_HTML",
    "region_report_path",
    "region_state_arguments",
    "render_html_report",
    "render_region_report",
    "write_html_report",
    "write_region_report",
]

"""Small charts as inline SVG (no chart library): histograms of polygon area and mean
probability, and bars of the stage timings."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any, NamedTuple

import numpy as np


def _num(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


@dataclass(frozen=True)
class HistogramSpec:
    """How a histogram is drawn: its ``title``, edge labels ``label(edge)``, an optional dashed
    ``marker`` (value, text), the CSS class, the labelled edges ``ticks`` (indices; None: about
    seven) and the size in pixels."""

    title: str
    label: Callable[[float], str]
    marker: tuple[float, str] | None = None
    css_class: str = "hist"
    ticks: Sequence[int] | None = None
    width: int = 380
    height: int = 200


class _PlotArea(NamedTuple):
    """Where a histogram's bars go in its SVG: left and top edges, width and height of the plot,
    width of one bin (pixels)."""

    left: int
    top: int
    width: int
    height: int
    bin: float

    @classmethod
    def of(cls, spec: HistogramSpec, n_bins: int) -> _PlotArea:
        left, right, top, bottom = 42, 18, 34, 36
        width = spec.width - left - right
        return cls(left, top, width, spec.height - top - bottom, width / n_bins)


def histogram_svg(values: np.ndarray, edges: np.ndarray, spec: HistogramSpec) -> str:
    """A histogram of ``values`` in bins ``edges`` (equal widths on screen) drawn as ``spec``
    says, each bar titled with its count."""
    counts, _ = np.histogram(values, edges)
    n = len(counts)
    a = _PlotArea.of(spec, n)
    peak = max(int(counts.max()), 1)
    base = a.top + a.height
    parts = [f'<svg class="{escape(spec.css_class)}" viewBox="0 0 {spec.width} {spec.height}" '
             f'width="{spec.width}" height="{spec.height}" role="img" aria-label="{escape(spec.title)}">',
             f'<text x="{a.left}" y="14" class="t">{escape(spec.title)}</text>',
             # y axis: 0 and the peak
             f'<line x1="{a.left}" y1="{a.top}" x2="{a.left + a.width}" y2="{a.top}" class="g"/>',
             f'<text x="{a.left - 4}" y="{a.top + 4}" class="yl">{peak}</text>',
             f'<text x="{a.left - 4}" y="{base + 4}" class="yl">0</text>']
    for i, c in enumerate(counts):
        h = a.height * int(c) / peak
        x = a.left + i * a.bin
        parts.append(f'<rect x="{_num(x + 0.5)}" y="{_num(base - h)}" width="{_num(max(a.bin - 1, 0.5))}" '
                     f'height="{_num(h)}"><title>{escape(spec.label(edges[i]))} to '
                     f'{escape(spec.label(edges[i + 1]))}: {int(c)}</title></rect>')
    parts.append(f'<line x1="{a.left}" y1="{base}" x2="{a.left + a.width}" y2="{base}" class="a"/>')
    ticks = spec.ticks if spec.ticks is not None else range(0, n + 1, max(1, math.ceil((n + 1) / 7)))
    for i in ticks:
        x = _num(a.left + i * a.bin)
        parts.append(f'<line x1="{x}" y1="{base}" x2="{x}" y2="{base + 4}" class="a"/>'
                     f'<text x="{x}" y="{base + 16}" class="xl">{escape(spec.label(edges[i]))}</text>')
    if spec.marker is not None:
        parts.append(_marker_svg(spec.marker, edges, a))
    parts.append("</svg>")
    return "".join(parts)


def _marker_svg(marker: tuple[float, str], edges: np.ndarray, a: _PlotArea) -> str:
    """The dashed line and text of ``marker`` (value, text) on a histogram of bins ``edges``."""
    value, text = marker
    n = len(edges) - 1
    pos = float(np.interp(value, edges, np.arange(n + 1)))
    x = a.left + pos * a.bin
    anchor = "end" if pos > n / 2 else "start"
    dx = -3 if anchor == "end" else 3
    return (f'<line x1="{_num(x)}" y1="{a.top - 2}" x2="{_num(x)}" y2="{a.top + a.height}" class="m"/>'
            f'<text x="{_num(x + dx)}" y="{a.top - 4}" class="ml" text-anchor="{anchor}">{escape(text)}</text>')


def _si(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def area_histogram(areas: np.ndarray) -> str | None:
    """Histogram of polygon areas (m²) in log-spaced bins (a quarter of a decade, or more for a
    wide range); None without a positive area."""
    a = np.asarray(areas, dtype=np.float64)
    a = a[np.isfinite(a) & (a > 0)]
    if a.size == 0:
        return None
    logs = np.log10(a)
    lo, hi = float(logs.min()), float(logs.max())
    for step in (0.25, 0.5, 1.0):
        e0, e1 = math.floor(lo / step) * step, math.ceil(hi / step) * step
        if e1 <= e0:
            e1 = e0 + step
        if (e1 - e0) / step <= 24:
            break
    n = max(1, round((e1 - e0) / step))
    edges = e0 + step * np.arange(n + 1)
    logs = np.clip(logs, edges[0], edges[-1])
    decades = [i for i, e in enumerate(edges) if abs(e - round(e)) < 1e-9]
    ticks = decades if len(decades) >= 2 else None
    spec = HistogramSpec(title="Polygon area (m², log scale)", label=lambda e: _si(10 ** e),
                         css_class="hist area", ticks=ticks)
    return histogram_svg(logs, edges, spec)


def probability_histogram(probs: np.ndarray, threshold: float | None) -> str | None:
    """Histogram of the polygons' mean probability in bins of 0.05, from the lowest value (or the
    threshold) to 1, the threshold marked; None without a value."""
    p = np.asarray(probs, dtype=np.float64)
    p = p[np.isfinite(p)]
    if p.size == 0:
        return None
    low = float(p.min()) if threshold is None else min(float(p.min()), float(threshold))
    e0 = max(0.0, math.floor(low * 20) / 20)
    if e0 >= 1.0:
        e0 = 0.95
    n = max(1, round((1.0 - e0) / 0.05))
    edges = np.linspace(e0, 1.0, n + 1)
    marker = (float(threshold), f"threshold {threshold:.2f}") if threshold is not None else None
    spec = HistogramSpec(title="Polygon mean probability", label=lambda e: f"{e:.2f}", marker=marker,
                         css_class="hist prob")
    return histogram_svg(np.clip(p, e0, 1.0), edges, spec)


def polygon_histograms(gdf: Any, threshold: float | None) -> str:
    """The area and mean-probability histograms of the polygons of ``gdf`` (a GeoDataFrame or
    None) as inline SVG, the ``threshold`` marked; "" when there is none."""
    hist = []
    if gdf is not None and len(gdf):
        if "area_m2" in gdf.columns:
            hist.append(area_histogram(gdf["area_m2"].to_numpy(dtype=np.float64)))
        if "mean_prob" in gdf.columns:
            hist.append(probability_histogram(gdf["mean_prob"].to_numpy(dtype=np.float64), threshold))
    return "".join(h for h in hist if h)


def timings_table(timings: Mapping[str, float]) -> str:
    """The stage timings as a table with a bar per stage (its share of the largest stage);
    ``total`` last and without a bar."""
    stages = [(k, float(v)) for k, v in timings.items()
              if k != "total" and isinstance(v, (int, float)) and math.isfinite(v)]
    total = timings.get("total")
    peak = max((v for _, v in stages), default=0.0) or 1.0
    rows = []
    for name, seconds in stages:
        pct = 100.0 * seconds / peak
        rows.append(f'<tr><th scope="row">{escape(name)}</th><td class="num">{seconds:.2f}</td>'
                    f'<td class="bar"><span style="width:{pct:.1f}%"></span></td></tr>')
    if isinstance(total, (int, float)):
        rows.append(f'<tr class="total"><th scope="row">total</th><td class="num">{float(total):.2f}</td><td></td></tr>')
    if not rows:
        return '<p class="muted">no timings recorded</p>'
    return ('<table class="timings"><thead><tr><th>stage</th><th class="num">seconds</th><th></th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def status_counts(statuses: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in statuses:
        out[s] = out.get(s, 0) + 1
    return out

"""Small charts as inline SVG (no chart library): histograms of polygon area and mean
probability, and bars of the stage timings."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from html import escape

import numpy as np


def _num(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def histogram_svg(values: np.ndarray, edges: np.ndarray, *, label: Callable[[float], str], title: str,
                  marker: tuple[float, str] | None = None, css_class: str = "hist",
                  ticks: Sequence[int] | None = None, width: int = 380, height: int = 200) -> str:
    """A histogram of ``values`` in bins ``edges`` (equal widths on screen), the edges ``ticks``
    (indices; default: about seven) labelled with ``label(edge)``, an optional dashed ``marker``
    (value, text), each bar titled with its count."""
    counts, _ = np.histogram(values, edges)
    n = len(counts)
    left, right, top, bottom = 42, 18, 34, 36
    pw, ph = width - left - right, height - top - bottom
    bw = pw / n
    peak = max(int(counts.max()), 1)
    parts = [f'<svg class="{escape(css_class)}" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
             f'<text x="{left}" y="14" class="t">{escape(title)}</text>']
    # y axis: 0 and the peak
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left + pw}" y2="{top}" class="g"/>')
    parts.append(f'<text x="{left - 4}" y="{top + 4}" class="yl">{peak}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + ph + 4}" class="yl">0</text>')
    for i, c in enumerate(counts):
        h = ph * int(c) / peak
        x = left + i * bw
        parts.append(f'<rect x="{_num(x + 0.5)}" y="{_num(top + ph - h)}" width="{_num(max(bw - 1, 0.5))}" '
                     f'height="{_num(h)}"><title>{escape(label(edges[i]))} to {escape(label(edges[i + 1]))}: '
                     f'{int(c)}</title></rect>')
    parts.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" class="a"/>')
    if ticks is None:
        ticks = range(0, n + 1, max(1, math.ceil((n + 1) / 7)))
    for i in ticks:
        x = left + i * bw
        parts.append(f'<line x1="{_num(x)}" y1="{top + ph}" x2="{_num(x)}" y2="{top + ph + 4}" class="a"/>')
        parts.append(f'<text x="{_num(x)}" y="{top + ph + 16}" class="xl">{escape(label(edges[i]))}</text>')
    if marker is not None:
        value, text = marker
        pos = float(np.interp(value, edges, np.arange(n + 1)))
        x = left + pos * bw
        parts.append(f'<line x1="{_num(x)}" y1="{top - 2}" x2="{_num(x)}" y2="{top + ph}" class="m"/>')
        anchor = "end" if pos > n / 2 else "start"
        dx = -3 if anchor == "end" else 3
        parts.append(f'<text x="{_num(x + dx)}" y="{top - 4}" class="ml" text-anchor="{anchor}">{escape(text)}</text>')
    parts.append("</svg>")
    return "".join(parts)


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
    return histogram_svg(logs, edges, label=lambda e: _si(10 ** e), title="Polygon area (m², log scale)",
                         css_class="hist area", ticks=ticks)


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
    return histogram_svg(np.clip(p, e0, 1.0), edges, label=lambda e: f"{e:.2f}",
                         title="Polygon mean probability", marker=marker, css_class="hist prob")


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

"""The HTML document of a report page: one file, everything inlined, and a Content Security
Policy that forbids the page any request (images come as ``data:`` URIs, scripts and styles
inline), so a page that works offline is also one that cannot leak a request."""

from __future__ import annotations

from html import escape
from typing import Any

from pipeline import __version__
from pipeline.report import assets

#: The page may load nothing: no script, style, image, font or connection from anywhere but
#: itself (inline) and ``data:`` URIs.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
       "base-uri 'none'; form-action 'none'")


def html_document(*, title: str, subtitle: str, aside: str, cards: str, data: dict[str, Any]) -> bytes:
    """The page: a header, the map with the ``aside`` (HTML) beside it, the ``cards`` (HTML) below,
    Leaflet and the page's script inline, ``data`` (the map's layers) as JSON."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{escape(CSP)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="landslide-pipeline {escape(__version__)}">
<title>{escape(title)}</title>
<style>{assets.leaflet_css()}</style>
<style>{assets.page_css()}</style>
</head>
<body>
<header><h1>{escape(title)}</h1><span class="sub">{escape(subtitle)}</span></header>
<div class="layout">
<div class="map-wrap"><div id="map" role="region" aria-label="map"></div></div>
<aside>
{aside}
</aside>
</div>
<div class="cards">
{cards}
</div>
<script>{assets.leaflet_js()}</script>
<script type="application/json" id="report-data">{assets.script_json(data)}</script>
<script>{assets.page_js()}</script>
</body>
</html>
""".encode()


def card(title: str, body: str, css_class: str = "") -> str:
    cls = f"card {css_class}".strip()
    return f'<section class="{escape(cls)}"><h2>{escape(title)}</h2>{body}</section>'


def definitions(pairs: list[tuple[str, str]]) -> str:
    """A ``<dl>`` of (label, HTML value) pairs."""
    items = "".join(f"<dt>{escape(k)}</dt><dd>{v}</dd>" for k, v in pairs)
    return f'<dl class="summary">{items}</dl>'


#: The last note of every page.
OFFLINE_NOTE = "Made for offline use: everything is inside this one file; it makes no network request."


def about_card(notes: list[str]) -> str:
    """The "About this page" card: ``notes`` (text), then :data:`OFFLINE_NOTE`."""
    body = "".join(f'<p class="note">{escape(n)}</p>' for n in [*notes, OFFLINE_NOTE])
    return card("About this page", body)


def fmt_area(m2: float | None) -> str:
    """An area in m² as km² (or ha, or m² when small)."""
    if m2 is None:
        return "\u2014"
    m2 = float(m2)
    if m2 >= 1e6:
        return f"{m2 / 1e6:,.2f} km²"
    if m2 >= 1e4:
        return f"{m2 / 1e4:,.2f} ha"
    return f"{m2:,.0f} m²"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "\u2014"
    for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def fmt_time(text: str | None) -> str:
    """An ISO timestamp as ``YYYY-MM-DD HH:MM:SS UTC`` (in UTC when it has a zone); other text as is."""
    import datetime as dt

    if not text:
        return "\u2014"
    try:
        t = dt.datetime.fromisoformat(str(text))
    except ValueError:
        return str(text)
    if t.tzinfo is not None:
        return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return t.strftime("%Y-%m-%d %H:%M:%S")

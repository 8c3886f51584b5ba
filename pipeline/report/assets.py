"""What a report page inlines: the vendored Leaflet, the page's own script and style, images as
``data:`` URIs, and JSON that is safe inside a ``<script>`` element.

Nothing here refers to the network: Leaflet's stylesheet names its images by relative URL
(``url(images/layers.png)``); they are replaced by ``data:`` URIs, so the page makes no request
at all when it is opened, from a file or from ``python -m pipeline view``.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from pathlib import Path
from typing import Any

STATIC = Path(__file__).resolve().parent / "static"
LEAFLET = STATIC / "leaflet"
#: The vendored Leaflet release (see ``static/leaflet/SOURCE.txt``).
LEAFLET_VERSION = "1.9.4"


def data_uri(data: bytes, mime: str) -> str:
    """``data:<mime>;base64,...`` of ``data``."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


@functools.cache
def leaflet_js() -> str:
    """Leaflet's script, as released."""
    return _script_text((LEAFLET / "leaflet.js").read_text(encoding="utf-8"))


@functools.cache
def leaflet_css() -> str:
    """Leaflet's stylesheet with its images inlined as ``data:`` URIs, without its comments."""
    css = (LEAFLET / "leaflet.css").read_text(encoding="utf-8")

    def inline(match: re.Match[str]) -> str:
        name = match.group(1)
        image = LEAFLET / "images" / name
        return f"url({data_uri(image.read_bytes(), 'image/png')})"

    css = re.sub(r"url\(images/([A-Za-z0-9_.-]+\.png)\)", inline, css)
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.DOTALL)  # comments (two name bug trackers' URLs)
    return _style_text(css)


@functools.cache
def page_js() -> str:
    """The report pages' own script (``static/report.js``)."""
    return _script_text((STATIC / "report.js").read_text(encoding="utf-8"))


@functools.cache
def page_css() -> str:
    """The report pages' own style (``static/report.css``)."""
    return _style_text((STATIC / "report.css").read_text(encoding="utf-8"))


def _script_text(text: str) -> str:
    # a script element ends at the first "</script"; the vendored and own scripts hold none
    if re.search(r"</script", text, re.IGNORECASE):
        raise ValueError("a script to inline contains '</script'")
    return text


def _style_text(text: str) -> str:
    if re.search(r"</style", text, re.IGNORECASE):
        raise ValueError("a stylesheet to inline contains '</style'")
    return text


def script_json(data: Any) -> str:
    """``data`` as JSON text that can sit inside ``<script type="application/json">``: ``<``,
    ``>`` and ``&`` escaped as ``\\u003c``... (no ``</script>`` can end the element early), and
    the line separators JavaScript once disallowed in strings escaped too."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))

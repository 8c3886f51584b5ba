"""Namespace-free lookups in XML documents (SAFE product metadata, manifest.safe, GDAL VRTs)."""

from __future__ import annotations

import xml.etree.ElementTree as ET


def local_name(tag: str) -> str:
    """An element's tag without its ``{namespace}``."""
    return tag.rsplit("}", 1)[-1]


def find_text(root: ET.Element, *names: str) -> str | None:
    """The stripped text of the first element (in document order) named one of ``names``
    that has text, or None."""
    for el in root.iter():
        if local_name(el.tag) in names and el.text and el.text.strip():
            return el.text.strip()
    return None

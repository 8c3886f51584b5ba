"""Sentinel-2 products from a STAC ItemCollection on disk (read with pystac), as per-band scenes.

Each item becomes a product whose bands are its assets: an asset is taken for
a band when its key or its ``eo:bands`` name is the band's name (``B04``), or
its key is Earth Search's name for it (``red``); GeoTIFF/COG assets are
preferred to JPEG 2000 ones of the same band. Asset files must be on local
disk (relative hrefs are relative to the JSON file); an item with remote
assets is skipped with the reason: download the products first. The level
comes from the collection or product id, the DN offset from the processing
baseline (``s2:processing_baseline``: -1000 from 04.00 on, unless
``earthsearch:boa_offset_applied`` says the files are already corrected).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from pathlib import Path
from typing import Any

from pipeline.core.channels import S2_BANDS
from pipeline.core.configbase import is_remote_path, scene_id_from_name
from pipeline.core.errors import InputError
from pipeline.run.products import Product, Skipped

log = logging.getLogger(__name__)

#: Earth Search (element84) asset keys -> band names
EARTH_SEARCH_KEYS = {
    "coastal": "B01", "blue": "B02", "green": "B03", "red": "B04", "rededge1": "B05", "rededge2": "B06",
    "rededge3": "B07", "nir": "B08", "nir08": "B8A", "nir09": "B09", "cirrus": "B10", "swir16": "B11",
    "swir22": "B12", "scl": "SCL",
}
_JP2 = re.compile(r"\.jp2$|-jp2$", re.IGNORECASE)


def stac_products(path: Path) -> tuple[list[Product], list[Skipped]]:
    """The items of the ItemCollection ``path`` as products, and those that cannot be used."""
    import pystac

    try:
        collection = pystac.ItemCollection.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - pystac raises JSON, schema and key errors alike
        raise InputError(f"{path}: not a readable STAC ItemCollection ({type(exc).__name__}: {exc})") from None
    products: list[Product] = []
    skipped: list[Skipped] = []
    for item in collection.items:
        source = f"{path}#{item.id}"
        try:
            products.append(_item_product(item, path, source))
        except InputError as exc:
            skipped.append(Skipped(source, str(exc), scene_id_from_name(item.id)))
    return products, skipped


def _item_product(item: Any, path: Path, source: str) -> Product:
    import shapely

    props = item.properties
    bands, remote = _band_assets(item, path.parent)
    if remote:
        band, href = remote[0]
        raise InputError(f"asset {band} is not a local file ({href}): download the products first; "
                         "the job reads local files only")
    if not any(b in bands for b in S2_BANDS):
        raise InputError("no Sentinel-2 band assets (keys or eo:bands names B01..B12, B8A, or Earth Search's)")
    sensing = item.datetime or _parse_time(props.get("start_datetime"))
    cloud = props.get("eo:cloud_cover")
    return Product(
        source=source, id=scene_id_from_name(props.get("s2:product_uri", item.id).removesuffix(".SAFE")),
        kind="stac", path=None, sensing=sensing,
        footprint=shapely.geometry.shape(item.geometry) if item.geometry else None,
        cloud_cover=float(cloud) if isinstance(cloud, (int, float)) else None,
        level=_level(item), bands={b: p for b, p in bands.items() if b != "SCL"}, scl=bands.get("SCL"),
        dn_offset=_dn_offset(props),
    )


def _band_assets(item: Any, base: Path) -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """Band -> local file of the item's assets, and the (band, href) of assets not on local disk."""
    chosen: dict[str, tuple[bool, str]] = {}  # band -> (is JPEG 2000, href)
    for key, asset in item.assets.items():
        band = _band_of(key, asset)
        if band is None:
            continue
        jp2 = bool(_JP2.search(key) or _JP2.search(asset.href) or "jp2" in (asset.media_type or ""))
        if band not in chosen or (chosen[band][0] and not jp2):
            chosen[band] = (jp2, asset.href)
    local: dict[str, Path] = {}
    remote: list[tuple[str, str]] = []
    for band, (_, href) in sorted(chosen.items()):
        target = href.removeprefix("file://")
        if is_remote_path(target):
            remote.append((band, href))
        else:
            file = Path(target).expanduser()
            local[band] = file if file.is_absolute() else base / file
    return local, remote


def _band_of(key: str, asset: Any) -> str | None:
    bare = _JP2.sub("", key)
    if bare.upper() in (*S2_BANDS, "SCL"):
        return bare.upper()
    if bare.lower() in EARTH_SEARCH_KEYS:
        return EARTH_SEARCH_KEYS[bare.lower()]
    for entry in asset.extra_fields.get("eo:bands", []) or []:
        name = str(entry.get("name", "")).upper() if isinstance(entry, dict) else ""
        if name in S2_BANDS:
            return name
    return None


def _level(item: Any) -> str | None:
    text = " ".join(str(v) for v in (item.collection_id, item.id, item.properties.get("s2:product_type"),
                                     item.properties.get("s2:product_uri")) if v)
    if re.search(r"l2a|msil2a|2a\b", text, re.IGNORECASE):
        return "L2A"
    if re.search(r"l1c|msil1c|1c\b", text, re.IGNORECASE):
        return "L1C"
    return None


def _dn_offset(props: dict[str, Any]) -> float:
    if props.get("earthsearch:boa_offset_applied") is True:
        return 0.0
    baseline = str(props.get("s2:processing_baseline") or "")
    try:
        return -1000.0 if float(baseline) >= 4.0 else 0.0
    except ValueError:
        if baseline:
            log.warning("s2:processing_baseline %r is not a number; no DN offset applied", baseline)
        return 0.0


def _parse_time(text: Any) -> dt.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None

"""Channel names and the Landslide4Sense channel order.

Channels are named by the Sentinel-2 band (zero padded, ``B01``..``B12`` and
``B8A``) or by the terrain layer (``SLOPE`` in degrees, ``DEM`` in metres).
"""

from __future__ import annotations

#: Sentinel-2 bands and their native resolution in metres.
S2_BANDS: dict[str, int] = {
    "B01": 60,
    "B02": 10,
    "B03": 10,
    "B04": 10,
    "B05": 20,
    "B06": 20,
    "B07": 20,
    "B08": 10,
    "B8A": 20,
    "B09": 60,
    "B10": 60,
    "B11": 20,
    "B12": 20,
}

SLOPE = "SLOPE"
DEM = "DEM"
TERRAIN_CHANNELS: tuple[str, ...] = (SLOPE, DEM)

#: Landslide4Sense order: B1..B12 without B8A, then slope, then DEM.
L4S_CHANNELS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07",
    "B08", "B09", "B10", "B11", "B12", SLOPE, DEM,
)

ALL_CHANNELS: tuple[str, ...] = (*S2_BANDS, SLOPE, DEM)

_ALIASES = {"B1": "B01", "B2": "B02", "B3": "B03", "B4": "B04", "B5": "B05",
            "B6": "B06", "B7": "B07", "B8": "B08", "B9": "B09",
            "B13": SLOPE, "B14": DEM, "ELEVATION": DEM}


def canonical(name: str) -> str:
    """Return the canonical channel name for ``name`` (``b2`` -> ``B02``).

    Raises ``ValueError`` for names that are not channels.
    """
    key = name.strip().upper()
    key = _ALIASES.get(key, key)
    if key not in ALL_CHANNELS:
        raise ValueError(
            f"unknown channel {name!r}; expected one of {', '.join(ALL_CHANNELS)}"
        )
    return key

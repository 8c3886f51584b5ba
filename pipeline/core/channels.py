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


#: Physical units of every channel, the units models see: Sentinel-2 bands as reflectance
#: (0-1, top of atmosphere for L1C, surface for L2A), slope in degrees, elevation in metres.
UNITS: dict[str, str] = {**{band: "reflectance" for band in S2_BANDS}, SLOPE: "degree", DEM: "metre"}

#: The Landslide4Sense scaling: each of the 14 channels is its original value divided by this
#: vector (the dataset author's answer in iarai/Landslide4Sense-2022 issues #2 and #4). The
#: original values are Sentinel-2 L1C digital numbers (reflectance x 10000), degrees and metres.
L4S_DIVISOR: tuple[float, ...] = (
    1111.81236406, 824.63171476, 663.41636217, 445.17289745, 645.8582926, 1547.73508126,
    1960.44401001, 1941.32229668, 674.07572865, 9.04787384, 1113.98338755, 519.90397929,
    20.29228266, 772.83144788,
)

#: Sentinel-2 digital numbers per unit of reflectance (the products' quantification value).
S2_QUANTIFICATION = 10000.0


def physical_factors(channels: tuple[str, ...] | list[str], units: str) -> list[float]:
    """Per-channel factors that turn stored values in ``units`` into physical units.

    ``units``: ``physical`` (already reflectance, degrees, metres), ``dn``
    (Sentinel-2 bands as digital numbers, reflectance x 10000; terrain in
    degrees and metres) or ``l4s`` (the Landslide4Sense scaling, which
    needs the 14 channels in :data:`L4S_CHANNELS` order or a subset by name).
    """
    names = [canonical(c) for c in channels]
    if units == "physical":
        return [1.0] * len(names)
    if units == "dn":
        return [1.0 / S2_QUANTIFICATION if c in S2_BANDS else 1.0 for c in names]
    if units == "l4s":
        factors = []
        for c in names:
            if c not in L4S_CHANNELS:
                raise ValueError(f"channel {c} is not a Landslide4Sense channel; units 'l4s' cannot scale it")
            divisor = L4S_DIVISOR[L4S_CHANNELS.index(c)]
            factors.append(divisor / S2_QUANTIFICATION if c in S2_BANDS else divisor)
        return factors
    raise ValueError(f"unknown units {units!r}; expected physical, dn or l4s")

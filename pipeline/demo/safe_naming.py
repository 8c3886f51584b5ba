"""Sentinel-2 product names: the product folder, its granule, operational identifiers and image paths."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pipeline.demo.sentinel2 import DEFAULT_TILE, Product, parse_baseline


def _stamp(t: dt.datetime) -> str:
    return t.strftime("%Y%m%dT%H%M%S")


@dataclass(frozen=True)
class SafeNaming:
    """Names of a Sentinel-2 product, its granule and its files (ESA compact naming)."""

    product: Product
    baseline: str
    sensing_time: dt.datetime
    tile: str = DEFAULT_TILE
    mission: str = "S2B"
    relative_orbit: int = 117
    absolute_orbit: int = 32766

    @property
    def generation_time(self) -> dt.datetime:
        t = self.sensing_time + dt.timedelta(hours=2, minutes=19, seconds=11)
        return t.replace(microsecond=0)

    @property
    def granule_sensing_time(self) -> dt.datetime:
        return self.sensing_time + dt.timedelta(seconds=47)

    @property
    def baseline_code(self) -> str:
        major, minor = parse_baseline(self.baseline)
        return f"N{major:02d}{minor:02d}"

    @property
    def product_name(self) -> str:
        """``S2B_MSIL2A_20230615T015619_N0510_R117_T54TWN_20230615T041530.SAFE``."""
        return (
            f"{self.mission}_MSI{self.product}_{_stamp(self.sensing_time)}_{self.baseline_code}"
            f"_R{self.relative_orbit:03d}_T{self.tile}_{_stamp(self.generation_time)}.SAFE"
        )

    @property
    def granule_name(self) -> str:
        """``L2A_T54TWN_A032766_20230615T015706``."""
        return f"{self.product}_T{self.tile}_A{self.absolute_orbit:06d}_{_stamp(self.granule_sensing_time)}"

    def _operational_id(self, kind: str, detail: str) -> str:
        """Identifier of the operational granule (``TL``) or datastrip (``DS``)."""
        return (
            f"{self.mission}_OPER_MSI_{self.product}_{kind}_{self.mission[1:]}PS_{_stamp(self.generation_time)}"
            f"_{detail}_N{self.baseline}"
        )

    @property
    def granule_identifier(self) -> str:
        return self._operational_id("TL", f"A{self.absolute_orbit:06d}_T{self.tile}")

    @property
    def datastrip_identifier(self) -> str:
        return self._operational_id("DS", f"S{_stamp(self.granule_sensing_time)}")

    @property
    def datatake_identifier(self) -> str:
        return f"G{self.mission}_{_stamp(self.sensing_time)}_{self.absolute_orbit:06d}_N{self.baseline}"

    def image_file(self, layer: str, resolution: int) -> str:
        """Path of a layer relative to the product, without ``.jp2`` (as in IMAGE_FILE)."""
        stem = f"T{self.tile}_{_stamp(self.sensing_time)}_{layer}"
        base = f"GRANULE/{self.granule_name}/IMG_DATA"
        if self.product == "L2A":
            return f"{base}/R{resolution}m/{stem}_{resolution}m"
        return f"{base}/{stem}"

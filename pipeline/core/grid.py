"""The one value object that says where pixels are: :class:`Grid`.

A grid is a CRS, an affine transform (north-up, square pixels) and a shape.
Every stage takes a grid and says which grid it produces. Grids built for a
scene are aligned to the Sentinel-2 10 m pixel grid: pixel edges fall on
multiples of the resolution in the target CRS, which is how Sentinel-2 tiles
are laid out (their origins are multiples of 60 m).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from pipeline.core.errors import GridError

Bounds = tuple[float, float, float, float]


@dataclass(frozen=True)
class Grid:
    """CRS + transform + shape of a north-up raster."""

    crs: CRS
    transform: Affine
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise GridError(f"grid must have a positive shape, got {self.height} x {self.width}")
        t = self.transform
        if t.b != 0 or t.d != 0 or t.e >= 0:
            raise GridError(f"grid must be north-up without rotation, got transform {tuple(t)[:6]}")

    # -- basic properties -------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols)."""
        return (self.height, self.width)

    @property
    def res(self) -> tuple[float, float]:
        """(x, y) pixel size, both positive."""
        return (self.transform.a, -self.transform.e)

    @property
    def bounds(self) -> Bounds:
        """(left, bottom, right, top) in the grid's CRS."""
        left, top = self.transform.c, self.transform.f
        right = left + self.width * self.transform.a
        bottom = top + self.height * self.transform.e
        return (left, bottom, right, top)

    @property
    def pixel_area(self) -> float:
        """Area of one pixel in squared CRS units (m^2 for metric CRSs)."""
        return abs(self.transform.a * self.transform.e)

    # -- derived grids ----------------------------------------------------
    def window(self, window: Window) -> Grid:
        """The sub-grid covered by ``window`` (may extend past this grid)."""
        col_off, row_off = int(window.col_off), int(window.row_off)
        return Grid(
            self.crs,
            self.transform * Affine.translation(col_off, row_off),
            int(window.width),
            int(window.height),
        )

    def bounds_in(self, crs: CRS | str) -> Bounds:
        """This grid's bounds transformed to ``crs`` (densified edges)."""
        return transform_bounds(self.crs, CRS.from_user_input(crs), *self.bounds, densify_pts=21)

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly description (for reports and metadata)."""
        return {
            "crs": self.crs.to_string(),
            "transform": list(self.transform)[:6],
            "width": self.width,
            "height": self.height,
        }

    @classmethod
    def from_bounds(cls, bounds: Bounds, crs: CRS | str, resolution: float) -> Grid:
        """Smallest grid aligned to multiples of ``resolution`` covering ``bounds``.

        Alignment to multiples of the resolution reproduces the Sentinel-2
        pixel grid in its UTM zone.
        """
        if resolution <= 0:
            raise GridError(f"resolution must be positive, got {resolution}")
        left, bottom, right, top = bounds
        if not (right > left and top > bottom):
            raise GridError(f"empty bounds {bounds}")
        eps = 1e-6 * resolution
        x0 = math.floor((left + eps) / resolution) * resolution
        x1 = math.ceil((right - eps) / resolution) * resolution
        y0 = math.floor((bottom + eps) / resolution) * resolution
        y1 = math.ceil((top - eps) / resolution) * resolution
        width = max(1, round((x1 - x0) / resolution))
        height = max(1, round((y1 - y0) / resolution))
        return cls(
            CRS.from_user_input(crs),
            Affine(resolution, 0.0, x0, 0.0, -resolution, y1),
            width,
            height,
        )


def utm_crs_for(lon: float, lat: float) -> CRS:
    """The WGS 84 / UTM zone CRS containing (lon, lat)."""
    zone = int((lon + 180.0) // 6.0) % 60 + 1
    epsg = (32600 if lat >= 0 else 32700) + zone
    return CRS.from_epsg(epsg)


def intersect_bounds(a: Bounds, b: Bounds) -> Bounds | None:
    """Intersection of two (left, bottom, right, top) boxes, or None if empty."""
    left, bottom = max(a[0], b[0]), max(a[1], b[1])
    right, top = min(a[2], b[2]), min(a[3], b[3])
    if right <= left or top <= bottom:
        return None
    return (left, bottom, right, top)

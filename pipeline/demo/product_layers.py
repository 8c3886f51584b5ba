"""The demo scene as a Sentinel-2 product: its layers at each resolution and its metadata summary."""

from __future__ import annotations

import numpy as np

from pipeline.core.channels import S2_BANDS
from pipeline.demo.arrays import block_mean
from pipeline.demo.safe_writer import ProductSummary, RasterLayer
from pipeline.demo.scene import DemoScene
from pipeline.demo.sentinel2 import (
    AOT_QUANTIFICATION,
    L2A_RESOLUTION_LAYERS,
    PRODUCT_BANDS,
    WVP_QUANTIFICATION,
    Product,
    reflectance_to_dn,
)


def _resample_reflectance(native: np.ndarray, native_res: int, res: int) -> np.ndarray:
    """Copy of a band at another resolution: block mean down, nearest up (NaN propagates)."""
    if res == native_res:
        return native
    if res > native_res:
        return block_mean(native, res // native_res)
    factor = native_res // res
    return np.repeat(np.repeat(native, factor, axis=0), factor, axis=1)


def _tci(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    """True colour image: reflectance 0..0.25 -> 1..255, 0 where any channel has no data."""
    rgb = np.stack([r, g, b])
    nodata = ~np.isfinite(rgb).all(axis=0)
    out = np.clip(np.rint(np.nan_to_num(rgb) * 255.0 / 0.25), 1, 255).astype(np.uint8)
    out[:, nodata] = 0
    return out


def scene_layers(scene: DemoScene, product: Product, baseline: str) -> dict[str, RasterLayer]:
    """Layers of an L1C product (bands at native resolution, TCI) or an L2A one (every resolution folder)."""
    native = {b: scene.reflectance(b, product) for b in PRODUCT_BANDS[product]}
    if product == "L1C":
        layers = {
            b: RasterLayer(reflectance_to_dn(refl, baseline), scene.grid(S2_BANDS[b])[0], scene.crs)
            for b, refl in native.items()
        }
        layers["TCI"] = RasterLayer(_tci(native["B04"], native["B03"], native["B02"]), scene.grid(10)[0], scene.crs)
        return layers
    layers = {}
    for res, names in L2A_RESOLUTION_LAYERS.items():
        layers.update(_l2a_resolution_layers(scene, native, res, names, baseline))
    return layers


def _l2a_resolution_layers(
    scene: DemoScene, native: dict[str, np.ndarray], res: int, names: tuple[str, ...], baseline: str,
) -> dict[str, RasterLayer]:
    """The layers of one L2A resolution folder, keyed ``<layer>_<res>m``."""
    crs = scene.crs
    transform = scene.grid(res)[0]
    valid = scene.swath_valid(res)
    refl = {b: _resample_reflectance(native[b], S2_BANDS[b], res) for b in names if b in native}
    layers = {f"{b}_{res}m": RasterLayer(reflectance_to_dn(r, baseline), transform, crs) for b, r in refl.items()}
    factor = res // 10
    aot = np.where(valid, np.rint(block_mean(scene.aot, factor) * AOT_QUANTIFICATION), 0)
    wvp = np.where(valid, np.rint(block_mean(scene.wvp, factor) * WVP_QUANTIFICATION), 0)
    layers[f"AOT_{res}m"] = RasterLayer(aot.astype(np.uint16), transform, crs)
    layers[f"WVP_{res}m"] = RasterLayer(wvp.astype(np.uint16), transform, crs)
    layers[f"TCI_{res}m"] = RasterLayer(_tci(refl["B04"], refl["B03"], refl["B02"]), transform, crs)
    if "SCL" in names:
        layers[f"SCL_{res}m"] = RasterLayer(scene.scl(res), transform, crs)
    return layers


def scene_summary(scene: DemoScene) -> ProductSummary:
    """Footprint, cloud cover and SCL class percentages of the swath, as the product metadata states them."""
    valid = scene.valid10
    scl10 = scene.classes_scl()
    n_valid = max(int(valid.sum()), 1)
    percentages = {int(c): 100.0 * float(((scl10 == c) & valid).sum()) / n_valid for c in range(1, 12)}
    percentages[0] = 100.0 * (1.0 - valid.mean())
    cloud_cover = percentages[8] + percentages[9]
    return ProductSummary(scene.footprint_lonlat(), cloud_cover, percentages)

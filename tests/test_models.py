"""Model registry and input normalization."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.errors import ModelError
from pipeline.model.architectures import ARCHITECTURES, SEED_ENCODERS
from pipeline.model.normalization import normalize, validate_spec
from pipeline.model.registry import PlainUnet, build_model

N_CHANNELS = 14

# Light encoders run by default; the heavy ones are marked slow.
LIGHT_ENCODERS = {"resnet34", "mobilenet_v2", "efficientnet-b0", "mit_b1"}
ARCH_ENCODER = {
    "Unet": "resnet34",
    "UnetPlusPlus": "mobilenet_v2",
    "MAnet": "mobilenet_v2",
    "Linknet": "mobilenet_v2",
    "FPN": "mobilenet_v2",
    "PSPNet": "resnet34",
    "PAN": "mobilenet_v2",
    "DeepLabV3": "mobilenet_v2",
    "DeepLabV3Plus": "resnet34",
    "UPerNet": "mobilenet_v2",
    "Segformer": "mit_b2",
    "DPT": "tu-vit_tiny_patch16_224",
    "PlainUnet": None,
}
DPT_KWARGS = {"dynamic_img_size": True}


def _forward(model: torch.nn.Module, size: int = 128) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(1, N_CHANNELS, size, size))


def test_every_architecture_has_a_test_encoder() -> None:
    assert set(ARCH_ENCODER) == set(ARCHITECTURES)


@pytest.mark.parametrize(
    "arch",
    [
        pytest.param(a, marks=pytest.mark.slow) if a in {"UnetPlusPlus", "UPerNet", "MAnet", "DPT", "Segformer"} else a
        for a in sorted(ARCH_ENCODER)
    ],
)
def test_every_architecture_builds_with_14_channels_and_outputs_logits(arch: str) -> None:
    kwargs = DPT_KWARGS if arch == "DPT" else {}
    model = build_model(arch, ARCH_ENCODER[arch], N_CHANNELS, **kwargs)
    out = _forward(model)
    assert out.shape == (1, 1, 128, 128)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "encoder",
    [e if e in LIGHT_ENCODERS else pytest.param(e, marks=pytest.mark.slow) for e in SEED_ENCODERS],
)
def test_seed_paper_unet_encoders_build_with_14_channels(encoder: str) -> None:
    out = _forward(build_model("Unet", encoder, N_CHANNELS))
    assert out.shape == (1, 1, 128, 128)


def test_architecture_names_are_case_insensitive() -> None:
    assert type(build_model("deeplabv3plus", "resnet34", 3)).__name__ == "DeepLabV3Plus"
    assert isinstance(build_model("plain_unet", None, 3), PlainUnet)


@pytest.mark.parametrize(
    ("arch", "encoder", "kwargs", "match"),
    [
        ("NoSuchNet", "resnet34", {}, "unknown architecture"),
        ("Unet", "resnet-9000", {}, "unknown encoder"),
        ("Unet", None, {}, "needs an encoder"),
        ("Unet", "resnet34", {"encoder_weights": "imagenet"}, "encoder_weights must be None"),
        ("UnetPlusPlus", "mit_b1", {}, "cannot build UnetPlusPlus"),
        ("PlainUnet", "resnet34", {}, "no encoder"),
    ],
)
def test_bad_model_requests_raise_model_error(arch: str, encoder: str | None, kwargs: dict, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        build_model(arch, encoder, N_CHANNELS, **kwargs)


@pytest.mark.parametrize("shape", [(1, 1), (100, 77), (128, 128)])
def test_plain_unet_keeps_any_input_shape(shape: tuple[int, int]) -> None:
    model = PlainUnet(N_CHANNELS, base_channels=4, depth=3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, N_CHANNELS, *shape))
    assert out.shape == (2, 1, *shape)


# -- normalization -----------------------------------------------------------------
def _patch(rng: np.random.Generator, n: int = 3, c: int = N_CHANNELS, size: int = 32) -> np.ndarray:
    return rng.gamma(2.0, 1.0, size=(n, c, size, size)).astype(np.float32)


def _fixed(c: int = N_CHANNELS, clip: float | None = 10.0) -> dict:
    spec = {"method": "fixed", "mean": [1.0 + 0.1 * k for k in range(c)], "std": [0.5 + 0.25 * k for k in range(c)]}
    return {**spec, "clip": clip} if clip is not None else spec


def test_fixed_normalization_ignores_invalid_pixels_and_zeroes_them() -> None:
    rng = np.random.default_rng(1)
    x = _patch(rng, n=1)
    valid = np.ones((1, 32, 32), bool)
    valid[:, :, :8] = False
    polluted = x.copy()
    polluted[:, :, :, :8] = np.nan
    polluted[:, 0, 0, 0] = 1e9
    a = normalize(x, valid, _fixed())
    b = normalize(polluted, valid, _fixed())
    np.testing.assert_array_equal(b[:, :, :, :8], 0.0)
    assert np.abs(a[:, :, :, 8:]).max() > 0.5  # not trivially zero
    np.testing.assert_allclose(a[:, :, :, 8:], b[:, :, :, 8:], atol=1e-6)
    # a non-finite value in one band drops the whole pixel, even where the mask says valid
    polluted[0, 3, 20, 20] = np.inf
    assert (normalize(polluted, valid, _fixed())[0, :, 20, 20] == 0).all()


def test_fixed_normalization_matches_formula_and_clips() -> None:
    rng = np.random.default_rng(2)
    x = _patch(rng, n=1, c=2)
    x[0, 1, 0, 0] = 1e6
    x[0, 0, 0, 1] = -1e6
    spec = {"method": "fixed", "mean": [2.0, 0.5], "std": [1.5, 0.25], "clip": 10}
    out = normalize(x, None, spec)
    for c in range(2):
        expected = np.clip((x[0, c] - spec["mean"][c]) / spec["std"][c], -10, 10)
        np.testing.assert_allclose(out[0, c], expected, rtol=1e-5, atol=1e-5)
    assert out[0, 1, 0, 0] == 10.0 and out[0, 0, 0, 1] == -10.0
    unclipped = normalize(x, None, {**spec, "clip": None})
    assert unclipped[0, 1, 0, 0] == pytest.approx((1e6 - 0.5) / 0.25)


def test_torch_and_numpy_normalization_agree() -> None:
    rng = np.random.default_rng(3)
    x = _patch(rng, n=4)
    valid = rng.random((4, 32, 32)) > 0.2
    valid[0] = True
    valid[1] = False
    for spec in (
        _fixed(clip=None),
        {"method": "fixed", "mean": list(range(N_CHANNELS)), "std": [2.0] * N_CHANNELS, "clip": 3},
        {"method": "none"},
    ):
        a = normalize(x, valid, spec)
        b = normalize(torch.from_numpy(x), torch.from_numpy(valid), spec)
        assert isinstance(b, torch.Tensor) and b.dtype == torch.float32
        np.testing.assert_allclose(a, b.numpy(), atol=1e-5, err_msg=str(spec))
    assert np.all(normalize(x, valid, _fixed())[1] == 0.0)


def test_fixed_normalization_uses_mean_and_std() -> None:
    x = np.full((1, 2, 4, 4), 5.0, np.float32)
    out = normalize(x, None, {"method": "fixed", "mean": [1.0, 5.0], "std": [2.0, 1.0]})
    np.testing.assert_array_equal(out[0, 0], 2.0)
    np.testing.assert_array_equal(out[0, 1], 0.0)


def test_none_normalization_passes_values_but_zeroes_nan() -> None:
    x = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
    x[0, 0, 0, 0] = np.nan
    out = normalize(x, None, {"method": "none"})
    assert out[0, 0, 0, 0] == 0.0 and out[0, 1, 0, 0] == 0.0  # whole pixel dropped
    np.testing.assert_array_equal(out[0, :, 1, 1], x[0, :, 1, 1])


@pytest.mark.parametrize("spec", [
    {"method": "fixed", "mean": [1.0, 5.0, -2.0], "std": [2.0, 1.0, 0.5], "clip": 3.0},
    {"method": "fixed", "mean": [1.0, 5.0, -2.0], "std": [2.0, 1.0, 0.5]},
    {"method": "none"},
])
def test_a_mask_known_to_hold_only_finite_pixels_skips_the_check_with_the_same_result(spec: dict) -> None:
    """The inference's masks exclude every non-finite pixel: ``finite=True`` skips recomputing that
    and gives the same values, bit for bit, with NaN and infinities outside the mask."""
    rng = np.random.default_rng(3)
    x = rng.normal(0, 4, (5, 3, 16, 16)).astype(np.float32)
    bad = rng.random((5, 16, 16)) < 0.1
    x[:, 1][bad] = np.nan
    x[:, 2][bad & (rng.random((5, 16, 16)) < 0.5)] = np.inf
    valid = ~bad & (rng.random((5, 16, 16)) < 0.9)
    valid[0] = ~bad[0]  # a patch whose only invalid pixels are the non-finite ones
    checked = normalize(x, valid, spec)
    hinted = normalize(x.copy(), valid, spec, copy=False, finite=True)
    assert np.isfinite(checked).all() and (checked.transpose(1, 0, 2, 3)[:, ~valid] == 0).all()
    np.testing.assert_array_equal(hinted.view(np.uint32), checked.view(np.uint32))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"method": "zscore"}, "unknown method"),
        ({"method": "fixed", "mean": [0.0]}, "std"),
        ({"method": "fixed", "mean": [0.0], "std": [0.0]}, "positive"),
        ({"method": "none", "clip": 2}, "unknown key"),
        ({"method": "fixed", "mean": [0.0] * 14, "std": [1.0] * 14, "scale": 2}, "unknown key"),
        ({"method": "fixed"}, "required"),
        ({"method": "patch_robust"}, "retrain"),
        ({"method": "scene_robust", "clip": 10.0}, "retrain"),
        ({"method": "fixed", "mean": [0.0, 1.0], "std": [1.0, 1.0]}, "14 channels"),
    ],
)
def test_bad_normalization_specs_are_refused(spec: dict, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        validate_spec(spec, n_channels=N_CHANNELS)


def test_the_default_model_runs_without_importing_the_model_library() -> None:
    """segmentation-models-pytorch (and torchvision with it) is imported only for its architectures:
    a worker serving the shipped PlainUnet skips seconds of imports. The workers' modules do not
    import GeoPandas either (the polygons' table is built in the main process)."""
    import subprocess
    import sys

    code = (
        "import sys, importlib, numpy as np, torch\n"
        "import pipeline.model.registry\n"
        "from pipeline.run.cluster import WORKER_IMPORTS\n"
        "for name in WORKER_IMPORTS: importlib.import_module(name)\n"
        "from pipeline.model.artefact import load_artefact\n"
        "from pipeline.core.config import DEFAULT_MODEL\n"
        "m = load_artefact(DEFAULT_MODEL)\n"
        "m.module.eval()(torch.zeros(1, len(m.channels), 128, 128))\n"
        "print(sorted(n for n in ('segmentation_models_pytorch', 'torchvision', 'geopandas') if n in sys.modules))\n"
        "pipeline.model.registry.build_model('Unet', 'resnet18', 3)\n"
        "print('segmentation_models_pytorch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["[]", "True"]


def test_the_run_warms_its_workers_with_the_model_library_only_when_a_model_needs_it() -> None:
    from types import SimpleNamespace

    from pipeline.run.cluster import worker_imports

    assert worker_imports([SimpleNamespace(architecture="PlainUnet")]) == ()
    assert worker_imports([SimpleNamespace(architecture="plainunet"), SimpleNamespace(architecture="unet")]) == (
        "segmentation_models_pytorch",)

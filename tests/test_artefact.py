"""The safetensors model artefact and ensembles."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.core.channels import L4S_CHANNELS
from pipeline.core.errors import ChannelError, InputError, ModelError
from pipeline.core.fsutil import file_digest
from pipeline.model.artefact import FORMAT, ModelArtefact, load_artefact, read_metadata, save_artefact
from pipeline.model.ensemble import ensemble_probability, ensemble_threshold, load_ensemble
from pipeline.model.registry import build_model

ARCH_KWARGS = {"base_channels": 4, "depth": 2}
#: fixed statistics in physical units, one per channel (reflectance, degrees, metres)
NORMALIZATION = {"method": "fixed", "mean": [0.1] * 12 + [15.0, 800.0], "std": [0.05] * 12 + [10.0, 400.0],
                 "clip": 10.0, "source": "test"}


def _meta(**overrides: object) -> dict:
    meta = {
        "architecture": "PlainUnet",
        "encoder": None,
        "arch_kwargs": ARCH_KWARGS,
        "channels": list(L4S_CHANNELS),
        "normalization": NORMALIZATION,
        "tile_size": 128,
        "threshold": 0.42,
        "training": {"data": "Landslide4Sense train", "epochs": 3},
        "metrics": {"f1": 0.7},
        "version": "1.2.0",
        "name": "tiny",
    }
    meta.update(overrides)
    return meta


def _module() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("PlainUnet", None, 14, **ARCH_KWARGS).eval()


def test_round_trip_keeps_weights_and_metadata(tmp_path: Path) -> None:
    module = _module()
    saved = save_artefact(tmp_path / "m.safetensors", module, _meta())
    loaded = load_artefact(tmp_path / "m.safetensors")
    assert loaded.metadata() == saved.metadata()
    assert loaded.threshold == 0.42 and loaded.channels == list(L4S_CHANNELS)
    assert loaded.training == {"data": "Landslide4Sense train", "epochs": 3}
    assert loaded.normalization == NORMALIZATION and loaded.levels == ["L1C"]  # levels default to L1C
    assert load_artefact(save_artefact(tmp_path / "l2a.safetensors", module, _meta(levels=["L1C", "L2A"])).path
                         ).levels == ["L1C", "L2A"]
    assert loaded.created  # filled in on save
    assert loaded.sha256 == saved.sha256 == file_digest(tmp_path / "m.safetensors")
    x = torch.randn(2, 14, 32, 32)
    assert loaded.module is not None and not loaded.module.training
    with torch.no_grad():
        assert torch.equal(module(x), loaded.module(x))


def test_half_precision_storage_is_smaller_and_close(tmp_path: Path) -> None:
    module = build_model("Unet", "mobilenet_v2", 14).eval()
    meta = _meta(architecture="Unet", encoder="mobilenet_v2", arch_kwargs={})
    save_artefact(tmp_path / "f32.safetensors", module, meta)
    save_artefact(tmp_path / "f16.safetensors", module, meta, half=True)
    assert os.path.getsize(tmp_path / "f16.safetensors") < 0.6 * os.path.getsize(tmp_path / "f32.safetensors")
    loaded = load_artefact(tmp_path / "f16.safetensors")
    assert next(loaded.module.parameters()).dtype == torch.float32
    x = torch.randn(1, 14, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(module(x).numpy(), loaded.module(x).numpy(), atol=5e-2)


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    save_artefact(tmp_path / "m.safetensors", _module(), _meta())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.mkdir, (str(marker),))

    for name, writer in (
        ("raw.safetensors", lambda p: p.write_bytes(pickle.dumps(Payload()))),
        ("torch.safetensors", lambda p: torch.save({"w": Payload()}, p)),
    ):
        path = tmp_path / name
        writer(path)
        with pytest.raises(ModelError, match="not a complete safetensors model artefact.*pickled"):
            load_artefact(path)
    assert not marker.exists()


def test_plain_safetensors_without_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bare.safetensors"
    save_file(_module().state_dict(), str(path))
    with pytest.raises(ModelError, match="without model metadata"):
        load_artefact(path)


def _rewrite_metadata(path: Path, meta: dict) -> None:
    """Replace the JSON metadata of an artefact in place (tensors unchanged)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"]["metadata"] = json.dumps(meta)
    blob = json.dumps(header).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"threshold": 1.5}, "threshold"),
        ({"channels": ["B02", "B02"]}, "duplicated"),
        ({"channels": ["B99"]}, "unknown channel"),
        ({"tile_size": "128"}, "tile_size"),
        ({"architecture": "Nope"}, "unknown architecture"),
        ({"surprise": 1}, "unknown metadata field"),
        ({"normalization": {"method": "magic"}}, "unknown method"),
        ({"normalization": {"method": "fixed"}}, "mean/std: required"),
        ({"normalization": {**NORMALIZATION, "mean": [0.1] * 13, "std": [1.0] * 13}}, "13 values given but the model has 14"),
        ({"normalization": {"method": "patch_robust", "clip": 10.0}}, "retrain"),
        ({"normalization": {"method": "scene_robust", "clip": 10.0}}, "retrain"),
        ({"levels": ["L3"]}, "levels"),
        ({"levels": []}, "levels"),
    ],
)
def test_invalid_metadata_is_refused_with_the_field(tmp_path: Path, change: dict, match: str) -> None:
    path = tmp_path / "m.safetensors"
    save_artefact(path, _module(), _meta())
    meta = _meta()
    meta.update(change)
    _rewrite_metadata(path, meta)
    with pytest.raises(ModelError, match=match):
        load_artefact(path)


def test_missing_metadata_field_is_named(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_artefact(path, _module(), _meta())
    meta = _meta()
    del meta["channels"]
    _rewrite_metadata(path, meta)
    with pytest.raises(ModelError, match="lacks required field.*channels"):
        read_metadata(path)


def test_weights_that_do_not_match_the_architecture_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="do not match"):
        save_artefact(tmp_path / "m.safetensors", _module(), _meta(arch_kwargs={"base_channels": 8, "depth": 2}))
    path = tmp_path / "ok.safetensors"
    save_artefact(path, _module(), _meta())
    _rewrite_metadata(path, _meta(arch_kwargs={"base_channels": 8, "depth": 2}))
    with pytest.raises(ModelError, match="shape mismatch"):
        load_artefact(path)


def test_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_artefact(tmp_path / "absent.safetensors")


def test_channel_check_names_missing_channels() -> None:
    art = ModelArtefact(**_meta())
    assert art.check_channels(list(reversed(L4S_CHANNELS)))[0] == 13
    with pytest.raises(ModelError, match="SLOPE, DEM") as info:
        art.check_channels([c for c in L4S_CHANNELS if c not in ("SLOPE", "DEM")])
    assert isinstance(info.value, ChannelError)
    assert "B01" not in str(info.value).split("available")[0]


def test_check_channels_accepts_aliases() -> None:
    art = ModelArtefact(architecture="PlainUnet", encoder=None, channels=["B02", "SLOPE"])
    assert art.check_channels(["b2", "B13"]) == [0, 1]


def test_read_metadata_does_not_build_a_module(tmp_path: Path) -> None:
    save_artefact(tmp_path / "m.safetensors", _module(), _meta())
    art = read_metadata(tmp_path / "m.safetensors")
    assert art.module is None and art.name == "tiny" and art.version == "1.2.0"
    assert json.loads(json.dumps(art.metadata()))["channels"][-1] == "DEM"
    assert FORMAT


def test_ensemble_mean_and_weighted_vote() -> None:
    probs = np.array([[0.9, 0.2], [0.6, 0.4], [0.1, 0.45]], np.float32)
    np.testing.assert_allclose(ensemble_probability(probs, [1, 1, 2], [0.5] * 3, "mean"), [0.425, 0.375])
    vote = ensemble_probability(probs, [1, 1, 2], [0.5, 0.5, 0.4], "vote")
    np.testing.assert_allclose(vote, [0.5, 0.5])
    vote = ensemble_probability(probs, [1, 1, 1], [0.5, 0.5, 0.5], "vote")
    np.testing.assert_allclose(vote, [2 / 3, 0.0])


def test_ensemble_threshold_and_member_checks(tmp_path: Path) -> None:
    a = save_artefact(tmp_path / "a.safetensors", _module(), _meta(threshold=0.4))
    b = save_artefact(tmp_path / "b.safetensors", _module(), _meta(threshold=0.6))
    assert ensemble_threshold([a]) == 0.4
    assert ensemble_threshold([a, b], [3, 1]) == pytest.approx(0.45)
    assert ensemble_threshold([a, b], method="vote") == 0.5
    assert len(load_ensemble([a.path, b.path])) == 2
    c = save_artefact(tmp_path / "c.safetensors", _module(), _meta(tile_size=64))
    with pytest.raises(ModelError, match="tile_size"):
        load_ensemble([a.path, c.path])
    with pytest.raises(ModelError, match="weights"):
        ensemble_threshold([a, b], [1.0])


def test_truncated_or_padded_file_is_refused_from_its_header_alone(tmp_path: Path) -> None:
    """A run reads only the header in its main process: a file cut short (an interrupted copy) or
    with bytes appended must be refused there, naming the file, before any worker loads it."""
    good = save_artefact(tmp_path / "m.safetensors", _module(), _meta()).path
    assert read_metadata(good).name  # the intact file passes
    blob = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(blob[: len(blob) - 1000])
    with pytest.raises(ModelError, match=r"cut\.safetensors: not a complete safetensors.*copy the file again"):
        read_metadata(cut)
    padded = tmp_path / "padded.safetensors"
    padded.write_bytes(blob + b"\0" * 16)
    with pytest.raises(ModelError, match=r"padded\.safetensors: not a complete safetensors.*copy the file again"):
        read_metadata(padded)
    with pytest.raises(ModelError, match="truncated or padded"):
        load_artefact(cut)


def test_metadata_alone_never_imports_pytorch(tmp_path: Path) -> None:
    """Reading and checking metadata (what a run's main process does) works without PyTorch."""
    import subprocess
    import sys

    path = save_artefact(tmp_path / "m.safetensors", _module(), _meta()).path
    code = (
        "import sys\n"
        "from pipeline.model.artefact import read_metadata\n"
        "from pipeline.model.ensemble import check_ensemble\n"
        "from pipeline.model.architectures import canonical_architecture\n"
        f"m = read_metadata({str(path)!r})\n"
        "check_ensemble([m])\n"
        "print(m.architecture, m.tile_size, 'torch' in sys.modules, 'segmentation_models_pytorch' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["PlainUnet", "128", "False", "False"]


def test_static_architecture_names_match_the_model_library() -> None:
    """The PyTorch-free list of architectures is the one the model library builds."""
    from pipeline.model.architectures import ARCHITECTURES, PLAIN_UNET
    from pipeline.model.registry import smp_architectures

    assert set(ARCHITECTURES) == {*smp_architectures(), PLAIN_UNET}

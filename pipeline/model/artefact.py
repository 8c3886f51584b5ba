"""The model artefact: one self-describing ``.safetensors`` file.

Layout: the weights are the safetensors tensors (the module's ``state_dict``;
float parameters optionally stored as float16 to halve the file), and the
safetensors header metadata (a string -> string map) holds::

    format          "landslide-pipeline.model"
    format_version  "1"
    metadata        JSON object: architecture, encoder, arch_kwargs, channels,
                    normalization, tile_size, threshold, training, metrics,
                    version, name, created, weights_dtype

Loading parses the header with a strict reader and reads tensors with
``safetensors`` only: nothing is ever unpickled, so a ``torch.save`` file
(pickle) is refused even when it is named ``*.safetensors``. The module is
rebuilt from the registry (:func:`pipeline.model.registry.build_model`) and the
weights are loaded strictly. ``sha256`` identifies the file (caches, reports).
Several artefacts combined: :mod:`pipeline.model.ensemble`.

The header is parsed here, not by ``safetensors.safe_open``: that one message for truncated and
padded files gives neither kind nor sizes, and its header cap is larger than :data:`_MAX_HEADER`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core import fsutil
from pipeline.core.channels import canonical
from pipeline.core.errors import ChannelError, InputError, ModelError
from pipeline.model.architectures import canonical_architecture, input_multiple
from pipeline.model.normalization import validate_spec

if TYPE_CHECKING:  # PyTorch is imported where weights are read, written or built, not for metadata
    import torch
    from torch import nn

log = logging.getLogger(__name__)

FORMAT = "landslide-pipeline.model"
#: Sentinel-2 processing levels.
LEVELS: tuple[str, ...] = ("L1C", "L2A")
FORMAT_VERSION = "1"
SUFFIX = ".safetensors"
_MAX_HEADER = 64 * 1024 * 1024

#: Metadata keys that must be present in a stored artefact.
REQUIRED_KEYS: tuple[str, ...] = (
    "architecture", "encoder", "channels", "normalization", "tile_size", "threshold", "version",
)


class MissingChannelsError(ModelError, ChannelError):
    """A scene cannot supply channels a model needs (catch as ModelError or ChannelError)."""


@dataclass
class ModelArtefact:
    """Metadata of a model plus, once loaded, the module itself."""

    architecture: str
    encoder: str | None
    channels: list[str]
    normalization: dict[str, Any] = field(default_factory=lambda: {"method": "none"})
    #: Sentinel-2 processing levels the model was trained to serve (L1C: top of atmosphere,
    #: L2A: surface reflectance); a scene of another level is run with a warning in the log and report
    levels: list[str] = field(default_factory=lambda: ["L1C"])
    tile_size: int = 128
    threshold: float = 0.5
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    version: str = "0.1.0"
    name: str = ""
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    module: nn.Module | None = field(default=None, repr=False, compare=False)
    path: Path | None = field(default=None, compare=False)
    sha256: str | None = field(default=None, compare=False)

    @property
    def in_channels(self) -> int:
        """Number of model input channels."""
        return len(self.channels)

    @property
    def key(self) -> str:
        """Identity for caches: the file checksum, or the object id when not saved."""
        return self.sha256 or f"unsaved-{id(self)}"

    def metadata(self) -> dict[str, Any]:
        """The JSON metadata stored in the file (no module, path or checksum)."""
        skip = {"module", "path", "sha256"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    def validated(self) -> ModelArtefact:
        """A copy with normalized, checked metadata (raises :class:`ModelError`)."""
        return replace(self, **_validate_metadata(self.metadata(), where=str(self.path or self.name or "model")))

    def build(self) -> nn.Module:
        """A fresh untrained module of this artefact's architecture."""
        from pipeline.model.registry import build_model

        return build_model(self.architecture, self.encoder, self.in_channels, **self.arch_kwargs)

    def check_channels(self, available: Iterable[str]) -> list[int]:
        """Indices of the model's channels in ``available``, in model order.

        Raises :class:`MissingChannelsError` (a :class:`ModelError` and a
        :class:`ChannelError`) naming every missing channel.
        """
        avail = [_canonical_or_self(c) for c in available]
        missing = [c for c in self.channels if c not in avail]
        if missing:
            raise MissingChannelsError(
                f"model {self.name or self.path or self.architecture!r} needs channel(s) {', '.join(missing)} "
                f"which the scene cannot supply (available: {', '.join(avail) or 'none'}); "
                "add them to the inputs or choose a model trained without them"
            )
        return [avail.index(c) for c in self.channels]


def _canonical_or_self(name: str) -> str:
    try:
        return canonical(name)
    except ValueError:
        return name


# -- metadata validation -------------------------------------------------------
def _validate_metadata(meta: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check and normalize metadata; messages name ``where`` and the field."""
    if not isinstance(meta, Mapping):
        raise ModelError(f"{where}: metadata must be a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ModelError(f"{where}: metadata lacks required field(s) {', '.join(missing)}")
    known = {f.name for f in fields(ModelArtefact)} - {"module", "path", "sha256"}
    unknown = sorted(set(meta) - known - {"weights_dtype"})
    if unknown:
        raise ModelError(f"{where}: unknown metadata field(s) {', '.join(unknown)}")
    out: dict[str, Any] = {}
    try:
        out["architecture"] = canonical_architecture(str(meta["architecture"]))
    except ModelError as exc:
        raise ModelError(f"{where}: architecture: {exc}") from None
    enc = meta["encoder"]
    if enc is not None and not isinstance(enc, str):
        raise ModelError(f"{where}: encoder must be a string or null, got {enc!r}")
    out["encoder"] = enc or None
    out["channels"] = _checked_channels(meta["channels"], where)
    try:
        out["normalization"] = validate_spec(meta["normalization"], n_channels=len(out["channels"]))
    except ModelError as exc:
        raise ModelError(f"{where}: {exc}") from None
    levels = meta.get("levels", ["L1C"])
    if not isinstance(levels, list) or not levels or not set(levels) <= set(LEVELS):
        raise ModelError(f"{where}: levels must be a non-empty list of {', '.join(LEVELS)}, got {levels!r}")
    out["levels"] = list(levels)
    out["tile_size"] = _checked_tile_size(meta["tile_size"], out["architecture"], where)
    thr = meta["threshold"]
    if isinstance(thr, bool) or not isinstance(thr, int | float) or not 0.0 < float(thr) < 1.0:
        raise ModelError(f"{where}: threshold must be a number in (0, 1), got {thr!r}")
    out["threshold"] = float(thr)
    out.update(_checked_free_fields(meta, where))
    return out


def _checked_channels(chans: Any, where: str) -> list[str]:
    """Canonical channel names: a non-empty list of known channels without duplicates."""
    if not isinstance(chans, list) or not chans or not all(isinstance(c, str) for c in chans):
        raise ModelError(f"{where}: channels must be a non-empty list of channel names, got {chans!r}")
    try:
        canon = [canonical(c) for c in chans]
    except ValueError as exc:
        raise ModelError(f"{where}: channels: {exc}") from None
    dups = sorted({c for c in canon if canon.count(c) > 1})
    if dups:
        raise ModelError(f"{where}: channels: duplicated channel(s) {', '.join(dups)}")
    return canon


def _checked_tile_size(tile: Any, architecture: str, where: str) -> int:
    """A positive integer that ``architecture`` accepts as a window edge."""
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ModelError(f"{where}: tile_size must be a positive integer, got {tile!r}")
    mult = input_multiple(architecture)
    if tile % mult:
        raise ModelError(f"{where}: tile_size {tile} must be a multiple of {mult} for {architecture}")
    return tile


def _checked_free_fields(meta: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The descriptive fields: JSON objects (training, metrics, arch_kwargs) and strings
    (version, which must not be empty, name, created)."""
    out: dict[str, Any] = {}
    for key in ("training", "metrics", "arch_kwargs"):
        val = meta.get(key, {})
        if not isinstance(val, Mapping):
            raise ModelError(f"{where}: {key} must be a JSON object, got {type(val).__name__}")
        out[key] = dict(val)
    for key in ("version", "name", "created"):
        val = meta.get(key, "")
        if not isinstance(val, str):
            raise ModelError(f"{where}: {key} must be a string, got {val!r}")
        out[key] = val
    if not out["version"]:
        raise ModelError(f"{where}: version must not be empty")
    return out


# -- save ----------------------------------------------------------------------
def save_artefact(
    path: str | os.PathLike[str],
    module: nn.Module,
    meta: ModelArtefact | Mapping[str, Any],
    *,
    half: bool = False,
) -> ModelArtefact:
    """Write ``module`` and ``meta`` to one ``.safetensors`` file, atomically.

    ``meta`` is a :class:`ModelArtefact` (its ``module`` is ignored) or a
    mapping of metadata fields. ``half=True`` stores float parameters as
    float16 (buffers such as BatchNorm statistics stay float32); loading
    casts back to float32. The module must match its declared architecture:
    it is compared with a freshly built one before writing. Returns the
    saved artefact with ``path``, ``sha256`` and ``module`` set.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != SUFFIX:
        raise ModelError(f"{path}: model artefacts are {SUFFIX} files")
    raw = meta.metadata() if isinstance(meta, ModelArtefact) else dict(meta)
    raw.pop("weights_dtype", None)
    if not raw.get("created"):
        raw["created"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    if not raw.get("name"):
        raw["name"] = path.stem
    clean = _validate_metadata(raw, where=str(path))
    art = ModelArtefact(**clean)

    tensors = _tensors_to_store(module, art.build().state_dict(), half, str(path))
    stored = json.dumps({**clean, "weights_dtype": "float16" if half else "float32"}, allow_nan=False, sort_keys=True)
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "metadata": stored}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = fsutil.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("saved model artefact %s (%s %s, %d channels)", path, art.architecture, art.encoder, art.in_channels)
    return replace(art, module=module, path=path, sha256=fsutil.file_digest(path))


def _tensors_to_store(module: nn.Module, reference: Mapping[str, torch.Tensor], half: bool,
                      where: str) -> dict[str, torch.Tensor]:
    """``module``'s weights on the CPU, checked against the ``reference`` state of its architecture,
    float parameters as float16 with ``half``."""
    import torch

    state = module.state_dict()
    _check_state(reference, state, where)
    params = {name for name, _ in module.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        t = t.detach().to("cpu")
        if half and name in params and t.is_floating_point():
            t = t.to(torch.float16)
        tensors[name] = t.contiguous().clone()  # no shared storage in safetensors
    return tensors


def _check_state(reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], where: str) -> None:
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    shapes = [k for k in reference if k in state and tuple(reference[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing weights {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected weights {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} shape mismatch(es), e.g. {k}: "
                f"{tuple(state[k].shape)} vs expected {tuple(reference[k].shape)}"
            )
        raise ModelError(f"{where}: weights do not match the declared architecture: {'; '.join(parts)}")


# -- load ----------------------------------------------------------------------
def _read_header_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read with the safetensors library (no tensor data,
    no pickle, no PyTorch). It refuses a file whose tensors do not fill it exactly (a truncated or
    padded copy) from the header alone, before a run starts."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise InputError(f"{path}: model artefact not found")
    try:
        with safe_open(path, framework="numpy") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(
            f"{path}: not a complete safetensors model artefact ({exc}): a truncated or padded copy (copy the "
            "file again), or a pickled/torch.save checkpoint (refused: re-export the weights with "
            "pipeline.model.artefact.save_artefact)"
        ) from None


def read_metadata(path: str | os.PathLike[str]) -> ModelArtefact:
    """Metadata of an artefact without loading weights (``module`` is None).

    Cheap: use it to learn which channels to stack before inference.
    """
    path = Path(path)
    info = _read_header_metadata(path)
    if info.get("format") != FORMAT:
        raise ModelError(
            f"{path}: safetensors file without model metadata (expected format {FORMAT!r} in the header); "
            "write it with pipeline.model.artefact.save_artefact"
        )
    if info.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{path}: artefact format version {info.get('format_version')!r} is not supported "
            f"(this version reads {FORMAT_VERSION!r})"
        )
    try:
        meta = json.loads(info.get("metadata", ""))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: metadata is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: metadata must be a JSON object")
    dtype = meta.pop("weights_dtype", "float32")
    if dtype not in ("float32", "float16"):
        raise ModelError(f"{path}: weights_dtype must be float32 or float16, got {dtype!r}")
    clean = _validate_metadata(meta, where=str(path))
    if not clean["name"]:
        clean["name"] = path.stem
    return ModelArtefact(**clean, path=path, sha256=fsutil.file_digest(path))


def load_artefact(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> ModelArtefact:
    """Load an artefact: validated metadata plus the module in eval mode on ``device``.

    Never unpickles. Raises :class:`InputError` when the file is missing and
    :class:`ModelError` when it is not a valid artefact.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    art = read_metadata(path)
    where = str(art.path)
    try:
        tensors = load_file(str(art.path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{where}: cannot read weights: {exc}") from None
    module = art.build()
    reference = module.state_dict()
    _check_state(reference, tensors, where)
    for k, t in tensors.items():
        if t.is_floating_point() and reference[k].is_floating_point():
            tensors[k] = t.to(reference[k].dtype)
    module.load_state_dict(tensors, strict=True)
    module.eval().to(device)
    log.info("loaded model artefact %s (%s, sha256 %s)", where, art.name, (art.sha256 or "")[:12])
    return replace(art, module=module)

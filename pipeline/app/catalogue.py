"""The models the app offers: the shipped artefacts and those given with ``--model``, by name.

Only the artefacts' metadata is read here (:func:`pipeline.model.artefact.read_metadata`: name,
channels, threshold, window size); the inference loads the weights once per process and keeps
them (:mod:`pipeline.inference.runtime`). Each model gets a short id for the form and the URLs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import ModelError
from pipeline.model.artefact import SUFFIX, ModelArtefact, read_metadata

#: the folder of the artefacts that ship with the package
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "models"
#: the form's choice that runs every model
ALL = "all"


@dataclass(frozen=True)
class ModelEntry:
    """One model the app can run."""

    id: str  # short, URL-safe, unique in the catalogue
    artefact: ModelArtefact  # metadata only (module None)
    shipped: bool

    @property
    def name(self) -> str:
        return self.artefact.name  # read_metadata names an unnamed artefact after its file

    @property
    def threshold(self) -> float:
        return float(self.artefact.threshold)

    @property
    def channels(self) -> list[str]:
        return list(self.artefact.channels)

    def describe(self) -> str:
        """One line for the form: name, origin and channels."""
        origin = "shipped" if self.shipped else str(self.artefact.path)
        return f"{self.name} ({origin}; {len(self.channels)} channels: {', '.join(self.channels)})"


def shipped_paths(folder: Path = SHIPPED_DIR) -> list[Path]:
    """The shipped artefacts, by file name."""
    return sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "model"


class Catalogue:
    """The models in the order the form lists them (shipped first, then ``--model`` paths)."""

    def __init__(self, entries: Iterable[ModelEntry]) -> None:
        self.entries: list[ModelEntry] = list(entries)
        self._by_id = {e.id: e for e in self.entries}

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, model_id: str) -> ModelEntry | None:
        return self._by_id.get(model_id)

    def choose(self, choice: str | None) -> list[ModelEntry]:
        """The models of the form's ``choice``: one model's id or :data:`ALL`; :class:`KeyError`
        naming the choices when unknown."""
        if not choice or choice == ALL:
            return list(self.entries)
        entry = self._by_id.get(choice)
        if entry is None:
            raise KeyError(f"unknown model {choice!r}; choose one of {', '.join(self._by_id)} or {ALL}")
        return [entry]


def build_catalogue(extra: Sequence[Path] = (), *, shipped: bool = True,
                    folder: Path = SHIPPED_DIR) -> Catalogue:
    """The shipped models (unless ``shipped`` is false) and the artefacts at ``extra``.

    A path given by the user that is not a readable artefact raises (an
    :class:`~pipeline.core.errors.InputError` or :class:`~pipeline.core.errors.ModelError` naming it).
    """
    entries: list[ModelEntry] = []
    seen: set[Path] = set()
    taken: set[str] = {ALL}
    candidates = [(p, True) for p in (shipped_paths(folder) if shipped else [])]
    candidates += [(Path(p).expanduser(), False) for p in extra]
    for path, is_shipped in candidates:
        resolved = path.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        art = read_metadata(path)
        base = _slug(art.name or path.stem)
        model_id, n = base, 2
        while model_id in taken:
            model_id, n = f"{base}-{n}", n + 1
        taken.add(model_id)
        entries.append(ModelEntry(model_id, art, is_shipped))
    if not entries:
        raise ModelError(f"no model to offer: no *{SUFFIX} in {folder} and no --model given")
    return Catalogue(entries)

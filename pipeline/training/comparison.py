"""The comparison table of ``python -m pipeline evaluate``: rows, Markdown, CSV and the metrics JSON file."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core import fsutil

TABLE_COLUMNS = ("name", "kind", "protocol", "channels", "threshold", "precision", "recall", "f1", "iou",
                 "f1_per_patch", "patches", "note")


@dataclass
class Row:
    """One line of the comparison table."""

    name: str
    kind: str
    protocol: str
    channels: str
    threshold: float
    micro: dict[str, float]
    per_patch_f1: float
    patches: int
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def cells(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "protocol": self.protocol,
            "channels": self.channels,
            "threshold": self.threshold,
            "precision": self.micro["precision"],
            "recall": self.micro["recall"],
            "f1": self.micro["f1"],
            "iou": self.micro["iou"],
            "f1_per_patch": self.per_patch_f1,
            "patches": self.patches,
            "note": self.note,
        }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def markdown_table(rows: Sequence[Row]) -> str:
    """The comparison table as Markdown."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        cells = r.cells()
        lines.append("| " + " | ".join(_fmt(cells[c]).replace("|", "/") for c in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[Row]) -> str:
    """The comparison table as CSV (full precision)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(TABLE_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r.cells())
    return buf.getvalue()


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fsutil.write_atomic(path, text.encode("utf-8"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if not isinstance(v, np.ndarray)}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_tables(rows: Sequence[Row], out_dir: Path, objects: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write comparison.md, comparison.csv and metrics.json into ``out_dir`` (atomically)."""
    out_dir = Path(out_dir)
    md = markdown_table(rows)
    if objects:
        md += "\nObject metrics (IoU >= {:.2f}):\n\n".format(objects["iou_threshold"])
        md += "| " + " | ".join(k for k in objects if isinstance(objects[k], int | float)) + " |\n"
        md += "|" + "---|" * sum(isinstance(v, int | float) for v in objects.values()) + "\n"
        md += "| " + " | ".join(_fmt(v) for v in objects.values() if isinstance(v, int | float)) + " |\n"
    paths = {"markdown": out_dir / "comparison.md", "csv": out_dir / "comparison.csv", "json": out_dir / "metrics.json"}
    _atomic_write(paths["markdown"], md)
    _atomic_write(paths["csv"], csv_table(rows))
    payload = {"rows": [{**r.cells(), "details": _jsonable(r.extra)} for r in rows], "objects": objects}
    _atomic_write(paths["json"], json.dumps(_jsonable(payload), indent=1, sort_keys=True))
    return paths

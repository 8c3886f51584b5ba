"""Same outputs from two versions: run the demo and the example configs with each, compare.

    python benchmarks/compare_versions.py OLD_REV [NEW_REV] [--configs configs/slovenia.yaml ...]

Each revision is checked out as a git worktree beside the repository (so the configs' relative
paths to ../shared resolve the same way) and run with its own code on the same inputs; the
probability rasters must be equal pixel for pixel and the GeoPackages feature for feature
(geometry and every attribute but the run's id). Prints one line per config and the wall time of
each run; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pyogrio
import rasterio
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ("configs/slovenia.yaml", "configs/iburi_2018.yaml")
#: Attributes that name the run itself, not what it found.
RUN_FIELDS = {"run_id"}


def worktree(rev: str) -> Path:
    """A worktree of ``rev`` beside the repository (created once)."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    path = ROOT.parent / f"wt_{sha}"
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=ROOT, check=True,
                       capture_output=True)
    return path


def run(tree: Path, config: Path, out: Path) -> tuple[Path, float]:
    """Run ``config`` (a path inside ``tree``) with ``tree``'s code, writing under ``out``; the run folder."""
    data = yaml.safe_load(config.read_text())
    data.setdefault("output", {})["dir"] = str(out)
    copy = config.with_name(f".compare_{config.name}")
    copy.write_text(yaml.safe_dump(data))
    t0 = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-m", "pipeline", "-q", "run", str(copy), "--force"], cwd=tree, check=True)
    finally:
        copy.unlink()
    seconds = time.perf_counter() - t0
    scene_dir = next(p for p in out.iterdir() if p.is_dir())
    return scene_dir / (scene_dir / "LATEST").read_text().strip(), seconds


def differences(a: Path, b: Path) -> list[str]:
    """What differs between two run folders' probability rasters and GeoPackages."""
    out = []
    with rasterio.open(a / "probability.tif") as x, rasterio.open(b / "probability.tif") as y:
        pa, pb = x.read(1), y.read(1)
        if pa.shape != pb.shape or x.transform != y.transform or x.crs != y.crs:
            out.append("probability grids differ")
        elif (n := int((pa != pb).sum())):
            out.append(f"probability differs in {n} pixels")
    ga = pyogrio.read_dataframe(next(a.glob("*.gpkg")), layer="landslides")
    gb = pyogrio.read_dataframe(next(b.glob("*.gpkg")), layer="landslides")
    if len(ga) != len(gb):
        return [*out, f"{len(ga)} features against {len(gb)}"]
    ga, gb = (g.sort_values("landslide_id").reset_index(drop=True) for g in (ga, gb))
    if not all(x.equals_exact(y, 0) for x, y in zip(ga.geometry, gb.geometry, strict=True)):
        out.append("geometries differ")
    for col in sorted(set(ga.columns) - {"geometry"} - RUN_FIELDS):
        if col not in gb.columns or not ga[col].equals(gb[col]):
            out.append(f"attribute {col} differs")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old")
    parser.add_argument("new", nargs="?", default="HEAD")
    parser.add_argument("--configs", nargs="*", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--out", type=Path, default=Path("/tmp/compare_versions"))
    args = parser.parse_args()
    trees = {rev: worktree(rev) for rev in (args.old, args.new)}
    demo = args.out / "demo"
    subprocess.run([sys.executable, "-m", "pipeline", "-q", "demo-data", str(demo), "--force"], cwd=trees[args.new],
                   check=True)
    failed = False
    cases = [("demo", {rev: demo / "scene.yaml" for rev in trees})]
    cases += [(c, {rev: tree / c for rev, tree in trees.items()}) for c in args.configs]
    for name, configs in cases:
        runs = {rev: run(trees[rev], configs[rev], args.out / Path(name).stem / rev) for rev in trees}
        diff = differences(runs[args.old][0], runs[args.new][0])
        failed |= bool(diff)
        times = ", ".join(f"{rev}: {runs[rev][1]:.1f} s" for rev in trees)
        print(f"{name}: {'identical' if not diff else '; '.join(diff)} ({times})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

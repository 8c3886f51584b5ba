"""Benchmark: the nightly regional job at scale.

Two parts, each printed as a table:

``jobs``: synthetic products of ``--size`` px (per-band folders named with their sensing day, the
stacking benchmark's 13 bands at native 10/20/60 m and a DEM), ``--products`` per night over two
nights, found by the region itself. For 1 and 2 local worker processes (the same 2 threads in
all), three commands one after another, each in a process of its own: night 1, night 2 (the new
products only: night 1's are up to date) and a rerun of night 2 that has nothing to do. Wall time
of each, peak resident memory of the command's process tree and of its largest worker.

``merge``: the regional layers rebuilt from N nights of one scene with F landslides each (each
night's polygons overlap the previous night's, a tenth are new), in this process, without a
cluster: the time of ``build_layers`` and of writing the GeoPackage, and that time per detection,
which stays flat when the merge grows linearly with nights x features.

    python benchmarks/bench_region.py                      # both, full 10980 px products
    python benchmarks/bench_region.py jobs --size 4098
    python benchmarks/bench_region.py merge
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_stack import PeakMemory, build_inputs  # noqa: E402

NIGHTS = ("20230801", "20230806")


def _products(work: Path, size: int, per_night: int) -> tuple[Path, Path]:
    """Per-band product folders (hard links to one synthetic scene), and the DEM."""
    base = build_inputs(work / "scene", size)
    bands = Path(str(base["scene"]["bands_dir"]))  # type: ignore[index]
    incoming = work / f"incoming_{size}_{per_night}"
    for day in NIGHTS:
        for k in range(per_night):
            folder = incoming / f"S2_MSIL1C_{day}T1000{k:02d}_bench{k}"
            if folder.is_dir():
                continue
            folder.mkdir(parents=True)
            for band in sorted(bands.iterdir()):
                os.link(band, folder / band.name)
    return incoming, Path(str(base["dem"]["path"]))  # type: ignore[index]


def _region(work: Path, incoming: Path, dem: Path, workers: int, last_day: str) -> Path:
    template = work / "template.yaml"
    template.write_text(f"scene:\n  dn_offset: -1000\ndem:\n  path: {dem}\n")
    region = work / f"region_{workers}.yaml"
    region.write_text(
        f"name: bench\ntemplate: {template}\nproducts:\n  paths: ['{incoming}/S2_*']\n"
        f"  end: {last_day[:4]}-{last_day[4:6]}-{last_day[6:]}\n"
        f"output:\n  dir: {work / f'out_{workers}'}\n"
        f"dask:\n  n_workers: {workers}\n  threads_per_worker: {2 // workers}\n")
    return region


def _command(region: Path) -> dict[str, float]:
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "-q", "region", str(region)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakMemory(interval=0.2, pid=proc.pid) as mem:
        t0 = time.perf_counter()
        out, err = proc.communicate()
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{region}: exit {proc.returncode}\n{err[-3000:]}")
    return {"seconds": seconds, "tree_gib": mem.peak / 2**30,
            "worker_gib": max(mem.child_peaks.values(), default=0) / 2**30, "line": out.strip().splitlines()[0]}


def jobs(size: int, per_night: int, work: Path, worker_counts: tuple[int, ...] = (1, 2)) -> None:
    incoming, dem = _products(work, size, per_night)
    print(f"\n{per_night} product(s) of {size} px per night, two nights; 2 threads in all; {time.strftime('%Y-%m-%d')}")
    print("| worker processes | command | wall time | peak RSS, process tree | largest worker |")
    print("|---|---|---|---|---|")
    for workers in worker_counts:
        shutil.rmtree(work / f"out_{workers}", ignore_errors=True)  # night 1 starts from nothing
        for what, day in (("night 1", NIGHTS[0]), ("night 2 (new products only)", NIGHTS[1]),
                          ("night 2 again (nothing to do)", NIGHTS[1])):
            figures = _command(_region(work, incoming, dem, workers, day))
            print(f"| {workers} | {what} | {figures['seconds']:.1f} s | {figures['tree_gib']:.2f} GiB | "
                  f"{figures['worker_gib']:.2f} GiB |", flush=True)


def _scene_runs(work: Path, nights: int, features: int) -> list[dict[str, str]]:
    """``nights`` completed runs of one 50 km tile, ``features`` landslides each (jittered from night
    to night, a tenth new each night), as the tracking reads them."""
    import geopandas as gpd
    import numpy as np
    import pyogrio
    import rasterio
    import shapely
    from affine import Affine

    crs, x0, y0, pixel, size = "EPSG:32633", 500_000.0, 4_750_000.0, 100.0, 500
    rng = np.random.default_rng(0)
    centres = rng.uniform([x0 + 500, y0 - size * pixel + 500], [x0 + size * pixel - 500, y0 - 500],
                          (features, 2))
    records = []
    for n in range(nights):
        day = f"2024-{1 + n // 28:02d}-{1 + n % 28:02d}"
        scene = f"T33_{day.replace('-', '')}"
        run_dir = work / f"merge_{nights}_{features}" / scene / "run-0123456789ab"
        run_dir.mkdir(parents=True, exist_ok=True)
        new = rng.random(features) < (1.0 if n == 0 else 0.1)
        centres = np.where(new[:, None], rng.uniform([x0 + 500, y0 - size * pixel + 500],
                                                     [x0 + size * pixel - 500, y0 - 500], (features, 2)), centres)
        jitter = rng.normal(0, 5, (features, 2))
        geoms = shapely.buffer(shapely.points(centres + jitter), rng.uniform(20, 60, features), quad_segs=4)
        gdf = gpd.GeoDataFrame({"landslide_id": [f"{scene}-{i}" for i in range(features)], "scene_id": scene,
                                "acq_date": day, "mean_prob": rng.uniform(0.5, 1, features),
                                "area_m2": shapely.area(geoms)}, geometry=geoms, crs=crs)
        gpkg = run_dir / f"{scene}_landslides.gpkg"
        pyogrio.write_dataframe(gdf, gpkg, layer="landslides", driver="GPKG")
        transform = Affine(pixel, 0, x0, 0, -pixel, y0)
        with rasterio.open(run_dir / "probability.tif", "w", driver="GTiff", width=size, height=size, count=1,
                           dtype="uint8", crs=crs, transform=transform, nodata=255) as dst:
            dst.write(np.full((1, size, size), 20, np.uint8))
        report = {"scene_id": scene, "acquisition_date": day, "finished": f"{day}T22:00:00+00:00",
                  "grid": {"crs": crs, "transform": list(transform)[:6], "width": size, "height": size},
                  "counts": {"valid_pixels": size * size}}
        (run_dir / "report.json").write_text(json.dumps(report))
        records.append({"config": str(work / f"{scene}.yaml"), "scene_id": scene, "run_dir": str(run_dir),
                        "geopackage": str(gpkg)})
    return records


def merge(work: Path) -> None:
    from pipeline.run.regional_gpkg import write_regional_geopackage
    from pipeline.run.tracking import build_layers

    print(f"\nregional merge, in one process; {time.strftime('%Y-%m-%d')}")
    print("| nights | landslides per night | detections | build_layers | GeoPackage | per detection | landslides |")
    print("|---|---|---|---|---|---|---|")
    for features in (1000, 4000):
        for nights in (2, 4, 8, 16):
            records = _scene_runs(work, nights, features)
            t0 = time.perf_counter()
            layers = build_layers(records, [records[-1]["scene_id"]])
            t1 = time.perf_counter()
            write_regional_geopackage(layers, work / f"merged_{nights}_{features}.gpkg", region="bench")
            t2 = time.perf_counter()
            n = nights * features
            print(f"| {nights} | {features} | {n} | {t1 - t0:.2f} s | {t2 - t1:.2f} s | "
                  f"{1e3 * (t2 - t0) / n:.2f} ms | {len(layers.landslides)} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", choices=("jobs", "merge", "both"), default="both")
    parser.add_argument("--size", type=int, default=10980, help="product side in 10 m pixels")
    parser.add_argument("--products", type=int, default=2, help="products per night")
    parser.add_argument("--workers", default="1,2", help="local worker processes to compare (2 threads in all)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_region",
                        help="work folder (the synthetic scene is kept there between runs)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.part in ("merge", "both"):
        merge(args.work)
    if args.part in ("jobs", "both"):
        jobs(args.size, args.products, args.work, tuple(int(w) for w in args.workers.split(",")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m pipeline region region.yaml``: the nightly regional job over many scenes."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError, OutputError
from pipeline.core.region_config import RegionConfig, load_region_config
from pipeline.run.region import region_running, run_region, state_path


def add_region_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="region YAML file")
    parser.add_argument("--force", action="store_true", help="recompute scenes whose outputs already exist")
    parser.add_argument("--scheduler", help="address of an existing Dask scheduler (overrides dask.scheduler)")
    parser.add_argument("--plan", action="store_true",
                        help="list the scenes and products tonight's job would run, and the products it would "
                        "not use with the reason; runs nothing")
    parser.add_argument("--status", action="store_true",
                        help="print the last job's table of scenes and products (status, reason, polygons) "
                        "and whether a job runs now; runs nothing")


def cli_region(args: argparse.Namespace) -> int:
    cfg = load_region_config(args.config)
    if args.status:
        return print_status(cfg)
    if args.plan:
        return print_plan(cfg)
    if args.scheduler:
        cfg = cfg.model_copy(update={"dask": cfg.dask.model_copy(update={"scheduler": args.scheduler})})
    t0 = time.perf_counter()
    result = run_region(cfg, force=args.force)
    done = sum(o.status == "completed" for o in result.outcomes)
    skipped = sum(o.status == "skipped" for o in result.outcomes)
    print(
        f"region {cfg.name}: {done} scene(s) processed, {skipped} already up to date, "
        f"{len(result.failed)} failed, {len(result.excluded)} product(s) not used; {result.n_merged} landslide "
        f"polygon(s) in {result.merged or '(no merged layer)'} ({time.perf_counter() - t0:.1f} s)"
    )
    if result.page is not None:
        print(f"  report: {result.page} (python -m pipeline view {result.page.parent})")
    for o in result.excluded:
        print(f"  not used: {o.config}: {o.reason}")
    for o in result.failed:
        print(f"  failed: {o.config}: {o.error}")
    if not result.outcomes:
        if cfg.products is not None and not cfg.scenes:
            print(f"  no products found for this night under {', '.join(map(str, cfg.products.paths + cfg.products.stac))}")
            return 0
        raise OutputError("no scenes were run")
    return 1 if result.failed else 0


def print_plan(cfg: RegionConfig) -> int:
    """Print what tonight's job would run and what it would not use (with the reasons)."""
    import datetime as dt

    from pipeline.run.region_products import night_work

    today = dt.datetime.now(dt.UTC).date()
    work, excluded = night_work(cfg, today)
    if cfg.products is not None:
        start, end = cfg.products.window(today)
        print(f"region {cfg.name}: products sensed {start or 'any time'} to {end or 'now'} (UTC days)")
    print(f"would run {len(work)} scene(s) and product(s), would not use {len(excluded)}")
    for item in work:
        product = item.product
        when = f"  {product.sensing:%Y-%m-%d %H:%M}" if product is not None and product.sensing else ""
        print(f"  run: {item.source}{when}")
    for o in excluded:
        print(f"  not used: {o.config}: {o.reason}")
    return 0


#: columns of ``--status``: heading, outcome key, width (None: the rest of the line)
_COLUMNS = (("status", "status", 9), ("sensed (UTC)", "sensing", 16), ("scene", "scene_id", 60),
            ("polygons", "n_polygons", 8), ("seconds", "seconds", 7), ("tries", "attempts", 5),
            ("error, reason or source", "note", None))


def print_status(cfg: RegionConfig) -> int:
    """Print the table of the region's last job; 1 when that job recorded failures."""
    path = state_path(cfg)
    running = region_running(cfg)
    if not path.is_file():
        print(f"region {cfg.name}: no job has run in {cfg.output.dir} yet"
              + ("; one is running now" if running else ""))
        return 0
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        scenes = list((state.get("scenes") or {}).values())
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(f"{path}: the region's state is unreadable ({exc})") from None
    finished = state.get("finished") or ("running now" if running else "did not finish (stopped or crashed)")
    print(f"region {cfg.name} ({path})")
    print(f"last job: started {state.get('started')}, finished {finished}"
          + ("; a job is running now" if running and state.get("finished") else ""))
    layers = state.get("layers") or {}
    if state.get("merged"):
        print(f"regional layers: {state['merged']}: {layers.get('landslides', 0)} landslide(s), "
              f"{layers.get('new_landslides', 0)} new on the night of {state.get('newest_night')}, "
              f"{layers.get('not_observed', 0)} not-observed area(s)")
    counts: dict[str, int] = {}
    for o in scenes:
        counts[str(o.get("status"))] = counts.get(str(o.get("status")), 0) + 1
    print("scenes: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"))
    rows = [[_cell(o, key) for _, key, _ in _COLUMNS]
            for o in sorted(scenes, key=lambda o: (str(o.get("sensing") or ""), str(o.get("config"))))]
    print(_line([h for h, _, _ in _COLUMNS]))
    for row in rows:
        print(_line(row))
    return 1 if counts.get("failed") else 0


def _cell(o: dict[str, Any], key: str) -> str:
    if key == "note":
        return str(o.get("error") or o.get("reason") or o.get("config") or "")
    value = o.get(key)
    if value is None or (key == "attempts" and o.get("status") == "excluded"):
        return "-"
    if key == "sensing":
        return str(value)[:16].replace("T", " ")
    if key == "seconds" and isinstance(value, (int, float)):
        return f"{value:.1f}"
    return str(value)


def _line(cells: list[str]) -> str:
    out = []
    for (_, key, width), cell in zip(_COLUMNS, cells, strict=True):
        if width is None:
            out.append(cell)
        elif key in ("n_polygons", "seconds", "attempts"):
            out.append(cell.rjust(width))
        else:
            out.append(cell[:width].ljust(width) if len(cell) <= width else cell[: width - 3] + "...")
    return "  ".join(out).rstrip()

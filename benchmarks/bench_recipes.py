"""Our training recipe vs the Landslide4Sense official baseline recipe, same patches, same folds.

    python benchmarks/bench_recipes.py            # full: 5 folds, epochs of configs/train_default.yaml
    python benchmarks/bench_recipes.py --quick    # 3 folds, 12 epochs (a smoke run, minutes)

Both recipes are cross-validated on the labelled patches (default
../shared/data/l4s/train) with the same stratified folds and the same epoch
budget and batch size; per-pixel Random Forest and RBF SVM baselines run on
the same folds (:func:`pipeline.training.evaluate.baseline_row`). The patches are read
in physical units (reflectance, degrees, metres).

* ours: configs/train_default.yaml (architecture, loss, augmentation,
  AdamW + cosine schedule, fixed normalization with the median/IQR of each
  fold's training patches, early stopping, threshold chosen on the pooled
  out-of-fold predictions), on the same 14 channels as the official recipe;
* official: the Landslide4Sense 2022 baseline (iarai/Landslide4Sense-2022,
  Train.py): plain U-Net (16-256 features), two-class cross-entropy (one
  logit + BCE is the same loss), no augmentation, Adam lr 1e-3 with weight
  decay 5e-4 and no schedule, argmax decision (threshold 0.5), checkpoint
  kept at the best held-out F1; inputs normalized like ours, so only the
  recipe differs;
* official (own normalization): the same with the official per-band
  mean/std of the Landslide4Sense values (the dataset authors' statistics),
  converted to physical units with the published divisors;
* ours (official normalization): our recipe with that normalization, the
  like-for-like partner of the previous row;
* random forest, svm: the per-pixel baselines (bands, NDVI, terrain;
  normalized with each fold's training statistics).

``--recipes`` runs a subset of the rows, ``--seeds`` several seeds (the
folds follow the seed).

Printed: pooled out-of-fold F1 (the competition metric) at each recipe's
own decision rule, plus F1 at 0.5 and at the out-of-fold best threshold for
both, and the median over ``--seeds`` runs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.channels import L4S_CHANNELS, physical_factors  # noqa: E402

#: Per-band mean/std of the official baseline (dataset/landslide_dataset.py), in Landslide4Sense units.
OFFICIAL_MEAN = [-0.4914, -0.3074, -0.1277, -0.0625, 0.0439, 0.0803, 0.0644, 0.0802, 0.3000, 0.4082, 0.0823,
                 0.0516, 0.3338, 0.7819]
OFFICIAL_STD = [0.9325, 0.8775, 0.8860, 0.8869, 0.8857, 0.8418, 0.8354, 0.8491, 0.9061, 1.6072, 0.8848, 0.9232,
                0.9018, 1.2913]
DEFAULT_CONFIG = ROOT / "configs" / "train_default.yaml"
#: The per-pixel baseline rows.
BASELINES = ("random forest", "svm")


def recipes(data: Path, epochs: int | None, folds: int, seed: int, threads: int,
            config: Path = DEFAULT_CONFIG, channels: list[str] | None = None) -> dict[str, Any]:
    """The TrainConfigs of every row, built on the same data, budget and seed; ours from ``config``."""
    from pipeline.training.config import TrainConfig, load_train_config

    ours = load_train_config(config)
    common = {
        "data": {"root": str(data)},
        "epochs": epochs or ours.epochs,
        "batch_size": ours.batch_size,
        "cv": {"folds": folds},
        "seed": seed,
        "threads": threads,
        "output": {"artefact": "/dev/null/unused.safetensors"},
    }
    ours_d = ours.model_dump(mode="json")
    ours_d.update(common)
    # same inputs for both recipes: all 14 channels unless chosen (the shipped default drops B10 to run on L2A)
    channels = list(channels or L4S_CHANNELS)
    pick = [list(L4S_CHANNELS).index(c) for c in channels]
    factor = physical_factors(L4S_CHANNELS, "l4s")
    ours_d["model"]["channels"] = channels
    official = {
        **common,
        "model": {
            "architecture": "PlainUnet", "encoder": None, "options": {"base_channels": 16, "depth": 4},
            "channels": channels,
            # the official statistics are in Landslide4Sense units: (x / f - mean) / std in physical units
            "normalization": {"method": "fixed", "mean": [OFFICIAL_MEAN[i] * factor[i] for i in pick],
                              "std": [OFFICIAL_STD[i] * factor[i] for i in pick]},
            "name": "official-baseline",
        },
        "loss": {"name": "ce"},
        "optimizer": {"name": "adam", "lr": 1e-3, "weight_decay": 5e-4, "schedule": "none"},
        "augment": {"hflip": False, "vflip": False, "rot90": False, "noise_std": 0.0},
        # checkpoint at the best held-out F1 of the argmax decision, no early stop
        "early_stopping": {"enabled": False, "monitor": "f1"},
    }
    # the official recipe with the pipeline's normalization: same inputs as ours, only the recipe differs
    official_ours = json.loads(json.dumps(official))
    official_ours["model"]["normalization"] = ours_d["model"]["normalization"]
    # each recipe with the other's normalization: the like-for-like partners
    out = {"ours": ours_d, "official": official_ours}
    mine = json.loads(json.dumps(ours_d))
    mine["model"]["normalization"] = official["model"]["normalization"]
    out["ours (official normalization)"] = mine
    out["official (own normalization)"] = official
    return {name: TrainConfig.model_validate(cfg) for name, cfg in out.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pipeline.training.baseline import RandomForestConfig, SVMConfig
    from pipeline.training.cross_validation import cross_validate
    from pipeline.training.datasets import make_dataset
    from pipeline.training.evaluate import baseline_row
    from pipeline.training.folds import shared_folds
    from pipeline.training.metrics import pixel_metrics
    from pipeline.training.patch_files import find_patches

    torch.set_num_threads(args.threads)
    records = find_patches(args.data, require_masks=True)
    names = [*recipes(args.data, args.epochs, args.folds, 0, args.threads, args.config, args.channels), *BASELINES]
    chosen = args.recipes or names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; choose from {names}")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names if name in chosen}
    for seed in args.seeds:
        folds = shared_folds(records, args.folds, seed)
        cfgs = recipes(args.data, args.epochs, args.folds, seed, args.threads, args.config, args.channels)
        for name, cfg in cfgs.items():
            if name not in chosen:
                continue
            t0 = time.perf_counter()
            cv = cross_validate(cfg, make_dataset(cfg, records), folds)
            at05 = pixel_metrics(cv.oof_prob, cv.masks, cv.valid, 0.5)["micro"]
            ours = name.startswith("ours")
            own = cv.metrics["micro"] if ours else at05  # official: argmax = 0.5
            results[name].append({
                "f1": own["f1"], "precision": own["precision"], "recall": own["recall"], "iou": own["iou"],
                "f1_at_0.5": at05["f1"], "f1_best_threshold": cv.metrics["micro"]["f1"],
                "threshold": cv.threshold if ours else 0.5,
                "seconds": time.perf_counter() - t0, "seed": seed,
            })
            print(f"seed {seed} {name:28s} F1 {own['f1']:.3f} (P {own['precision']:.3f} R {own['recall']:.3f}) "
                  f"F1@0.5 {at05['f1']:.3f} F1@best {cv.metrics['micro']['f1']:.3f} "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)
        for name in BASELINES:
            if name not in chosen:
                continue
            t0 = time.perf_counter()
            config = RandomForestConfig(seed=seed) if name == "random forest" else SVMConfig(seed=seed)
            row = baseline_row(records, args.channels, folds, config=config)
            results[name].append({
                "f1": row.micro["f1"], "precision": row.micro["precision"], "recall": row.micro["recall"],
                "iou": row.micro["iou"], "seconds": time.perf_counter() - t0, "seed": seed,
            })
            print(f"seed {seed} {name:28s} F1 {row.micro['f1']:.3f} (P {row.micro['precision']:.3f} "
                  f"R {row.micro['recall']:.3f}) [{time.perf_counter() - t0:.0f} s]", flush=True)
    summary = {
        name: {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "seed"}
        for name, runs in results.items()
    }
    return {"patches": len(records), "folds": args.folds, "seeds": args.seeds, "summary": summary, "runs": results}


def paired(mine: list[dict[str, float]], other: list[dict[str, float]]) -> str:
    """Seed-by-seed comparison (same folds per seed): wins, mean difference and a two-sided sign test."""
    a = {r["seed"]: r["f1"] for r in mine}
    b = {r["seed"]: r["f1"] for r in other}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return ""
    diff = [a[k] - b[k] for k in seeds]
    wins = sum(d > 0 for d in diff)
    losses = sum(d < 0 for d in diff)
    n = wins + losses
    # two-sided sign test: probability of a split at least this uneven under a fair coin
    tail = sum(math.comb(n, k) for k in range(0, min(wins, losses) + 1)) / 2**n if n else 1.0
    return (f"; seed by seed: better on {wins} of {len(seeds)} seeds, mean difference {statistics.mean(diff):+.3f}, "
            f"sign test p = {min(1.0, 2 * tail):.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "l4s" / "train")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="training config of our recipe (default: the shipped default model's)")
    p.add_argument("--channels", nargs="+", default=None, metavar="BAND",
                   help="input channels of every row (default: all 14 Landslide4Sense channels)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=None, help="epoch budget of both recipes (default: ours)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", "--small", action="store_true", help="3 folds, 12 epochs")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--recipes", nargs="+", default=None, metavar="NAME",
                   help="run only these rows (names as printed, quoted)")
    args = p.parse_args(argv)
    if args.quick:
        args.folds, args.epochs = 3, args.epochs or 12
    args.channels = args.channels or list(L4S_CHANNELS)
    unknown = [c for c in args.channels if c not in L4S_CHANNELS]
    if unknown:
        print(f"--channels: {unknown} are not Landslide4Sense channels {list(L4S_CHANNELS)}", file=sys.stderr)
        return 2
    if not args.data.is_dir():
        print(f"patches not found: {args.data}", file=sys.stderr)
        return 2
    out = run(args)
    print(f"\nmedian over seeds {args.seeds}, {out['patches']} patches, {args.folds} folds "
          f"(pooled out-of-fold F1, each recipe's own decision rule):")
    print("| recipe | F1 | precision | recall | IoU | F1@0.5 | F1@best threshold | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in out["summary"].items():
        print(f"| {name} | {s['f1']:.3f} | {s['precision']:.3f} | {s['recall']:.3f} | {s['iou']:.3f} | "
              f"{s.get('f1_at_0.5', float('nan')):.3f} | {s.get('f1_best_threshold', float('nan')):.3f} | "
              f"{s['seconds']:.0f} |")
    s = out["summary"]
    for mine, other in (("ours", "official"), ("ours (official normalization)", "official (own normalization)"),
                        ("ours", "official (own normalization)"), ("ours", "random forest"), ("ours", "svm")):
        if mine not in s or other not in s:
            continue
        verdict = "wins" if s[mine]["f1"] > s[other]["f1"] else "does NOT win"
        print(f"{mine} {verdict} against {other}: median F1 {s[mine]['f1']:.3f} vs {s[other]['f1']:.3f}"
              f"{paired(out['runs'][mine], out['runs'][other])}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

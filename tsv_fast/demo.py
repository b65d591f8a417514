"""``make demo-synthetic``: TSV-C, TSV-M and STI on CLIP-ViT-shaped task vectors, with timings.

The tasks are synthetic (power-law spectra plus a shared component, see
:mod:`tsv_fast.synthetic`) because no model hub is reachable here; the keys, shapes
and code path are those of an open_clip ViT. Run ``python -m tsv_fast.demo --help``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

import tsv_fast
from tsv_fast.cli import UsageError, _device, _Parser, _positive_int
from tsv_fast.keys import is_matrix_key
from tsv_fast.plots import plot_sti_summary
from tsv_fast.synthetic import CLIP_VITS, clip_vit_base, synthetic_task_vectors
from tsv_fast.writer import OutputError, atomic_write_file, check_output

SUMMARY, PLOT = "demo_synthetic.json", "demo_sti.png"
MAX_SEED = 2**63 - 1  # the tasks' generator takes seed + 1; torch seeds stop at 2**64 - 1


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {MAX_SEED}, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> dict:
    parser = _Parser(prog="python -m tsv_fast.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-32", choices=sorted(CLIP_VITS))
    parser.add_argument("--tasks", type=int, default=8, help="number of tasks T, at least 2 (default 8)")
    parser.add_argument("--layers", type=_positive_int, default=None, help="keep only the first this many blocks (default: all)")
    parser.add_argument("--width", type=_positive_int, default=None, help="override the width (for quick runs)")
    parser.add_argument("--seed", type=_seed, default=0, help=f"0 to {MAX_SEED} (default 0)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help=f"folder for {SUMMARY} and {PLOT} (created if missing)")
    args = parser.parse_args(argv)
    width, layers, patch, image = CLIP_VITS[args.model]
    if args.layers is not None and args.layers > layers:
        parser.error(f"argument --layers: {args.model} has {layers} blocks, got {args.layers}")
    width, layers = args.width or width, args.layers or layers
    _check_args(parser, args, width)
    print(f"tsv-fast {tsv_fast.__version__}: {tsv_fast.backend()}")
    print(f"{args.model} visual tower (width {width}, {layers} blocks), T = {args.tasks} synthetic tasks")
    timings: dict[str, float] = {}

    def timed(name, fn):
        start = time.perf_counter()
        result = fn()
        timings[name] = time.perf_counter() - start
        return result

    base = clip_vit_base(width, layers, patch, image, seed=args.seed)
    base = {k: v.to(args.device) for k, v in base.items()}
    taus = timed("make_tasks", lambda: synthetic_task_vectors(base, args.tasks, seed=args.seed + 1,
                                                                      device=args.device))
    tasks = [tsv_fast.TaskVector(t, name=f"task{i}") for i, t in enumerate(taus)]

    compressed = timed("tsv_c", lambda: tsv_fast.compress(base, tasks, progress=True))
    merged = timed("tsv_m_from_factors", lambda: tsv_fast.merge_layers(base, compressed, progress=True))
    report = timed("sti_from_factors", lambda: tsv_fast.interference(base, compressed))
    for method in ("task_arithmetic", "ties", "mean"):
        timed(method, lambda: tsv_fast.merge_layers(base, tasks, method=method))

    summary = _summary(base, tasks, compressed, merged, report, timings, args)
    _print(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary, indent=2)
    atomic_write_file(args.out / SUMMARY, lambda tmp: Path(tmp).write_text(text))
    png = plot_sti_summary(report, args.out / PLOT)
    print(f"\nwrote {args.out / SUMMARY}" + (f" and {png}" if png else ""))
    return summary


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace, width: int) -> None:
    """Refuse, before any work, what would otherwise fail deep inside it (or after it): one
    'error:' line naming the option, exit code 2, as the ``tsv-fast`` commands do."""
    if args.tasks < 2:
        parser.error(f"argument --tasks: expected an integer >= 2, got {args.tasks}")
    heads = max(1, width // 64)  # clip_vit_base's attention heads
    if width % heads:
        parser.error(f"argument --width: {width} is not divisible into its {heads} attention heads (width // 64); "
                     f"use a multiple of 64, or a width below 128")
    try:
        args.device = _device(args.device) or torch.device("cpu")
    except UsageError as exc:
        parser.error(str(exc))
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"argument --out: {args.out} is a file; --out names a folder (for {SUMMARY} and {PLOT})")
    try:  # the output files are no folders, and the folder can be made and written
        check_output(args.out / SUMMARY, [], overwrite=True, also=[args.out / PLOT])
    except OutputError as exc:
        parser.error(f"argument --out: {exc}")


def _summary(base, tasks, compressed, merged, report, timings, args) -> dict:
    T = len(tasks)
    shapes: dict[str, dict] = {}
    energy = defaultdict(list)
    for key, b in base.items():
        if not is_matrix_key(key, b):
            continue
        shape = "x".join(map(str, b.shape))
        k = min(b.shape) // T
        shapes.setdefault(shape, {"keys": 0, "r": min(b.shape), "k_per_task": k, "merged_rank": T * k})
        shapes[shape]["keys"] += 1
        for task, c in zip(tasks, compressed):
            tau = task[key].float()
            S = c.factors[key][1].float() if key in c.factors else torch.zeros(0)  # none kept when r < T (k = 0)
            energy[shape].append((S.pow(2).sum() / tau.pow(2).sum()).item())
    for shape, values in energy.items():
        shapes[shape]["tsv_c_energy_kept"] = sum(values) / len(values)
    model_bytes = sum(t.numel() * t.element_size() for t in base.values())
    delta_norm = sum((merged[k].float() - base[k].float()).pow(2).sum().item() for k in base if base[k].is_floating_point())
    return {
        "benchmark": "synthetic-clip", "model": args.model, "tasks": [t.name for t in tasks],
        "backend": str(tsv_fast.backend()),
        "shapes": shapes,
        "sti_by_block": report.by_block(),
        "tsv_c_bytes_per_task": compressed[0].nbytes(), "model_bytes": model_bytes,
        "merged_delta_norm": delta_norm ** 0.5,
        "timings_s": timings,
    }


def _print(s: dict) -> None:
    print("\nranks per matrix shape (TSV-C keeps k per task; TSV-M's Δ has rank ≤ T·k)")
    print(f"  {'shape':>10} {'keys':>5} {'r':>5} {'k':>4} {'T·k':>5}  energy kept by TSV-C")
    for shape, row in s["shapes"].items():
        print(f"  {shape:>10} {row['keys']:>5} {row['r']:>5} {row['k_per_task']:>4} {row['merged_rank']:>5}"
              f"  {100 * row['tsv_c_energy_kept']:.1f}%")
    print(f"\nTSV-C: {s['tsv_c_bytes_per_task'] / 2**20:.1f} MiB per task vs {s['model_bytes'] / 2**20:.1f} MiB "
          f"for the tower ({100 * s['tsv_c_bytes_per_task'] / s['model_bytes']:.1f}%)")
    print("\nSTI (singular task interference) per block")
    peak = max(s["sti_by_block"].values(), default=0.0)  # none when every matrix key has k = 0
    for block, value in s["sti_by_block"].items():
        print(f"  {block:<40} {value:10.4f} {'#' * int(30 * value / peak) if peak else ''}")
    print("\ntimings (s)")
    for name, seconds in s["timings_s"].items():
        print(f"  {name:<20} {seconds:8.2f}")


if __name__ == "__main__":
    main()

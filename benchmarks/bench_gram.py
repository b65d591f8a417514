"""The float64 Gram matrices of the exact solver: one full GEMM (the baseline) vs the upper
column blocks only (``solvers.gram64``'s default, a symmetric product from GEMMs), side by side.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_gram.py --device cpu

Shapes are a shape batch's task matrices, short side last (what ``gram64`` receives).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool

import torch

from timing import best_of, device_clock, run_line
from tsv_fast import solvers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["8x3072x768", "8x768x768"], help="BxPxQ")
    p.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    sync, where = device_clock(device)
    print(run_line(where, f"best of {args.repeat}") + "\n")
    print("| X (B×p×q, float32) | full GEMM | " + " | ".join(f"{b} blocks" for b in args.blocks) + " |")
    print("|---|---|" + "---|" * len(args.blocks))
    for spec in args.shapes:
        B, rows, cols = (int(d) for d in spec.split("x"))
        X = torch.randn(B, rows, cols, device=device, generator=torch.Generator(device=device).manual_seed(0))
        full = best_of(lambda: solvers.gram64(X, 1), args.repeat, sync)
        cells = []
        for b in args.blocks:
            t = best_of(lambda: solvers.gram64(X, b), args.repeat, sync)
            cells.append(f"{t:.3f} s, **{full / t:.2f}×** (work {(b + 1) / (2 * b):.2f})")
        print(f"| {spec} | {full:.3f} s | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

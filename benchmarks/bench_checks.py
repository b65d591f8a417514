"""The NaN/Inf checks every merge runs on its inputs: ``tasks.nonfinite`` (2-norms, the ∞-norm
only for tensors whose 2-norm is not finite) against the forms it replaced, side by side in one
run, on the stacked deltas of one ViT-B/32 block (T tasks) and inside whole merges.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_checks.py [--tasks 8 20] [--device cuda]

Columns: ``isfinite().all()`` per tensor (what reading a tensor used before session 11), the
∞-norms of all tensors at once (what a stack's check used), the current ``nonfinite``; then
``merge_layers`` (TSV-M) with the ∞-norm form patched in against the current code. Absolute
times on a shared machine are noisy; the ratios measured in the same run are the signal.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool

import torch

import tsv_fast
from timing import best_of, device_clock, run_line
from tsv_fast import tasks
from tsv_fast.synthetic import clip_vit_base, synthetic_task_vectors


def isfinite_all(tensors):
    return [i for i, t in enumerate(tensors) if not bool(torch.isfinite(t).all())]


def inf_norms(tensors):
    """Before session 11: one ∞-norm per tensor (multi-tensor), one host sync."""
    finite = torch.isfinite(torch.stack(torch._foreach_norm(list(tensors), ord=math.inf)))
    return [i for i, ok in enumerate(finite.tolist()) if not ok]


@contextlib.contextmanager
def patched_nonfinite(fn):
    """Every module that imported ``nonfinite`` by name uses ``fn`` instead (``_finite`` too)."""
    mods = [m for name, m in sys.modules.items() if name.startswith("tsv_fast") and hasattr(m, "nonfinite")]
    saved = [m.nonfinite for m in mods]
    for m in mods:
        m.nonfinite = fn
    try:
        yield
    finally:
        for m, f in zip(mods, saved):
            m.nonfinite = f


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, nargs="+", default=[8, 20])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--solver", default="randomized", help="the merges' solver (default randomized)")
    args = p.parse_args()
    dev = torch.device(args.device)
    sync, where = device_clock(dev)
    print(run_line(where, "one ViT-B/32 block", f"merges: TSV-M, solver={args.solver}") + "\n")
    print("| T | elements | isfinite().all() per tensor (ms) | ∞-norms (ms) | nonfinite (ms) | ratios | "
          "merge, ∞-norm checks (s) | merge, nonfinite (s) | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = {k: v.to(dev) for k, v in clip_vit_base(768, 1, 32, 224).items()}
    for T in args.tasks:
        taus = [{k: v.to(dev) for k, v in t.items()} for t in synthetic_task_vectors(base, T, seed=1)]
        stack = [torch.stack([t[k] for t in taus]) for k in base if base[k].ndim == 2]
        n = sum(s.numel() for s in stack)
        assert isfinite_all(stack) == inf_norms(stack) == tasks.nonfinite(stack) == []
        times = [best_of(lambda f=f: f(stack), args.repeat, sync) for f in (isfinite_all, inf_norms, tasks.nonfinite)]
        tvs = [tsv_fast.TaskVector(t) for t in taus]
        merge = lambda: tsv_fast.merge_layers(base, tvs, solver=args.solver)  # noqa: E731
        with patched_nonfinite(inf_norms):
            t_old = best_of(merge, args.repeat, sync)
        t_new = best_of(merge, args.repeat, sync)
        print(f"| {T} | {n / 1e6:.1f} M | {1e3 * times[0]:.1f} | {1e3 * times[1]:.1f} | {1e3 * times[2]:.1f} | "
              f"{times[0] / times[2]:.1f}×, {times[1] / times[2]:.1f}× | {t_old:.2f} | {t_new:.2f} | "
              f"{t_old / t_new:.2f}× |")


if __name__ == "__main__":
    main()

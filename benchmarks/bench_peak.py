"""Peak memory of TSV-M's GPU route, counted exactly, on a CPU or a GPU.

    .venv/bin/python benchmarks/bench_peak.py --models ViT-B-32 ViT-L-14 --tasks 4 8 14 20

Runs ``merge_layers(batch="shape", polar="newton-schulz")`` with the ``exact`` solver's GPU
route (by size: subspace iteration with ℓ capped at the Jacobi kernel's shared-memory order,
118 on an H100/H200, or k + 10, else eigh) on ``--blocks`` CLIP blocks, under :func:`tsv_fast.memory.peak_tensor_bytes`:
the most bytes of tensors alive at once, beyond inputs and output. That is what
``torch.cuda.max_memory_allocated`` measures on a GPU (on an H200 both gave 1.88× for
ViT-B/32 at T = 8 and 1.75×/1.76× for ViT-L/14 at T = 20), so the issue's target (≤ 2× one
shape batch of stacked deltas) can be checked for every T without a GPU. The ratio depends
on shapes and T, not on the number of blocks (≥ 2, so that keys form shape batches).
Reports the peak ÷ the largest shape batch (what bench_merge.py's ``peak`` column reports)
and, per shape, ÷ that shape's own batch, from a run of that shape's keys alone.
"""

from __future__ import annotations

import argparse

import torch

import tsv_fast
from timing import cpu_model, gpu_route_on_cpu
from tsv_fast import solvers
from tsv_fast.memory import peak_tensor_bytes
from tsv_fast.synthetic import CLIP_VITS, clip_vit_base, synthetic_task_vectors


def gpu_route_peak(blocks: dict, T: int, cap: int | None) -> tuple[int, int]:
    """(peak bytes beyond the output, bytes of the largest shape batch) of one merge."""
    tvs = [tsv_fast.TaskVector(t) for t in synthetic_task_vectors(blocks, T, seed=1)]
    stats = {}
    with gpu_route_on_cpu(cap):
        peak, out = peak_tensor_bytes(lambda: tsv_fast.merge_layers(blocks, tvs, polar="newton-schulz",
                                                                     batch="shape", stats=stats))
    return peak - sum(t.numel() * t.element_size() for t in out.values()), stats["largest_batch_bytes"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"], choices=sorted(CLIP_VITS))
    p.add_argument("--tasks", type=int, nargs="+", default=[4, 8, 14, 20])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--cap", type=int, default=118, help="ℓ cap of the GPU route (0: none, ℓ = 2k)")
    args = p.parse_args()
    print(f"# {cpu_model()}, torch {torch.__version__}; GPU route of exact TSV-M, WORK_SHARE "
          f"{solvers.WORK_SHARE}, ℓ cap {args.cap or 'none'}; {args.blocks} blocks\n")
    print("| model | T | peak ÷ largest shape batch | largest shape batch (MiB) | peak (MiB) | per shape: peak ÷ its own batch |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        width, _, patch, image = CLIP_VITS[model]
        base = clip_vit_base(width, args.blocks, patch, image)
        blocks = {k: v for k, v in base.items() if ".resblocks." in k}
        for T in args.tasks:
            peak, batch = gpu_route_peak(blocks, T, args.cap or None)
            per_shape = []
            for shape in sorted({tuple(v.shape) for v in blocks.values() if v.dim() == 2}, reverse=True):
                one = {k: v for k, v in blocks.items() if tuple(v.shape) == shape and k.endswith("weight")}
                s_peak, s_batch = gpu_route_peak(one, T, args.cap or None)
                per_shape.append(f"{shape[0]}×{shape[1]}: {s_peak / s_batch:.2f}×")
            print(f"| {model} | {T} | **{peak / batch:.2f}×** | {batch / 2**20:.0f} | {peak / 2**20:.0f} | "
                  + ", ".join(per_shape) + " |", flush=True)


if __name__ == "__main__":
    main()

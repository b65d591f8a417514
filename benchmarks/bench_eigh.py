"""batched_eigh (compiled CPU op, parallel-ordered Jacobi) vs torch.linalg.eigh on a batch
of small symmetric matrices, side by side in one run, with the ratio.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_eigh.py [--batch 96] [--sizes 32 64 106 128]

On the CPU, LAPACK (syevd) is expected to win for n >= ~64: Jacobi does several times
more flops and this CPU path is plain scalar code.  The op exists for the GPU, where
torch.linalg.eigh loops over the batch (cuSOLVER's batched syevj stops at 32x32); on a
CUDA machine pass --device cuda to time the kernel instead, and --threads 0 512 1024 to
time its block sizes side by side (0: the kernel's choice; the CPU op ignores it), on
random or nearly diagonal matrices (--kind: what the first and the later Rayleigh–Ritz
steps of subspace iteration see).  Absolute times on a shared machine are noisy; the
ratio measured in the same run is the signal.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool

import torch

from timing import best_of, device_clock
from tsv_fast import ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 106, 128])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, nargs="+", default=[0], help="CUDA threads per matrix (0: auto)")
    p.add_argument("--kind", choices=["random", "nearly-diagonal"], default="random")
    args = p.parse_args()

    ok, why = ops.load_extension()
    if not ok:
        raise SystemExit(why)
    dev = torch.device(args.device)
    sync, where = device_clock(dev)
    print(f"# {where}; {torch.get_num_threads()} CPU threads; torch {torch.__version__}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; batch {args.batch}; best of {args.repeat}")
    print(f"# {args.kind} symmetric matrices")
    print("| n | dtype | threads | batched_eigh (ms) | torch.linalg.eigh (ms) | ratio eigh/batched | "
          f"vs threads {args.threads[0]} | max |dw|/||A|| |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for n in args.sizes:
        for dtype in (torch.float32, torch.float64):
            X = torch.randn(args.batch, n, n, generator=g, dtype=torch.float64)
            A = (X + X.mT) / 2
            if args.kind == "nearly-diagonal":  # rotated to its eigenbasis, then 1e-3 of it added back
                w, Q = torch.linalg.eigh(A)
                A = torch.diag_embed(w) + 1e-3 * A
            A = A.to(dtype).to(dev)
            t_ref = best_of(lambda: torch.linalg.eigh(A), args.repeat, sync)
            wr = torch.linalg.eigvalsh(A.double().cpu())
            first = None
            for threads in args.threads:
                t_op = best_of(lambda: torch.ops.tsv_fast.batched_eigh(A, 30, 0.0, threads), args.repeat, sync)
                first = first or t_op
                w, _ = torch.ops.tsv_fast.batched_eigh(A, 30, 0.0, threads)
                err = ((w.double().cpu() - wr).abs().amax(-1) / torch.linalg.matrix_norm(A.double().cpu())).max()
                print(f"| {n} | {str(dtype)[6:]} | {threads or 'auto'} | {1e3 * t_op:.2f} | {1e3 * t_ref:.1f} | "
                      f"{t_ref / t_op:.2f} | {first / t_op:.2f}× | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()

"""CholeskyQR's small factor, R⁻¹ for G = RᵀR on a batch of ℓ×ℓ Gram matrices: the fused op
(ops.batched_cholesky_inverse, one launch) against the library route it replaces
(torch.linalg.cholesky_ex, then solve_triangular against I), side by side in one run, with the
ratio; and one whole CholeskyQR pass (solvers.orthonormalize, passes=1) each way.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_cholqr.py [--device cuda] \\
        [--batch 80] [--sizes 102 146] [--rows 1024] [--threads 0 128 512]

(80, 102, 102) is what the exact solver's blocks give for ViT-L/14 at T = 20 (ℓ = 2k = 102, q =
1024). On the CPU LAPACK is expected to win (the op is scalar code there: it exists for the GPU,
where the library pair ran ~0.35 ms for that batch on an H200, session 13). Absolute times on a
shared machine are noise; the ratio measured in the same run is the signal.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool

import torch

from timing import best_of, device_clock, run_line
from tsv_fast import ops, solvers


def library(G: torch.Tensor) -> torch.Tensor:
    R, _ = torch.linalg.cholesky_ex(G, upper=True)
    return torch.linalg.solve_triangular(R, torch.eye(G.shape[-1], dtype=G.dtype, device=G.device), upper=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=80)
    p.add_argument("--sizes", type=int, nargs="+", default=[102])
    p.add_argument("--rows", type=int, default=1024, help="rows of the block Y of the whole-pass timing")
    p.add_argument("--threads", type=int, nargs="+", default=[0], help="CUDA threads per matrix (0: 256)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    ok, why = ops.load_extension()
    if not ok:
        raise SystemExit(f"error: {why}")
    device = torch.device(args.device)
    sync, where = device_clock(device)
    print(run_line(where, f"batch {args.batch}, float64, best of {args.repeat}"))
    print("| ℓ | library (cholesky_ex + solve_triangular) | fused op, threads (0: 256 on a GPU, the plain "
          "algorithm on a CPU) | ratio | one CholeskyQR pass, library → fused | ratio |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator(device=device).manual_seed(0)
    for n in args.sizes:
        Y = torch.randn(args.batch, args.rows, n, generator=g, device=device, dtype=torch.float64)
        Y = Y * torch.logspace(0, -3, n, dtype=torch.float64, device=device)
        G = Y.mT @ Y
        t_lib = best_of(lambda: library(G), args.repeat, sync)
        saved = solvers.FUSED_CHOLESKY_INVERSE
        try:
            solvers.FUSED_CHOLESKY_INVERSE = ()
            t_pass_lib = best_of(lambda: solvers.orthonormalize(Y, 1), args.repeat, sync)
            solvers.FUSED_CHOLESKY_INVERSE = (device.type,)
            fused_pass = device.type == "cuda" and n <= (ops.cholesky_inverse_shared_order(device) or 0)
            t_pass = best_of(lambda: solvers.orthonormalize(Y, 1), args.repeat, sync) if fused_pass else None
        finally:
            solvers.FUSED_CHOLESKY_INVERSE = saved
        for threads in args.threads:
            t = best_of(lambda: torch.ops.tsv_fast.batched_cholesky_inverse(G, threads), args.repeat, sync)
            err = (torch.ops.tsv_fast.batched_cholesky_inverse(G, threads)[0] - library(G)).abs().amax().item()
            pass_cols = (f"{t_pass_lib * 1e3:.3f} → {t_pass * 1e3:.3f} ms | {t_pass_lib / t_pass:.2f}×"
                         if t_pass else f"{t_pass_lib * 1e3:.3f} ms → (library on this device) | –")
            print(f"| {n} | {t_lib * 1e3:.3f} ms | {t * 1e3:.3f} ms, {threads} (max diff {err:.1e}) | "
                  f"{t_lib / t:.2f}× | {pass_cols} |")


if __name__ == "__main__":
    main()

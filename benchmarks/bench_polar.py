"""TSV-M's polar factors: float64 eigh, the coupled Gram-side Newton–Schulz iteration (session 5's),
Newton–Schulz on the Cholesky factor with XᵀX as one GEMM (sessions 6–7), from its upper
blocks (sessions 8–11), and that after a scaled Newton step from L⁻¹ (now), side by side on the
same concatenations.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_polar.py --shapes 768x768:8 1024x1024:20

Inputs are what a merge whitens: ``[U_1 … U_T]``, each task's top-k left singular vectors
(float64 SVD) of power-law task matrices sharing a component (``tsv_fast.synthetic``'s model),
``--batch`` keys at once. Each route is timed (best of ``--repeat``), and its result compared
with the float64 eigh whitening; Newton–Schulz also reports its steps and the work of its
matrix products in units of one c×c×c product.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench_flops import _GEMMS, gemm_flops
from timing import best_of, device_clock, run_line
from tsv_fast import tsv
from tsv_fast.synthetic import correlated_tasks


def coupled_newton_schulz(G, rcond, bound_sq, tol=1e-10, check=1e-8):
    """The baseline: session 5's coupled iteration ``T = aI + b·ZY, Y ← YT, Z ← TZ`` from
    ``Y = G/bound², Z = I`` (three c×c products a step), with the same schedule and checks."""
    rcond = max(rcond, 1e-7)
    bound_sq = torch.as_tensor(bound_sq, dtype=G.dtype, device=G.device).expand(G.shape[:-2])
    scale = (bound_sq * (1 + 1e-6)).clamp(min=torch.finfo(G.dtype).tiny)[..., None, None]
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    Y, Z = G / scale, eye.expand(G.shape)
    lower = (tsv.smallest_eigenvalue_estimate(Y).clamp(min=0).sqrt() / 2).clamp(min=rcond, max=1.0)
    a_rows, b_rows, first_check = tsv.scaled_newton_schulz_schedule(lower.reshape(-1).tolist(), rcond, tol)
    shape = (len(a_rows), *G.shape[:-2], 1, 1)
    A = torch.tensor(a_rows, dtype=G.dtype).reshape(shape).to(G.device)
    B = torch.tensor(b_rows, dtype=G.dtype).reshape(shape).to(G.device)
    for step in range(len(a_rows) + 1):
        ZY = Z @ Y
        if step >= first_check or step == len(a_rows):
            ok = (ZY - eye).abs().amax((-2, -1)) <= tol
            if step == len(a_rows) or bool((ok | (B[step, ..., 0, 0] == 0)).all()):
                break
        T = A[step] * eye + B[step] * ZY
        Y, Z = Y @ T, T @ Z
    W = Z / scale.sqrt()
    WG = W @ G
    ok &= (WG @ W - eye).abs().amax((-2, -1)) <= check
    ok &= (WG - WG.mT).abs().amax((-2, -1)) <= check * scale[..., 0, 0].sqrt()
    return W, ok & (bound_sq > 0)


def xtx_one_gemm(X):
    """Newton–Schulz's XᵀX as sessions 6–7 formed it: one full GEMM."""
    return X.mT @ X


def full_gemm_newton_schulz(G, rcond, bound_sq, tol=1e-10, check=1e-8):
    """Sessions 6–7's form: Newton–Schulz on the Cholesky factor with ``XᵀX`` as one full GEMM
    (now from its upper blocks, ``solvers.symmetric_gram``); the rest as now."""
    symmetric_gram = tsv.symmetric_gram
    tsv.symmetric_gram = xtx_one_gemm
    try:
        return tsv.newton_schulz_whitening(G, rcond, bound_sq, tol, check)
    finally:
        tsv.symmetric_gram = symmetric_gram


def cubic_only_newton_schulz(G, rcond, bound_sq, tol=1e-10, check=1e-8, info=None):
    """Sessions 8–11: the scaled cubic steps from Lᵀ itself, without the Newton start."""
    tsv.NEWTON_START = False
    try:
        return tsv.newton_schulz_whitening(G, rcond, bound_sq, tol, check, info)
    finally:
        tsv.NEWTON_START = True


class GemmWork(TorchDispatchMode):
    """Arithmetic of the matrix products, in units of one c×c×c product per matrix."""

    def __init__(self, c, batch):
        super().__init__()
        self.unit, self.units = batch * c ** 3, 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _GEMMS:
            self.units += gemm_flops(func, args) / 2 / self.unit
        return func(*args, **(kwargs or {}))


def concatenation(m: int, n: int, T: int, gen, shared: float = 0.3) -> torch.Tensor:
    k = min(m, n) // T
    taus = correlated_tasks(m, n, T, gen, shared=shared)
    return torch.cat([torch.linalg.svd(tau.double(), full_matrices=False)[0][:, :k] for tau in taus], 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["768x768:8", "3072x768:8", "1024x1024:20"],
                   help="MxN:T — the task matrices' shape (U is M×(T·k)) and the number of tasks")
    p.add_argument("--batch", type=int, default=2, help="keys whitened at once")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    sync, where = device_clock(device)
    print(run_line(where, f"{args.batch} keys at once, best of {args.repeat}") + "\n")
    routes = [("coupled NS (session 5)", coupled_newton_schulz),
              ("Cholesky-factor NS, XᵀX one GEMM (sessions 6–7)", full_gemm_newton_schulz),
              ("Cholesky-factor NS, XᵀX from upper blocks (session 8–11)", cubic_only_newton_schulz),
              ("the same after a scaled Newton step from L⁻¹ (now)", tsv.newton_schulz_whitening)]
    print("| U (per key) | σmin/σmax | eigh | " + " | ".join(name for name, _ in routes) + " | sessions 8–11 ÷ now | "
          "steps (8–11 → now) | products, in c³ units | max error vs eigh | checks passed |")
    print("|---|---|---|" + "---|" * len(routes) + "---|---|---|---|---|")
    rcond = tsv.WHITENING_RCOND
    for spec in args.shapes:
        dims, T = spec.split(":")
        m, n = (int(d) for d in dims.split("x"))
        T = int(T)
        gen = torch.Generator(device=device).manual_seed(0)  # drawn where it runs (a GPU: seconds)
        X = torch.stack([concatenation(m, n, T, gen) for _ in range(args.batch)])
        k, c = min(m, n) // T, X.shape[-1]
        G = tsv.block_gram(X, [k] * T)
        truth = X @ tsv._eigh_inverse_sqrt(G, rcond)
        sv = torch.linalg.svdvals(X)
        cond = float((sv[..., -1] / sv[..., 0]).min())
        t_eigh = best_of(lambda: tsv._eigh_inverse_sqrt(G, rcond), args.repeat, sync)
        times, counts, errors, passed = [], [], [], []
        for _, fn in routes:
            times.append(best_of(lambda: fn(G, rcond, float(T)), args.repeat, sync))
            counter = GemmWork(c, len(X))
            with counter:
                W, ok = fn(G, rcond, float(T))
            counts.append(f"{counter.units:.1f}")
            errors.append(f"{float((X @ W - truth).abs().amax()):.1e}")
            passed.append(f"{int(ok.sum())}/{ok.numel()}")
        before, info = {}, {}
        cubic_only_newton_schulz(G, rcond, float(T), info=before)
        tsv.newton_schulz_whitening(G, rcond, float(T), info=info)
        print(f"| {m}×{c} (T = {T}) | {cond:.1e} | {t_eigh:.3f} s | " + " | ".join(f"{t:.3f} s" for t in times)
              + f" | **{times[2] / times[3]:.2f}×** | {before['steps']} → {info['steps']} | {' / '.join(counts)} | "
              f"{' / '.join(errors)} | {' / '.join(passed)} |", flush=True)


if __name__ == "__main__":
    main()

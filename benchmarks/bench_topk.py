"""Top-k eigensolver candidates for the exact solver's float64 Gram matrices, side by side.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_topk.py --tasks 8 20

Issue 4 asks to measure partial eigensolvers and block Krylov methods beside subspace
iteration before choosing per shape and device. Each candidate gets the same batch of T
task deltas of one ViT-B/32 key (power-law spectra with a shared component, as in the
merge benchmarks) and returns its top-k singular triplets through the float64 Gram
matrix of the short side; the time includes the Gram matrix and the long-side vectors,
which all share. Accuracy is measured against full float64 ``eigh``: the largest
singular-value error (relative) and subspace error ‖P1 − P2‖_F of the top-k right vectors.

Candidates: full ``torch.linalg.eigh`` (LAPACK syevd, the CPU route at few tasks);
``scipy.linalg.eigh(subset_by_index=...)`` with the MRRR (``evr``) and bisection
(``evx``) drivers, partial tridiagonal eigensolvers; ``torch.lobpcg`` (block Krylov,
LOBPCG); tsv-fast's Chebyshev subspace iteration (the GPU route, and the CPU route at
many tasks). CPU only (SciPy has no GPU path).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool

import torch

from timing import best_of, cpu_model
from tsv_fast import solvers
from tsv_fast.synthetic import clip_vit_base, synthetic_task_vectors


def _from_gram(A: torch.Tensor, k: int, top_eigenpairs) -> solvers.TopK:
    """Top-k of each matrix of A (B, p, q), p ≥ q, from ``top_eigenpairs(G, k)`` of its Gram matrix."""
    B, p, q = A.shape
    Y = torch.empty(B, p, k, dtype=torch.float64)
    V = torch.empty(B, q, k, dtype=torch.float64)
    S = torch.empty(B, k, dtype=torch.float64)
    for i in range(B):
        w, vecs = top_eigenpairs(solvers.gram64(A[i:i + 1])[0], k)  # descending
        s = w.clamp(min=0).sqrt()
        solvers.long_side(A[i:i + 1], vecs[None], s[None], out=Y[i:i + 1])
        V[i], S[i] = vecs, s
    return solvers.TopK(Y, S, V)


def _scipy(driver: str):
    import scipy.linalg

    def top(G: torch.Tensor, k: int):
        q = G.shape[-1]
        w, vecs = scipy.linalg.eigh(G.numpy(), subset_by_index=[q - k, q - 1], driver=driver)
        return torch.from_numpy(w[::-1].copy()), torch.from_numpy(vecs[:, ::-1].copy())
    return top


def _lobpcg(G: torch.Tensor, k: int):
    w, vecs = torch.lobpcg(G, k=k, largest=True, tol=1e-10, niter=200)
    order = w.argsort(descending=True)
    return w[order], vecs[:, order]


def _projector_error(V1: torch.Tensor, V2: torch.Tensor) -> float:
    return float((V1 @ V1.mT - V2 @ V2.mT).flatten(1).norm(dim=1).max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, nargs="+", default=[8, 20])
    p.add_argument("--key", default="visual.transformer.resblocks.0.mlp.c_fc.weight")
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    base = clip_vit_base(768, 1, 32, 224)
    w = base[args.key]
    candidates = {
        "full eigh (LAPACK syevd)": lambda A, k: solvers.eigh_topk(A, k, torch.float64),
        "partial: scipy eigh, MRRR (evr)": lambda A, k: _from_gram(A, k, _scipy("evr")),
        "partial: scipy eigh, bisection (evx)": lambda A, k: _from_gram(A, k, _scipy("evx")),
        "block Krylov: torch.lobpcg": lambda A, k: _from_gram(A, k, _lobpcg),
        "Chebyshev subspace iteration (tsv-fast)": lambda A, k: solvers.subspace_topk(A, k, torch.float64),
    }
    print(f"# {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; key {args.key} "
          f"{tuple(w.shape)}, T task deltas per batch, best of {args.repeat}\n")
    print("| T | k | candidate | time (s) | vs full eigh | max rel. error of s | subspace error |")
    print("|---|---|---|---|---|---|---|")
    for T in args.tasks:
        taus = synthetic_task_vectors({args.key: w}, T, seed=1)
        A = torch.stack([t[args.key] for t in taus])
        A = A if A.shape[-2] >= A.shape[-1] else A.mT.contiguous()
        k = min(A.shape[-2:]) // T
        ref = solvers.eigh_topk(A, k, torch.float64)
        t_ref = None
        for name, fn in candidates.items():
            try:
                t = best_of(lambda: fn(A, k), args.repeat, lambda: None)
                out = fn(A, k)
            except Exception as exc:  # a candidate that fails is reported, not fatal
                print(f"| {T} | {k} | {name} | failed: {type(exc).__name__}: {str(exc)[:80]} | | | |")
                continue
            t_ref = t_ref or t
            s_err = float(((out.S - ref.S).abs() / ref.S[..., :1]).max())
            print(f"| {T} | {k} | {name} | {t:.2f} | {t_ref / t:.2f}× | {s_err:.1e} | "
                  f"{_projector_error(out.V, ref.V):.1e} |", flush=True)


if __name__ == "__main__":
    main()

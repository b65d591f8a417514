"""Top-k SVD solvers for batches of same-shape matrices.

Every solver takes ``A`` of shape ``(B, m, n)`` and returns a :class:`TopK`:
``U (B, m, k)``, ``S (B, k)`` (descending), ``V (B, n, k)`` with ``A ≈ U diag(S) Vᵀ``,
and, for approximate solvers, the relative residual ``‖A − U diag(S) Vᵀ‖_F / ‖A‖_F``
of each matrix, computed at run time so the error is reported, never guessed.

* ``"exact"`` (default): Gram matrix of the short side and a float64 symmetric
  eigensolver. Exact to float64 rounding of the Gram matrix (SPEC.md: float32 eigh
  cannot resolve the nearly flat spectrum around k; float64 can), and about 2× cheaper
  than a thin SVD of a tall matrix on a CPU.
* ``"svd"``: ``torch.linalg.svd`` in the compute dtype, truncated; what the authors do.
* ``"randomized"``: Halko–Martinsson–Tropp subspace iteration (oversampling 10,
  2 power iterations, CholeskyQR2), an opt-in approximation for hot paths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from . import ops
from .errors import TSVInputError


class TopK(NamedTuple):
    U: Tensor
    S: Tensor
    V: Tensor
    residual: Tensor | None = None  # (B,) relative Frobenius error, approximate solvers only


Solver = Callable[[Tensor, int], TopK]


def svd_topk(A: Tensor, k: int) -> TopK:
    """Thin SVD (LAPACK / cuSOLVER through torch), truncated to the k leading triplets."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return TopK(U[..., :k], S[..., :k], Vh[..., :k, :].mT)


def _short_side(A: Tensor) -> tuple[Tensor, bool]:
    """(X, tall): X has at least as many rows as columns; A = X or Xᵀ."""
    tall = A.shape[-2] >= A.shape[-1]
    return (A if tall else A.mT), tall


def exact_topk(A: Tensor, k: int) -> TopK:
    """Top-k from ``eigh(XᵀX)`` in float64 on the short side; the long-side vectors are
    ``X V / s``. Directions with ``s`` below the input's rounding level get a zero
    vector (their singular value is noise, so they carry nothing).

    One matrix at a time: LAPACK and cuSOLVER run large eigenproblems one by one
    anyway, and the float64 copies, Gram matrix and eigenvectors then cost one
    matrix's worth of memory instead of the whole batch's.
    """
    dtype = A.dtype
    X, tall = _short_side(A)
    lead = A.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])
    p, q = X.shape[-2:]
    Y = torch.empty(X.shape[0], p, k, dtype=dtype, device=A.device)
    Q = torch.empty(X.shape[0], q, k, dtype=dtype, device=A.device)
    S = torch.empty(X.shape[0], k, dtype=dtype, device=A.device)
    for i, x in enumerate(X):
        x64 = x.double()
        w, vecs = torch.linalg.eigh(x64.mT @ x64)
        w, vecs = w.flip(-1)[:k], vecs.flip(-1)[:, :k]
        s = w.clamp(min=0).sqrt()
        noise = s[:1] * (torch.finfo(dtype).eps * 4 * max(p, q) ** 0.5)
        Y[i] = (x64 @ vecs) / torch.where(s > noise, s, torch.inf)
        Q[i], S[i] = vecs, s
    U, V = (Y, Q) if tall else (Q, Y)
    return TopK(U.reshape(*lead, p if tall else q, k), S.reshape(*lead, k), V.reshape(*lead, q if tall else p, k))


def orthonormalize(Y: Tensor) -> Tensor:
    """CholeskyQR2 (two Cholesky passes, GEMM-only); Householder QR where Cholesky breaks down.

    The first pass forms the ℓ×ℓ Gram matrix in float64 (tolerating cond(Y) up to ~1e8);
    after it Q is orthonormal to a few digits, so the second pass can stay in Y's dtype.
    """
    Q = Y
    for gram_dtype in (torch.float64, Y.dtype):
        Qg = Q.to(gram_dtype)
        R, info = torch.linalg.cholesky_ex((Qg.mT @ Qg).double(), upper=True)
        if bool((info != 0).any()):
            return torch.linalg.qr(Y).Q
        Q = torch.linalg.solve_triangular(R.to(Y.dtype), Q, upper=True, left=False)
    return Q


def _squared_norms(X: Tensor) -> Tensor:
    """‖X_i‖_F² per matrix, in float64 (from a float32 norm: one pass, no float64 copy)."""
    return torch.linalg.vector_norm(X, dim=(-2, -1)).double().square()


def randomized_topk(A: Tensor, k: int, oversample: int = 10, power_iters: int = 2, seed: int = 0) -> TopK:
    """Randomized subspace iteration with Rayleigh–Ritz (Halko, Martinsson, Tropp 2011, alg. 4.4/5.1).

    Work is batched GEMMs plus one ℓ×ℓ float64 eigenproblem per matrix (ℓ = k + oversample).
    When ℓ > n/3 (few tasks: k is a large share of the rank) sampling saves little and
    converges slowly, so the exact solver runs instead (its residual is still reported).
    """
    dtype = A.dtype
    X, tall = _short_side(A)
    n = X.shape[-1]
    ell = min(k + oversample, n)
    if 3 * ell > n:
        U, S, V, _ = exact_topk(A, k)
        total = _squared_norms(X)
        kept = S.double().square().sum(-1)
        return TopK(U, S, V, ((total - kept).clamp(min=0) / total.clamp(min=1e-300)).sqrt())
    gen = torch.Generator(device=A.device).manual_seed(seed)
    omega = torch.randn(*X.shape[:-2], n, ell, generator=gen, device=A.device, dtype=dtype)
    Q = orthonormalize(X @ omega)
    for _ in range(power_iters):  # one orthonormalisation per iteration: cond grows by s1/sℓ² at most
        Q = orthonormalize(X @ (X.mT @ Q))
    B = (Q.mT @ X).double()  # (ℓ, n): the small projected problem
    # On a GPU the whole batch of ℓ×ℓ problems is one Jacobi kernel launch (one CUDA block per
    # matrix); torch.linalg.eigh would loop over them. On a CPU LAPACK is faster (benchmarks/bench_eigh.py).
    w, Z = (ops.batched_eigh if B.is_cuda else torch.linalg.eigh)(B @ B.mT)
    w, Z = w.flip(-1)[..., :k], Z.flip(-1)[..., :k]
    s = w.clamp(min=0).sqrt()
    noise = s[..., :1] * (torch.finfo(dtype).eps * 4 * max(A.shape[-2:]) ** 0.5)
    V = (B.mT @ Z) / torch.where(s > noise, s, torch.inf).unsqueeze(-2)
    U = Q.double() @ Z
    # ‖A − U S Vᵀ‖² = ‖A‖² − Σ s_i², since U S Vᵀ is the projection of A onto span(U).
    total = _squared_norms(X)
    residual = ((total - w.clamp(min=0).sum(-1)).clamp(min=0) / total.clamp(min=1e-300)).sqrt()
    if not tall:
        U, V = V, U
    return TopK(U.to(dtype), s.to(dtype), V.to(dtype), residual)


SOLVERS: dict[str, Solver] = {"exact": exact_topk, "svd": svd_topk, "randomized": randomized_topk}


def get_solver(name: str) -> Solver:
    try:
        return SOLVERS[name]
    except KeyError:
        raise TSVInputError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None

"""Top-k SVD solvers for batches of same-shape matrices.

Every solver takes ``A`` of shape ``(B, m, n)`` and returns a :class:`TopK`:
``U (B, m, k)``, ``S (B, k)`` (descending), ``V (B, n, k)`` with ``A ≈ U diag(S) Vᵀ``,
and, for approximate solvers, the relative residual ``‖A − U diag(S) Vᵀ‖_F / ‖A‖_F``
of each matrix, computed at run time so the error is reported, never guessed.

* ``"exact"`` (default): float64 Gram matrix of the short side, then its top-k
  eigenpairs to float64-eigh quality (SPEC.md: float32 eigh cannot resolve the nearly
  flat spectrum around k; float64 can), by ``"eigh"`` on a CPU (a full LAPACK eigh per
  matrix, about 2× cheaper than a thin SVD of a tall matrix) and ``"subspace"`` on a GPU
  (batched subspace iteration run to a residual tolerance, with an eigh fallback).
* ``"svd"``: ``torch.linalg.svd`` in the compute dtype, truncated; what the authors do.
* ``"randomized"``: Halko–Martinsson–Tropp subspace iteration (oversampling max(10, k/2),
  2 power iterations, CholeskyQR2), an opt-in approximation for hot paths.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
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


_CHUNKS = 8  # float64 work goes row-chunk by row-chunk: a float64 copy of 1/8 of the batch at a time
GRAM_BLOCKS = 4  # gram64 multiplies the upper b(b+1)/2 of b×b column blocks: 5/8 of a full GEMM's work


def gram64(X: Tensor, blocks: int | None = None) -> Tensor:
    """``XᵀX`` in float64 for a batch ``(B, p, q)``, accumulated over 8 row chunks (batched
    GEMMs; the float64 copy alive at a time is a quarter of the float32 batch's bytes).

    Symmetric, so only the upper blocks of a ``blocks × blocks`` (default ``GRAM_BLOCKS``,
    fewer where blocks would be under 128 columns wide: small GEMMs lose more than they save)
    partition of the columns are multiplied, one GEMM per block row, and mirrored: the
    symmetric rank-k update (BLAS ``syrk``, which has no batched form in torch) from GEMMs,
    (b + 1)/2b of the full product's work. These Gram matrices are a third of a merge's
    float64 arithmetic on a GPU (``benchmarks/bench_flops.py``)."""
    B, p, q = X.shape
    edges = _block_edges(q, blocks)
    G = torch.empty(B, q, q, dtype=torch.float64, device=X.device) if p else X.new_zeros(B, q, q, dtype=torch.float64)
    step = max(1, -(-p // _CHUNKS))
    for r in range(0, p, step):
        _add_upper_gram(G, X[:, r:r + step].double(), edges, beta=1.0 if r else 0.0)
    return _mirror_upper(G, edges)


def symmetric_gram(X: Tensor, blocks: int | None = None) -> Tensor:
    """``XᵀX`` for a batch ``(..., p, q)`` in X's dtype, from the upper column blocks as in
    :func:`gram64` (one pass, no row chunks, no cast): Newton–Schulz's ``XᵀX`` step, (b + 1)/2b
    of a GEMM's work."""
    p, q = X.shape[-2:]
    edges = _block_edges(q, blocks)
    flat = X.reshape(math.prod(X.shape[:-2]), p, q)
    G = torch.empty(flat.shape[0], q, q, dtype=X.dtype, device=X.device)
    _add_upper_gram(G, flat, edges, beta=0.0)
    return _mirror_upper(G, edges).reshape(*X.shape[:-2], q, q)


def _block_edges(q: int, blocks: int | None) -> list[int]:
    b = max(1, min(blocks, q)) if blocks else _gram_blocks(q)
    return [q * i // b for i in range(b + 1)]


def _add_upper_gram(G: Tensor, X: Tensor, edges: list[int], beta: float) -> None:
    """``G ← beta·G + XᵀX`` on the blocks on and above the diagonal (one GEMM per block row;
    ``beta = 0`` ignores what G held, NaN included)."""
    for lo, hi in zip(edges[:-1], edges[1:]):
        G[:, lo:hi, lo:].baddbmm_(X[..., lo:hi].mT, X[..., lo:], beta=beta)


def _mirror_upper(G: Tensor, edges: list[int]) -> Tensor:
    """The blocks below the diagonal from those above (G symmetric)."""
    for lo, hi in zip(edges[1:-1], edges[2:]):
        G[:, lo:hi, :lo] = G[:, :lo, lo:hi].mT
    return G


def _gram_blocks(q: int) -> int:
    return max(1, min(GRAM_BLOCKS, q // 128))  # blocks ≥ 128 wide


def _gram_extra_columns(p: int, q: int) -> int:
    """gram64's float64 work per matrix beyond G, in q-long float64 columns: one row chunk of X
    and the (q/b)×q result of one block-row product (baddbmm into a strided view of G)."""
    return -(-p // _CHUNKS) + q // _gram_blocks(q)


def noise_level(dtype: torch.dtype, shape: Sequence[int]) -> float:
    """Singular values below this share of the largest are rounding noise of an m×n matrix
    stored in ``dtype`` (``4·eps·√max(m, n)``): their singular vectors carry nothing."""
    return torch.finfo(dtype).eps * 4 * max(shape) ** 0.5


def long_side(X: Tensor, vecs: Tensor, s: Tensor, out: Tensor) -> Tensor:
    """``out = X vecs / s`` (the long-side singular vectors) in float64, by row chunks.
    Directions whose ``s`` is below X's rounding level get zero vectors: they carry noise."""
    noise = s[..., :1] * noise_level(X.dtype, X.shape[-2:])
    inv = (1 / torch.where(s > noise, s, torch.inf)).unsqueeze(-2)
    step = max(1, -(-X.shape[1] // _CHUNKS))
    for r in range(0, X.shape[1], step):
        out[:, r:r + step] = (X[:, r:r + step].double() @ vecs) * inv
    return out


# LAPACK from SciPy (OpenBLAS threads) for the CPU's large float64 eigenproblems, instead of
# torch.linalg.eigh (MKL on torch's OpenMP threads). "auto": where OMP_WAIT_POLICY=PASSIVE (what
# the Makefile and BENCHMARKS.md use on shared machines): there torch's threads sleep between
# the many small parallel regions of the tridiagonalisation, and its eigh of a 768×768 Gram
# matrix took 133 ms (90 ms on one thread) against SciPy's 56 ms (syevd) and 44 ms (syevr, the
# top 96 pairs only); a ViT-B/32 T = 8 merge 7.87 → 4.56 s. Without PASSIVE torch's eigh takes
# 61 ms, and OpenBLAS's threads then compete with torch's spinning ones (that merge: 4.0 s with
# torch, 6.6 s with SciPy), so "auto" keeps torch. True / False force it; no SciPy: torch.
USE_SCIPY_EIGH: bool | str = "auto"
# Each SciPy eigh runs on one OpenBLAS thread, the batch's matrices spread over torch's thread
# count: with OpenBLAS's own threads, any other load on the machine (another process, or torch's
# threads between the calls) left each 768×768 syevd waiting on descheduled spinning threads, up to
# 10 s instead of 0.07 s (a ViT-B/32 block at T = 2: 78 s against the reference's 4 s); on one
# thread it cannot wait on another. False: OpenBLAS's default threads, as before.
SCIPY_ONE_BLAS_THREAD = True


def _scipy_linalg():
    """``scipy.linalg`` where ``USE_SCIPY_EIGH`` says to use it and SciPy (and threadpoolctl,
    which pins its BLAS threads) can be imported; else None (torch's eigh)."""
    use = USE_SCIPY_EIGH
    if use == "auto":
        use = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    if not use or _blas_threads() is None:
        return None
    import scipy.linalg
    return scipy.linalg


@functools.cache
def _blas_threads():
    """threadpoolctl's controller of the BLAS libraries loaded with SciPy's LAPACK, or None."""
    try:
        import scipy.linalg  # noqa: F401  (loads SciPy's OpenBLAS, so the controller sees it)
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


@contextlib.contextmanager
def _scipy_threads(batch: int) -> Iterator[Callable]:
    """A ``map`` for SciPy calls over ``batch`` matrices: on one BLAS thread each, run on up to
    ``torch.get_num_threads()`` Python threads (LAPACK releases the GIL)."""
    if not SCIPY_ONE_BLAS_THREAD:
        yield map
        return
    workers = min(batch, torch.get_num_threads())
    with _blas_threads().limit(limits=1, user_api="blas"):
        if workers <= 1:
            yield map
            return
        with ThreadPoolExecutor(workers) as pool:
            yield pool.map


def symmetric_eigh(G: Tensor, top: int | None = None) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of a batch of symmetric matrices (eigenvalues ascending, vectors in
    columns); with ``top``, only the ``top`` largest pairs, still ascending. Float64 CPU
    matrices go to SciPy's LAPACK (``USE_SCIPY_EIGH``): syevd, or syevr for a subset, which skips
    the back-transformation of the other vectors. A matrix SciPy refuses (NaN/Inf, no
    convergence) or answers short (syevr can return fewer pairs than asked when equal
    eigenvalues straddle the cut) goes to torch, which raises or returns what it did before;
    so does a tensor that requires grad (torch's eigh has a backward)."""
    n = G.shape[-1]
    top = n if top is None else min(top, n)
    host = G.device.type == "cpu" and G.dtype == torch.float64 and not G.requires_grad
    linalg = _scipy_linalg() if host else None
    if linalg is None or n == 0 or top == 0:
        w, V = torch.linalg.eigh(G)
        return w[..., n - top:], V[..., n - top:]
    flat = G.reshape(-1, n, n)
    w = torch.empty(flat.shape[0], top, dtype=G.dtype)
    V = torch.empty(flat.shape[0], n, top, dtype=G.dtype)
    subset = None if top == n else [n - top, n - 1]

    def solve(i: int) -> None:
        g = flat[i]
        try:
            wi, Vi = linalg.eigh(g.resolve_neg().numpy(), subset_by_index=subset,
                                 driver="evd" if subset is None else "evr")
            if wi.shape[0] != top:
                raise linalg.LinAlgError(f"{wi.shape[0]} eigenpairs returned, {top} asked")
            w[i], V[i] = torch.from_numpy(wi), torch.from_numpy(Vi)
        except (ValueError, linalg.LinAlgError):
            wi, Vi = torch.linalg.eigh(g)
            w[i], V[i] = wi[n - top:], Vi[:, n - top:]

    with _scipy_threads(flat.shape[0]) as each:
        for _ in each(solve, range(flat.shape[0])):
            pass
    return w.reshape(*G.shape[:-2], top), V.reshape(*G.shape[:-2], n, top)


def eigh_topk(A: Tensor, k: int, out_dtype: torch.dtype | None = None) -> TopK:
    """Top-k from ``eigh(XᵀX)`` in float64 on the short side; the long-side vectors are
    ``X V / s``. Directions with ``s`` below the input's rounding level get a zero
    vector (their singular value is noise, so they carry nothing). ``out_dtype=float64``
    keeps the factors as computed (orthonormal to float64 rounding) instead of rounding
    them to A's dtype; TSV-M's whitening exploits that.

    One matrix at a time: LAPACK and cuSOLVER run large eigenproblems one by one
    anyway (a batched torch.linalg.eigh of 1020×1020 matrices was no faster per matrix on
    an H200), and the float64 copies, Gram matrix and eigenvectors then cost one
    matrix's worth of memory instead of the whole batch's.
    """
    dtype = A.dtype
    X, tall = _short_side(A)
    lead = A.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])
    p, q = X.shape[-2:]
    out_dtype = out_dtype or dtype
    Y = torch.empty(X.shape[0], p, k, dtype=out_dtype, device=A.device)
    Q = torch.empty(X.shape[0], q, k, dtype=out_dtype, device=A.device)
    S = torch.empty(X.shape[0], k, dtype=out_dtype, device=A.device)
    for i in range(X.shape[0]):
        x = X[i:i + 1]
        w, vecs = symmetric_eigh(gram64(x), k)
        w, vecs = w.flip(-1), vecs.flip(-1)
        s = w.clamp(min=0).sqrt()
        long_side(x, vecs, s, out=Y[i:i + 1])
        Q[i], S[i] = vecs[0], s[0]
    U, V = (Y, Q) if tall else (Q, Y)
    return TopK(U.reshape(*lead, p if tall else q, k), S.reshape(*lead, k), V.reshape(*lead, q if tall else p, k))


def cholesky_inverse_factor(G: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(L, L⁻¹, ok)`` with ``G = L Lᵀ`` per SPD matrix of a batch; where Cholesky fails
    (numerically singular), ``ok`` is False and L, L⁻¹ are the identity (finite placeholders).
    L⁻¹ by :func:`lower_triangular_inverse`."""
    L, info = torch.linalg.cholesky_ex(G)
    ok = info == 0
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    L = torch.where(ok[..., None, None], L, eye)
    return L, lower_triangular_inverse(L), ok


# Devices where lower_triangular_inverse joins halves by GEMMs above TRIANGULAR_LEAF columns. A
# batched triangular solve runs far under a GEMM's rate on a GPU (H200, session 13: L⁻¹ of (24,
# 1020, 1020) ~2.6 ms, 10 TFLOP/s; orthonormalize's (80, 1024, 102) solve took as long as a 10×
# larger GEMM); the halves' GEMMs are 2/3 of a c³ product. On a CPU LAPACK's solve is 1.3× faster
# than the GEMMs (Intel Xeon, (24, 1020, 1020)), so it keeps the solve. Bench variant trsm-inverse.
TRIANGULAR_INVERSE_BY_GEMMS = ("cuda",)
TRIANGULAR_LEAF = 128


def lower_triangular_inverse(L: Tensor, by_gemms: bool | None = None) -> Tensor:
    """``L⁻¹`` for a batch of lower-triangular matrices: one batched triangular solve, or (where
    ``by_gemms``, default: on the devices in ``TRIANGULAR_INVERSE_BY_GEMMS``) recursively from
    the inverses of the diagonal halves, ``[[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [−D⁻¹CA⁻¹, D⁻¹]]``,
    the block form of LAPACK's trtri, whose error is of the same order (κ(L)·eps)."""
    n = L.shape[-1]
    if by_gemms is None:
        by_gemms = L.device.type in TRIANGULAR_INVERSE_BY_GEMMS
    if not by_gemms or n <= TRIANGULAR_LEAF:
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False)
    h = n // 2
    out = torch.zeros_like(L)
    out[..., :h, :h] = lower_triangular_inverse(L[..., :h, :h], True)
    out[..., h:, h:] = lower_triangular_inverse(L[..., h:, h:], True)
    out[..., h:, :h] = -(out[..., h:, h:] @ (L[..., h:, :h] @ out[..., :h, :h]))
    return out


def smallest_eigenvalue_estimate(G: Tensor, iters: int = 6, vectors: int = 4, seed: int = 0,
                                 factors: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """λmin of each SPD matrix in a batch, estimated from above by block inverse iteration
    (Rayleigh quotients of G⁻¹ = L⁻ᵀL⁻¹ after ``iters`` steps); 0 where Cholesky fails
    (numerically singular). With L⁻¹ formed once (:func:`cholesky_inverse_factor`, or
    ``factors`` when the caller has them) the iteration is small GEMMs: triangular solves
    with a few right-hand sides are latency-bound on a GPU. Only used to schedule work
    (Newton–Schulz steps, the first Chebyshev filter), never to decide a result."""
    _, Linv, ok = factors if factors is not None else cholesky_inverse_factor(G)
    gen = torch.Generator(device=G.device).manual_seed(seed)
    V = torch.randn(*G.shape[:-1], vectors, generator=gen, device=G.device, dtype=G.dtype)
    for _ in range(iters):
        V = Linv.mT @ (Linv @ V)
        V = V / torch.linalg.vector_norm(V, dim=-2, keepdim=True).clamp(min=torch.finfo(G.dtype).tiny)
    W = Linv @ V
    rho = W.square().sum(-2).amax(-1)  # vᵀG⁻¹v = ‖L⁻¹v‖² ≤ 1/λmin, for unit v
    return torch.where(ok & (rho > 0), 1 / rho, 0.0)


# Devices where CholeskyQR's R⁻¹ comes from ops.batched_cholesky_inverse (one launch: each ℓ×ℓ
# factor and its inverse in one block's shared memory) rather than a batched Cholesky and a
# batched triangular solve, ~0.35 ms of each ~0.45 ms pass on an H200 for (80, 102, 102) (session
# 13). Not yet timed on a GPU (session 16): bench variant cholqr-library is the library route.
FUSED_CHOLESKY_INVERSE = ("cuda",)


def cholesky_upper_inverse(G: Tensor) -> tuple[Tensor, Tensor]:
    """``(R⁻¹, info)`` for ``G = RᵀR`` per SPD matrix of a batch (info as ``cholesky_ex``'s; R⁻¹
    is garbage where info ≠ 0): the fused op where ``FUSED_CHOLESKY_INVERSE`` names the device
    and the matrices fit its shared memory, else a batched Cholesky and triangular solve."""
    order = ops.cholesky_inverse_shared_order(G.device, G.dtype) if G.device.type in FUSED_CHOLESKY_INVERSE else None
    if order is not None and G.shape[-1] <= order:
        return ops.batched_cholesky_inverse(G)
    R, info = torch.linalg.cholesky_ex(G, upper=True)
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    return torch.linalg.solve_triangular(R, eye, upper=True), info


def orthonormalize(Y: Tensor, passes: int = 2) -> Tensor:
    """CholeskyQR2 (two Cholesky passes, GEMM-only); Householder QR where Cholesky breaks down.
    ``passes=1`` stops after the first: a basis of Y's span orthonormal to a few digits, enough
    for a block that is only filtered again (the span is what the next filter needs).

    The first pass forms the ℓ×ℓ Gram matrix in float64 (tolerating cond(Y) up to ~1e8,
    measured with Y's columns scaled to unit norm: Cholesky is invariant to that scaling, so
    columns whose norms differ by a filter's gain cost nothing); after it Q is orthonormal
    to a few digits, so the second pass can stay in Y's dtype.
    Each pass multiplies by the inverse of the small triangular factor (a batched GEMM)
    rather than solving with it: on an H200 a batched triangular solve of (80, 1024, 102)
    took as long as a 10× larger GEMM (bench_stages.py). Breakdown is checked once, after
    both passes (one host sync per call).
    """
    Q, failed = Y, None
    for gram_dtype in (torch.float64, Y.dtype)[:passes]:
        Qg = Q.to(gram_dtype)
        Rinv, info = cholesky_upper_inverse((Qg.mT @ Qg).double())
        failed = info if failed is None else failed | info
        Q = Q @ Rinv.to(Y.dtype)
    if bool((failed != 0).any()):
        return torch.linalg.qr(Y).Q
    return Q


def _squared_norms(X: Tensor) -> Tensor:
    """‖X_i‖_F² per matrix, in float64: each row's norm in X's dtype, their squares summed in
    float64 (one pass, no float64 copy). The residual ``‖X‖² − Σ s_i²`` cancels, so ‖X‖² must
    be exact to far below the residual²: one float32 norm of a whole 3072×768 matrix was 7e-5
    off on a CPU (float32 accumulation), which turned residuals up to ~1e-2 into 0; row by
    row it is ~1e-9 off."""
    return torch.linalg.vector_norm(X, dim=-1).double().square().sum(-1)


RANDOMIZED_OVERSAMPLE: int | None = None  # randomized_topk's default ℓ − k; None: max(10, k // 2)


def randomized_topk(A: Tensor, k: int, oversample: int | None = None, power_iters: int = 2, seed: int = 0) -> TopK:
    """Randomized subspace iteration with Rayleigh–Ritz (Halko, Martinsson, Tropp 2011, alg. 4.4/5.1).

    Work is batched GEMMs plus one ℓ×ℓ float64 eigenproblem per matrix (ℓ = k + oversample,
    default max(10, k // 2)). A fixed oversampling of 10 missed the 2%-of-optimal target on
    flat power-law spectra once k ≫ 10 (s_i ∝ i^-0.2, 768 columns: 2.7% at k = 192, 2.3% at
    k = 153; tests/test_accuracy_adversarial.py); with k/2 the worst seen on power-law and
    truncated (LoRA-like) spectra was 1.8%.
    When ℓ > n/3 (few tasks: k is a large share of the rank) sampling saves little and
    converges slowly, so the exact solver runs instead (its residual is still reported).

    Every matrix is sketched with the same Gaussian test matrix Ω (n×ℓ, from ``seed``), so its
    result does not depend on which batch, or where in it, the matrix comes (``batch="shape"``
    and ``"key"`` agree to rounding; one Ω per batch position made them differ by 57%). The
    method's error bounds are per matrix, over that matrix's Ω: nothing asks for independent
    draws across matrices.
    """
    dtype = A.dtype
    X, tall = _short_side(A)
    n = X.shape[-1]
    if oversample is None:
        oversample = max(10, k // 2) if RANDOMIZED_OVERSAMPLE is None else RANDOMIZED_OVERSAMPLE
    ell = min(k + oversample, n)
    if 3 * ell > n:
        U, S, V, _ = exact_topk(A, k)
        total = _squared_norms(X)
        kept = S.double().square().sum(-1)
        return TopK(U, S, V, ((total - kept).clamp(min=0) / total.clamp(min=1e-300)).sqrt())
    gen = torch.Generator(device=A.device).manual_seed(seed)
    omega = torch.randn(n, ell, generator=gen, device=A.device, dtype=dtype)
    Q = orthonormalize(X @ omega.expand(*X.shape[:-2], n, ell))  # expanded: a batched GEMM, no copy of X
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
    # ‖A − U S Vᵀ‖² = ‖A‖² − Σ s_i², since U S Vᵀ is the projection of A onto span(U). The
    # difference cancels: below a residual of ~3e-4 it is float32 rounding (of QᵀX), not the error.
    total = _squared_norms(X)
    residual = ((total - w.clamp(min=0).sum(-1)).clamp(min=0) / total.clamp(min=1e-300)).sqrt()
    if not tall:
        U, V = V, U
    return TopK(U.to(dtype), s.to(dtype), V.to(dtype), residual)


SUBSPACE_FILTERS = ("chebyshev", "power")
SUBSPACE_FILTER = "chebyshev"  # subspace_topk's default filter (benchmarks/bench_merge.py compares both)
# products with G between two Rayleigh–Ritz steps (Chebyshev filter), at least
CHEBYSHEV_MIN_PRODUCTS = 8
# CholeskyQR passes between two filters of one round (the block before a Rayleigh–Ritz step
# always gets two): 1 leaves a basis orthonormal to a few digits, which the next filter only
# needs to span the same space. H200, ViT-L/14 T = 20 (session 13, one run side by side): 1.04 s
# against 1.06 s with 2, as counted (40 passes of ~0.45 ms fewer); errors equal. CPU: no change.
FILTER_QR_PASSES = 1
# Where the first Chebyshev filter gets the interval it damps. "estimate" (default): λmax of the
# start block's H = QᵀGQ by power iteration and λmin by Cholesky inverse iteration, small GEMMs;
# "rayleigh-ritz": a Rayleigh–Ritz step on the random start block (before session 8; nothing
# converges there). The span filtered is the same, and the steps after it were no slower: on
# CLIP-shaped batches every matrix converged one Rayleigh–Ritz step earlier (3 → 2, 5 → 4 on the
# flattest spectra), and at ViT-L/14 T = 20 the Jacobi kernel's sweeps went from 8 + 6 + 4 to
# 6 + 5 (its CPU twin; bench variant start-rr). The first filter's gain is kept under 1e8 then
# (``_chebyshev_iteration``'s ``start_budget``).
CHEBYSHEV_START = "estimate"
CHEBYSHEV_STARTS = ("rayleigh-ritz", "estimate")
# subspace_topk works on as many matrices at a time as keep its float64 working set (the Gram
# matrix and ~9 ℓ-wide blocks per matrix, 8q(q + 9ℓ) bytes, fitted to device peaks measured on
# an H200; or G and gram64's row chunk while forming it, where that is more: small ℓ) under
# this share of the batch's bytes (or of the merge's largest shape batch: work_base). A merge's
# peak is then about 1 + WORK_SHARE
# shape batches (the stacked deltas are the 1; target ≤ 2). More: fewer, fuller Rayleigh–Ritz
# launches on a GPU (ViT-L/14, T = 20: 2.53 s with a quarter of the batch's bytes in Gram
# matrices, 2.24 s with half).
WORK_SHARE = 0.75
# cap on the block ℓ (None: ℓ = 2k). "auto": on a GPU, the largest float64 ℓ×ℓ problem the
# Jacobi kernel keeps in shared memory (118 on an H100/H200), or k + 10 where that is more
# (beyond 118 the kernel runs from global memory). ViT-L/14 on an H200: T = 14, ℓ = 146: 3.71 s,
# capped at 118: 2.26 s; T = 8, ℓ = 256: 13.7 s, ℓ = k + 10 = 138: 3.0 s.
MAX_BLOCK: int | str | None = "auto"
# ℓ − k (None: max(10, k), capped by MAX_BLOCK; a number is not capped). ViT-L/14, T = 20
# (k = 51), H200: ℓ = 61 took as long as 102 (4–4.5 Rayleigh–Ritz steps per matrix instead of 3,
# 3.5× less ℓ³ Jacobi work), ℓ = 76 4% less but peaked at 2.09× (bench_merge.py variants
# ell-k10, ell-k25). exact_route's choice between eigh and subspace ignores it.
SUBSPACE_OVERSAMPLE: int | None = None


# The Rayleigh–Ritz steps' ℓ×ℓ eigenproblems on a GPU (the Jacobi kernel, ops.batched_eigh).
# Its stopping tolerance: off(H) ≤ tol·‖H‖_F. Ritz pairs are only kept once they pass the
# residual test (1e-10·θ1), to which the Jacobi's leftover adds at most tol·‖H‖_F ≤ tol·√ℓ·θ1
# (1e-11·θ1 at ℓ ≈ 100), so sweeps down to machine precision buy nothing. On ViT-L/14-shaped
# Gram matrices (T = 20, ℓ = 102) the three Rayleigh–Ritz steps took 9 + 7 + 5 sweeps to machine
# precision and 8 + 6 + 4 to 1e-12 (the kernel's CPU twin, which runs the same sweeps).
RAYLEIGH_RITZ_TOL = 1e-12
# CUDA threads per ℓ×ℓ problem (0: the kernel's choice, 512 above ℓ = 80, 256 from 49 to 80;
# up to 1024). Each Rayleigh–Ritz launch holds fewer matrices than an H100/H200 has SMs, one
# block each, so its time is one block's latency: more threads share the updates of A and V of
# each round. H200 (session 11): 512 threads 1.31–1.39× faster than 256 at ℓ = 102 and 118;
# the ViT-L/14 T = 20 merge 1.19 s (512) and 1.20 s (1024) against 1.22 s (256).
JACOBI_THREADS = 0


def _jacobi_eigh(H: Tensor) -> tuple[Tensor, Tensor]:
    """The Rayleigh–Ritz eigensolver on a GPU: the batched Jacobi kernel, one launch per step."""
    return ops.batched_eigh(H, tol=RAYLEIGH_RITZ_TOL, threads=JACOBI_THREADS)


def _block_cap(device: torch.device) -> int | None:
    """The cap on ℓ that ``MAX_BLOCK`` means on this device."""
    return ops.eigh_shared_order(device, torch.float64) if MAX_BLOCK == "auto" else MAX_BLOCK


def subspace_topk(A: Tensor, k: int, out_dtype: torch.dtype | None = None, tol: float = 1e-10,
                  max_iters: int = 60, oversample: int | None = None, seed: int = 0,
                  small_eigh: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
                  filter: str | None = None) -> TopK:
    """Exact-quality top-k by block subspace iteration on the float64 Gram matrices, run to a
    tolerance: batched GEMMs and small ℓ×ℓ eigenproblems instead of one full eigh per matrix.

    A block of ℓ = k + max(10, k) vectors (on a GPU at most ``MAX_BLOCK``'s cap or k + 10,
    whichever is more) is multiplied by G (as many matrices at once as ``WORK_SHARE`` allows) and
    checked by Rayleigh–Ritz (``eigh(QᵀGQ)``, ℓ×ℓ; the batched Jacobi kernel on a GPU). A
    matrix is done when each of its top-k Ritz pairs has residual ``‖G v − θ v‖ ≤ tol·θ1``,
    which bounds its eigenvector error by ``tol·θ1/gap`` (float64 ``eigh`` itself is
    ~1e-16·θ1/gap); done matrices leave the batch, and those that miss ``max_iters`` products
    with G get a full float64 ``eigh``, so the result is exact-quality in every case and the
    ``filter`` only decides the cost. ``"chebyshev"`` (default: ``SUBSPACE_FILTER``) applies Chebyshev polynomials
    of G that damp ``[0, θ_ℓ]`` (:func:`chebyshev_filter`); ``"power"`` applies G itself,
    converging like ``(λ_(ℓ+1)/λ_k)^j``, with Rayleigh–Ritz every 3rd product (the span of
    ``G^j Q0`` does not depend on rotations in between). Cheaper than ``eigh`` only when
    ℓ ≪ n and the matrices are many: the GPU route of ``"exact"``. ``small_eigh`` solves the
    ℓ×ℓ problems (default: the Jacobi kernel on a GPU, LAPACK on a CPU; the cap on ℓ is the
    Jacobi kernel's, so it does not apply to another ``small_eigh``).
    """
    filter = filter or SUBSPACE_FILTER
    if filter not in SUBSPACE_FILTERS:
        raise ValueError(f"filter must be one of {SUBSPACE_FILTERS}, got {filter!r}")
    dtype = A.dtype
    out_dtype = out_dtype or dtype
    if k == 0:  # nothing to iterate on
        m, n = A.shape[-2:]
        return TopK(A.new_zeros(*A.shape[:-2], m, 0, dtype=out_dtype), A.new_zeros(*A.shape[:-2], 0, dtype=out_dtype),
                    A.new_zeros(*A.shape[:-2], n, 0, dtype=out_dtype))
    X, tall = _short_side(A)
    lead = A.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])
    B, p, q = X.shape
    oversample = oversample if oversample is not None else SUBSPACE_OVERSAMPLE
    if oversample is not None and oversample < 0:
        raise ValueError(f"oversample must be ≥ 0, got {oversample}")
    ell = _block_size(k, q, oversample, _block_cap(A.device) if small_eigh is None else None)
    theta = torch.zeros(B, k, dtype=torch.float64, device=A.device)
    vecs = torch.zeros(B, q, k, dtype=torch.float64, device=A.device)
    eigh = small_eigh or (_jacobi_eigh if A.is_cuda else torch.linalg.eigh)
    iterate = _chebyshev_iteration if filter == "chebyshev" else _power_iteration
    chunk = subspace_chunk(B, p, q, ell, X.element_size())
    for start in range(0, B, chunk):
        part = _Batch(gram64(X[start:start + chunk]), theta[start:start + chunk], vecs[start:start + chunk],
                      k, tol, eigh)
        if 3 * ell <= 2 * q:  # otherwise the subspace is most of the space: plain eigh is cheaper
            gen = torch.Generator(device=A.device).manual_seed(seed)
            Q = orthonormalize(part.G @ torch.randn(part.G.shape[0], q, ell, generator=gen, device=A.device,
                                                    dtype=torch.float64))
            iterate(part, Q, max_iters)
        # not converged (or ℓ too large): a full float64 eigh; part.G[j] is matrix part.active[j]
        for j, i in enumerate(part.active.tolist()):
            w, V = torch.linalg.eigh(part.G[j])
            part.theta[i], part.vecs[i] = w.flip(-1)[:k], V.flip(-1)[:, :k]
        del part
    s = theta.clamp(min=0).sqrt()
    Y = long_side(X, vecs, s, out=torch.empty(B, p, k, dtype=out_dtype, device=A.device))
    Qv, S = vecs.to(out_dtype), s.to(out_dtype)
    U, V = (Y, Qv) if tall else (Qv, Y)
    return TopK(U.reshape(*lead, *U.shape[-2:]), S.reshape(*lead, k), V.reshape(*lead, *V.shape[-2:]))


# The bytes WORK_SHARE is a share of (None: the batch's own). A merge sets its largest shape
# batch here, so a small shape (ViT-L/14's 1024² out_proj: 4 MB of deltas per matrix against
# 16 MB of float64 work) is not cut into more, emptier chunks than the peak allows.
_WORK_BASE: ContextVar[int | None] = ContextVar("work_base", default=None)


@contextlib.contextmanager
def work_base(nbytes: int | None) -> Iterator[None]:
    """Within this block, subspace iteration sizes its chunks by ``WORK_SHARE`` of ``nbytes``
    (the merge's largest shape batch) instead of each batch's own bytes."""
    token = _WORK_BASE.set(nbytes)
    try:
        yield
    finally:
        _WORK_BASE.reset(token)


def subspace_chunk(B: int, p: int, q: int, ell: int, element_size: int) -> int:
    """How many of a batch's B matrices (p×q, short side q) subspace iteration takes at a time:
    as many as keep their float64 work within ``WORK_SHARE`` of the batch's bytes, or of the
    merge's largest batch (:func:`work_base`), so the peak stays under 2× a batch. Per matrix:
    G and ~9 ℓ-wide blocks while iterating, G and gram64's work while forming it."""
    work = 8 * q * (q + max(9 * ell, _gram_extra_columns(p, q)))
    base_bytes = max(B * p * q * element_size, _WORK_BASE.get() or 0)
    return max(1, int(base_bytes * WORK_SHARE) // work)


class _Batch:
    """The matrices still iterating, and where converged ones' results go. ``G`` holds the
    active matrices' Gram matrices, ``G[j]`` that of matrix ``active[j]``; converged ones are
    squeezed out in place (:func:`_squeeze`), so the chunk's Gram matrices are never copied."""

    def __init__(self, G: Tensor, theta: Tensor, vecs: Tensor, k: int, tol: float, eigh):
        self.G, self.theta, self.vecs, self.k, self.tol, self.eigh = G, theta, vecs, k, tol, eigh
        self.active = torch.arange(G.shape[0], device=G.device)

    def rayleigh_ritz(self, Q: Tensor, Z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values (descending), vectors V and G V of the block Q (Z = G Q); stores the
        matrices whose top-k pairs pass the residual test and drops them from the batch."""
        H = Q.mT @ Z
        ritz, W = self.eigh((H + H.mT) * 0.5)
        ritz, W = ritz.flip(-1), W.flip(-1)
        V, GV = Q @ W, Z @ W
        k, w = self.k, ritz[:, :self.k]
        residual = torch.linalg.vector_norm(GV[..., :k] - V[..., :k] * w.unsqueeze(-2), dim=-2).amax(-1)
        done = residual <= self.tol * w[:, 0].abs().clamp(min=torch.finfo(torch.float64).tiny)
        if bool(done.any()):
            self.theta[self.active[done]], self.vecs[self.active[done]] = w[done], V[done][..., :k]
            keep = ~done
            self.active, self.G, V, GV, ritz = self.active[keep], _squeeze(self.G, keep), V[keep], GV[keep], ritz[keep]
        return ritz, V, GV


def _squeeze(G: Tensor, keep: Tensor) -> Tensor:
    """``G[keep]`` without a copy of the kept matrices: they move to the front of G's own
    storage (``G[keep]`` would hold both at once: 1.14× the batch's bytes in Gram matrices
    instead of 0.75 at ViT-L/14 T = 20, ℓ = 76). One small copy per moved matrix."""
    kept = keep.nonzero().flatten().tolist()
    for dst, src in enumerate(kept):  # ascending, dst ≤ src: a source is never overwritten first
        if dst != src:
            G[dst].copy_(G[src])
    return G[:len(kept)]


def _power_iteration(batch: _Batch, Q: Tensor, max_products: int, check_every: int = 3) -> Tensor:
    for step in range(1, max_products + 1):
        Z = batch.G @ Q
        if step % check_every == 0 or step == max_products:
            _, _, Z = batch.rayleigh_ritz(Q, Z)  # Z: G times the Ritz vectors, the same span
            if batch.active.numel() == 0:
                break
        Q = orthonormalize(Z)
    return batch.active


def _chebyshev_iteration(batch: _Batch, Q: Tensor, max_products: int, min_products: int | None = None,
                         cond_budget: float = 1e14, start_budget: float = 1e8) -> Tensor:
    """Chebyshev filters (at least ``min_products`` products with G) between Rayleigh–Ritz steps,
    the first from estimated bounds (``CHEBYSHEV_START``): the ℓ×ℓ eigenproblems, one batched
    kernel launch each, cost more on a GPU than the products. The degree keeps
    ``(4θ1/θ_ℓ)^degree`` (the filter's gain from the bottom to the top of the block) under
    ``cond_budget``. That gain is mostly a
    spread of column norms, which CholeskyQR2 does not mind (:func:`orthonormalize`), so the
    budget is far above its 1e8: 1e14 gave no Cholesky breakdown on CLIP-shaped spectra, 1e20
    did (Householder fallbacks). There, 3 Rayleigh–Ritz steps per matrix where a 1e7 budget
    took 5–6 (ViT-B/32 T = 8 and ViT-L/14 T = 20 blocks), and 2 with the estimated start. A filter
    applied to the start block itself (no Ritz vectors to scale) makes its columns truly
    collinear, not just unequal in norm, so that one keeps its gain under ``start_budget``,
    what CholeskyQR2's float64 pass takes: with 1e14 Cholesky broke down there (Householder QR
    on 5 of 6 CLIP-shaped chunks), with 1e8 on none."""
    min_products = CHEBYSHEV_MIN_PRODUCTS if min_products is None else min_products
    if min_products < 1:
        raise ValueError(f"min_products (CHEBYSHEV_MIN_PRODUCTS) must be ≥ 1, got {min_products}")
    if CHEBYSHEV_START not in CHEBYSHEV_STARTS:
        raise ValueError(f"CHEBYSHEV_START must be one of {CHEBYSHEV_STARTS}, got {CHEBYSHEV_START!r}")
    products, estimate = 0, CHEBYSHEV_START == "estimate"
    while True:
        Z = batch.G @ Q
        products += 1
        # the start block: the filter's interval without a Rayleigh–Ritz step, unless G vanishes
        # on some block (zero matrices), which Rayleigh–Ritz finds converged
        bounds = _spectrum_bounds(Q, Z) if estimate else None
        estimate, budget = False, cond_budget
        if bounds is not None and bool((bounds[:, 0] > 0).all()):
            ritz, V, GV, budget = bounds, Q, Z, start_budget
        else:
            ritz, V, GV = batch.rayleigh_ritz(Q, Z)
        del Q, Z  # spanned by V now; blocks are ℓ/q of a Gram matrix each, so few stay alive
        if batch.active.numel() == 0 or products >= max_products:
            return batch.active
        spread = float((ritz[:, 0] / ritz[:, -1].clamp(min=torch.finfo(torch.float64).tiny)).amax())
        degree = max(1, min(16, int(math.log10(budget) / math.log10(4 * max(spread, 1.0)))))
        filters = -(-min_products // degree)
        Y = chebyshev_filter(batch.G, V, GV, ritz, degree)
        del V, GV
        for _ in range(filters - 1):
            Q = orthonormalize(Y, FILTER_QR_PASSES)
            Y = chebyshev_filter(batch.G, Q, batch.G @ Q, ritz, degree)
        products += filters * degree - 1
        Q = orthonormalize(Y)


def _spectrum_bounds(Q: Tensor, Z: Tensor, iters: int = 8) -> Tensor:
    """``(B, 2)``: λmax and λmin of ``H = QᵀZ`` (Z = G Q), estimated from below by power iteration
    and from above by Cholesky inverse iteration (:func:`smallest_eigenvalue_estimate`), in the
    layout :func:`chebyshev_filter` reads (first and last Ritz value). Both err towards a
    narrower interval, so the filter damps the same range or a little more of the block's
    bottom, which the next Rayleigh–Ritz step keeps anyway."""
    H = Q.mT @ Z
    H = (H + H.mT) * 0.5
    v = torch.ones(*H.shape[:-1], 1, dtype=H.dtype, device=H.device)
    for _ in range(iters):
        v = H @ v
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp(min=torch.finfo(H.dtype).tiny)
    top = (v * (H @ v)).sum((-2, -1))
    return torch.stack([top, smallest_eigenvalue_estimate(H).clamp(max=top)], -1)


def chebyshev_filter(G: Tensor, V: Tensor, GV: Tensor, ritz: Tensor, degree: int) -> Tensor:
    """``p(G) V`` for the Chebyshev polynomial of ``degree`` on ``[0, b]``, ``b`` = the smallest
    Ritz value, scaled to 1 at the largest (Zhou & Saad 2007, three-term recurrence; ``GV`` =
    ``G V`` is reused, so it costs ``degree − 1`` products). Directions below b shrink by
    ``T_m((2λ − b)/b)`` relative to λ: for λ = 2b, 17× at degree 2 and 577× at degree 4, where
    powers of G give 4× and 16×. ``ritz``: (B, ℓ) descending.

    The recurrence's scalars ``σ_j = T_(j−1)(x)/T_j(x)``, ``x = (θ1 − c)/e ≥ 1`` (Zhou–Saad's
    ``σ_(j+1) = 1/(2/σ_1 − σ_j)`` in closed form, ``T_j(x) = cosh(j·acosh x)``) are computed
    for all steps at once: four operators a step instead of nine, which counts where launches
    bound the time (small keys on a GPU)."""
    top = ritz[:, :1, None]
    b = torch.maximum(ritz[:, -1:, None], top * 1e-12)  # damp [0, b]
    e = c = b / 2  # half-width and centre of [0, b]
    steps = torch.arange(degree + 1, dtype=top.dtype, device=top.device).reshape(-1, 1, 1, 1)
    cheb = torch.cosh(steps * torch.acosh(((top - c) / e).clamp(min=1)))  # T_0 … T_degree at x
    sigma = cheb[:-1] / cheb[1:]  # σ_1 … σ_degree
    scale, damp = 2 * sigma[1:] / e, cheb[:-2] / cheb[2:]  # 2σ_(j+1)/e and σ_j σ_(j+1), per step
    prev, Y = V, (GV - c * V) * (sigma[0] / e)
    for j in range(degree - 1):  # in place: one new block per step (the blocks are ℓ/q of G each)
        new = (G @ Y).addcmul_(Y, c, value=-1).mul_(scale[j])
        prev, Y = Y, new.addcmul_(prev, damp[j], value=-1)
    return Y


# Which algorithm "exact" runs, per device. All give float64-eigh quality (tests/test_solvers.py);
# the choices are measured (BENCHMARKS.md). "by-size": eigh while the block ℓ is a large share of
# the short side q, Chebyshev subspace iteration once ℓ ≤ q/ROUTE_SHARE[device]. CPU (ℓ = 2k):
# ViT-B/32, eigh 1.13× faster at T = 8, even at T = 12, subspace 1.5–1.65× faster at T = 16–20.
# H200 (ℓ capped, session 11, the two routes side by side): subspace won wherever ℓ ≤ q/4.8 —
# ViT-L/14 T = 6 (ℓ = 180) 2.09 s vs eigh 8.48 s, T = 5 (ℓ = 214) 3.34 vs 7.50 s, ViT-B/32 T = 6
# (ℓ = 138 of 768) 0.88 vs 3.41 s — and eigh (one cuSOLVER syevd per matrix) where ℓ > q/4:
# ViT-L/14 T = 4 (ℓ = 266) 5.78 vs 9.77 s, ViT-B/32 T = 4 (ℓ = 202) 2.65 vs 3.06 s.
EXACT_ROUTE = {"cpu": "by-size", "cuda": "by-size"}
ROUTE_SHARE = {"cpu": 6, "cuda": 4}  # "by-size" takes subspace iteration once ROUTE_SHARE·ℓ ≤ q


def _block_size(k: int, q: int, oversample: int | None = None, cap: int | None = None) -> int:
    """ℓ, the subspace iteration's block: k plus max(10, k) (or ``oversample``), at most q, and
    with a ``cap`` at most max(cap, k + 10). A smaller block converges more slowly per product,
    but on a GPU the ℓ×ℓ Rayleigh–Ritz problems cost more than the products: under the cap they
    stay in shared memory, and above it ℓ³ still counts (ViT-L/14, T = 8 on an H200: ℓ = 2k =
    256 took 13.7 s, ℓ = k + 10 = 138 3.0 s)."""
    ell = k + (oversample if oversample is not None else max(10, k))
    if cap is not None and oversample is None:
        ell = min(ell, max(cap, k + 10))
    return min(q, ell)


def exact_topk(A: Tensor, k: int, out_dtype: torch.dtype | None = None) -> TopK:
    """The default solver: :func:`eigh_topk` or :func:`subspace_topk`, per device (``EXACT_ROUTE``)."""
    route = exact_route(k, min(A.shape[-2:]), A.device)
    return (subspace_topk if route == "subspace" else eigh_topk)(A, k, out_dtype)


def exact_route(k: int, q: int, device: torch.device) -> str:
    """``"eigh"`` or ``"subspace"``: which solver ``"exact"`` runs for top-k of a short side q."""
    route = EXACT_ROUTE.get(device.type, "eigh")
    if route == "by-size":
        share = ROUTE_SHARE.get(device.type, ROUTE_SHARE["cpu"])
        route = "subspace" if share * _block_size(k, q, cap=_block_cap(device)) <= q else "eigh"
    return route


EXACT_SOLVERS = ("exact", "eigh", "subspace")  # float64-eigh quality; can return float64 factors
SOLVERS: dict[str, Solver] = {"exact": exact_topk, "eigh": eigh_topk, "subspace": subspace_topk, "svd": svd_topk,
                              "randomized": randomized_topk}


def get_solver(name: str) -> Solver:
    try:
        return SOLVERS[name]
    except KeyError:
        raise TSVInputError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None

"""Task Singular Vectors, one matrix key at a time (SPEC.md: TSV-C, TSV-M, STI).

Everything here works on the factors of one key; :mod:`tsv_fast.merge`,
:mod:`tsv_fast.compress` and :mod:`tsv_fast.interference` loop over keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .solvers import (EXACT_SOLVERS, cholesky_inverse_factor, get_solver, noise_level, smallest_eigenvalue_estimate,
                      symmetric_eigh, symmetric_gram)
from .tasks import Factors, TaskSource, check_stacked, compute_dtype, stack_deltas


def task_factors(
    sources: Sequence[TaskSource], key: str, base_tensor: Tensor, k: int,
    solver: str = "exact", device: torch.device | None = None, residuals: dict | None = None,
    float64_factors: bool = False,
) -> list[Factors]:
    """The k leading singular triplets of every task's delta for ``key`` (TSV-C, step 1 of TSV-M).

    Dense tasks are stacked and factorised in one batched solver call; compressed tasks
    give their stored factors (already at most their stored rank). An approximate
    solver's relative residual per task goes into ``residuals[key]`` when given.
    ``float64_factors`` asks the exact solver for its float64 factors (not rounded).
    """
    return shape_batch_factors(sources, [key], [base_tensor], k, solver, device, residuals, float64_factors)[0]


def shape_batch_factors(
    sources: Sequence[TaskSource], keys: Sequence[str], base_tensors: Sequence[Tensor], k: int,
    solver: str = "exact", device: torch.device | None = None, residuals: dict | None = None,
    float64_factors: bool = False,
) -> list[list[Factors]]:
    """:func:`task_factors` for several keys of one shape at once: every dense (key, task)
    delta goes into one ``(keys·tasks, m, n)`` batch and one solver call, so a GPU sees a
    few large batched GEMMs instead of many small ones (all layers of a ViT share 4 shapes)."""
    device = device or base_tensors[0].device
    dense = [i for i, s in enumerate(sources) if all(s.factors(key) is None for key in keys)]
    out: list[list[Factors | None]] = [[None] * len(sources) for _ in keys]
    if dense:
        T = len(dense)
        stack = torch.empty(len(keys) * T, *base_tensors[0].shape, dtype=compute_dtype(base_tensors[0]),
                            device=device)
        dense_sources = [sources[i] for i in dense]
        for j, (key, b) in enumerate(zip(keys, base_tensors)):
            stack_deltas(dense_sources, key, b, device, out=stack[j * T:(j + 1) * T], check=False)
        check_stacked(dense_sources, keys, base_tensors, stack)  # one host sync for the batch
        U, S, V, residual = (get_solver(solver)(stack, k, torch.float64)
                             if float64_factors and solver in EXACT_SOLVERS else get_solver(solver)(stack, k))
        del stack
        for j, key in enumerate(keys):
            if residuals is not None and residual is not None:
                residuals[key] = residual[j * T:(j + 1) * T].tolist()
            for t, i in enumerate(dense):
                out[j][i] = (U[j * T + t], S[j * T + t], V[j * T + t])
    dtype = compute_dtype(base_tensors[0])
    for j, key in enumerate(keys):
        for i, s in enumerate(sources):
            if out[j][i] is None:
                f = s.factors(key)
                if f is None:  # dense for this key, but the task is compressed elsewhere
                    out[j][i] = task_factors([s], key, base_tensors[j], k, solver, device)[0]
                    continue
                U, S, V = f
                if S.shape[0] > k:  # the k largest: stored S need not be sorted (older stores' merges)
                    top = torch.topk(S.abs(), k).indices.sort().values
                    U, S, V = U[:, top], S[top], V[:, top]
                out[j][i] = (U.to(device, dtype), S.to(device, dtype), V.to(device, dtype))
    return out


def concat_factors(factors: Sequence[Factors]) -> Factors:
    """TSV-M step 2: ``U = [U1 … UT]``, ``S = [S1 … ST]``, ``V = [V1 … VT]``."""
    U, S, V = zip(*factors)
    return torch.cat(U, dim=1), torch.cat(S), torch.cat(V, dim=1)


def polar_factor(X: Tensor) -> Tensor:
    """Nearest matrix with orthonormal columns (orthogonal Procrustes): ``X = P D Qᵀ → P Qᵀ``.

    The textbook SVD route, in float64; kept as the definition that
    :func:`whitening` is checked against.
    """
    P, _, Qh = torch.linalg.svd(X.double(), full_matrices=False)
    return (P @ Qh).to(X.dtype)


def block_gram(X: Tensor, sizes: Sequence[int]) -> Tensor:
    """``XᵀX`` in float64 for ``X = [X1 … XT]`` whose blocks are each orthonormal: the diagonal
    blocks are the identity by construction, so only the cross-task blocks are computed
    (the upper ones, one GEMM per block row: under half the work of a full Gram matrix).

    Only for factors that are orthonormal to float64 rounding (the exact solver's float64
    output): blocks rounded to float32 are orthonormal to ~1e-7 only, and the Gram's error
    is amplified by 1/σmin(X)² in its inverse square root.
    """
    X64 = X.double()
    c = X.shape[-1]
    G = torch.eye(c, dtype=torch.float64, device=X.device).expand(*X.shape[:-2], c, c).clone()
    start = 0
    for size in sizes[:-1]:
        end = start + size
        cross = X64[..., :, start:end].mT @ X64[..., :, end:]
        G[..., start:end, end:] = cross
        G[..., end:, start:end] = cross.mT
        start = end
    return G


def whitening(X: Tensor, sizes: Sequence[int] | None = None) -> Tensor:
    """``W = (XᵀX)^(-1/2)`` in float64 (c×c), so that ``X W`` is the polar factor of X.

    Costs a c×c Gram matrix and one float64 ``eigh`` instead of an SVD of the tall X.
    float64 matters: X is often ill-conditioned (SPEC.md) and its Gram matrix squares
    the condition number. Directions whose singular value is below ``WHITENING_RCOND``
    (1e-7) relative to the largest are numerically duplicated tasks: there X W is set to zero
    (pseudo-inverse) instead of an arbitrary orthonormal completion, so duplicated tasks
    merge to their common part and the result is always finite. ``sizes`` (the column
    count of each orthonormal block) selects :func:`block_gram`. Batched over leading dims.
    """
    G = block_gram(X, sizes) if sizes is not None else X.double().mT @ X.double()
    return _eigh_inverse_sqrt(G, WHITENING_RCOND)


def _eigh_inverse_sqrt(G: Tensor, rcond: float) -> Tensor:
    w, Q = symmetric_eigh(G)
    keep = w > (rcond ** 2) * w[..., -1:].clamp(min=torch.finfo(torch.float64).tiny)
    inv_sqrt = torch.where(keep, w.clamp(min=torch.finfo(torch.float64).tiny).rsqrt(), 0.0)
    return (Q * inv_sqrt.unsqueeze(-2)) @ Q.mT


def scaled_newton_schulz_schedule(lower: Sequence[float], rcond: float, tol: float) -> tuple[list, list, int]:
    """Per-step, per-matrix coefficients ``(a, b)`` of ``x ← a x + b x³`` for singular values
    known to lie in ``[lower, 1]``: Chen & Chow's scaling ``x ← f(α x)``, ``f`` the Newton–Schulz
    cubic and ``α = √(3/(1 + ℓ + ℓ²))``, which maps ``[ℓ, 1]`` into ``[f(αℓ), 1]``, so the
    smallest value grows up to 2.6× per step instead of 1.5×. ``ℓ`` is tracked; near 1,
    ``α → 1`` (plain Newton–Schulz). Since every step has ``a x + b x³ ≤ a x``, a matrix stops
    (``a, b = 1, 0``) before its product of ``a`` exceeds ``1/rcond``: whatever converges then
    had every σ ≥ rcond·bound. Returns the coefficients per step and the step after which
    all matrices that can converge are predicted to have (the first convergence check)."""
    steps = int(math.log(1 / rcond) / math.log(1.5)) + 1
    a_cols, b_cols, predicted = [], [], 0
    for ell in lower:
        left, done, a_col, b_col = math.log(1 / rcond), None, [], []
        for j in range(steps):
            alpha = math.sqrt(3 / (1 + ell + ell * ell))
            a, b = 1.5 * alpha, -0.5 * alpha ** 3
            if math.log(a) > left:
                a, b = 1.0, 0.0
            else:
                left -= math.log(a)
                ell = min(1.0, a * ell + b * ell ** 3)
                if done is None and 1 - ell * ell <= tol / 2:
                    done = j + 1
            a_col.append(a), b_col.append(b)
        a_cols.append(a_col), b_cols.append(b_col)
        predicted = max(predicted, done or 0)
    transpose = lambda cols: [list(row) for row in zip(*cols)] if cols else [[] for _ in range(steps)]  # noqa: E731
    return transpose(a_cols), transpose(b_cols), predicted


NEWTON_START = True  # a scaled Newton step before the cubic ones (newton_start); False: session 11's iteration


def newton_start(L: Tensor, Linv: Tensor, factored: Tensor, rcond: float) -> tuple[Tensor, Tensor, Tensor]:
    """One scaled Newton polar step on ``Lᵀ`` from the inverse already formed: ``X₁ = (ζ Lᵀ +
    L⁻¹/ζ)/2M``, since ``(Lᵀ)⁻ᵀ = L⁻¹``. It keeps the polar factor and maps each singular value
    σ to ``(ζσ + 1/(ζσ))/2M``, which is ≥ 1/M and, for σ in ``[s, 1]``, ≤ 1: the condition
    number falls from κ to about √κ/2 for an elementwise sum, where the cubic steps take about
    log(√κ)/log(2.6) of their GEMM pairs to do the same (ViT-L/14, T = 20: 14 → 8 steps).
    ``s = 1/‖L⁻¹‖_F ≤ σmin(Lᵀ)`` is a proven bound, so the interval ``[1/M, 1]`` is too (up to
    rounding, covered by a 1e-6 margin), and ``ζ = 1/√s`` minimises M. Only where Cholesky
    succeeded and ``s ≥ 2·rcond``: then every σ ≥ rcond (σmax ≤ 1 after scaling), so the exact
    path keeps every direction too; the Newton step would lift a duplicated direction's tiny σ
    like any other. Returns ``(X₁, 1/M, usable)``, per matrix."""
    s = 1 / torch.linalg.matrix_norm(Linv).clamp(min=torch.finfo(Linv.dtype).tiny)
    zeta = s.rsqrt()
    M = (zeta * s + 1 / (zeta * s)) / 2 * (1 + 1e-6)
    X1 = (zeta[..., None, None] * L.mT + Linv / zeta[..., None, None]) / (2 * M[..., None, None])
    return X1, 1 / M, factored & (s >= 2 * rcond)


def newton_schulz_whitening(G: Tensor, rcond: float, bound_sq: Tensor | float,
                            tol: float = 1e-10, check: float = 1e-8, info: dict | None = None) -> tuple[Tensor, Tensor]:
    """``W ≈ G^(-1/2)`` for Gram matrices ``G = XᵀX`` (batched) by the Newton–Schulz polar
    iteration ``A ← A (aI + b AᵀA)`` on the c×c Cholesky factor ``A = Lᵀ`` of ``G/bound²``:
    GEMMs only, c×c (and batched over keys). ``X = (X L⁻ᵀ) Lᵀ`` with ``X L⁻ᵀ`` orthonormal,
    so the polar factor of X is ``X L⁻ᵀ polar(Lᵀ)`` and ``W = L⁻ᵀ polar(Lᵀ)/bound``. Lᵀ has
    X's singular values: the iteration is the polar iteration of X itself at c×c cost, under
    two GEMMs a step (``AᵀA`` from its upper blocks, 5/8 of a GEMM at c ≥ 512: :func:`symmetric_gram`;
    ``A·T``, T formed in ``AᵀA``'s memory; the first ``AᵀA`` is ``G/bound²``), where the coupled
    Gram-side form (``Y ← YT, Z ← TZ``, ``T`` from ``ZY``) takes three. L and L⁻¹ serve the
    Newton start and the λmin estimate. Returns ``(W, ok)``; ``ok`` (per matrix) says
    Cholesky succeeded, the iteration converged (``‖AᵀA − I‖_max ≤ tol``), ``X W`` is
    orthonormal (``‖WGW − I‖_max ≤ check``) and ``WG`` (its ``(XW)ᵀX``) is symmetric; only
    those may be used.

    Plain Newton–Schulz (``a, b = 3/2, −1/2``) grows a small x only 1.5× per step: 27–31
    steps for the square concatenations of CLIP keys (σmin/σmax ≈ 1e-4), which is why the
    steps are scaled (:func:`scaled_newton_schulz_schedule`) from a lower bound on x: half
    of √λmin's estimate (:func:`smallest_eigenvalue_estimate`), at least ``rcond``. If the
    estimate was too high, the lagging values still grow ≥ 1.5× per step and the iteration
    runs on until the check passes or the step budget ends. Where Cholesky's ``L⁻¹`` proves
    ``σmin ≥ 2·rcond·bound``, one scaled Newton step first takes κ to about √κ/2 for the cost
    of one more ``XᵀX`` (:func:`newton_start`), and the cubic steps start from its proven lower
    bound; when every matrix of the batch takes it, the λmin estimate is skipped (its ~13 small
    launches per call). Otherwise the budget (product of the
    ``a``'s ≤ ``1/rcond``) proves that a converged matrix has every ``σ(X) ≥ rcond·bound``,
    so the exact path (which zeroes directions below ``rcond`` relative to the largest)
    would keep them all too and both define the same result (conservative: it also declines
    some X the exact path would whiten, which costs time, never accuracy). ``bound_sq ≥
    λmax(G)`` (T for T orthonormal blocks; ``trace(G)`` always works), inflated by 1e-6
    here: a scaled step maps x slightly above 1 to a negative value, which the checks would
    not see, so a bound that is only σmax to rounding must not reach it. G resolves σ only
    down to ~1e-8·bound in float64, so ``rcond`` is floored at 1e-7 (the default
    cut, ``WHITENING_RCOND``). ``info`` (when given) receives the number of
    ``steps`` run and how many matrices took the ``newton`` start.
    """
    rcond = max(rcond, 1e-7)
    bound_sq = torch.as_tensor(bound_sq, dtype=G.dtype, device=G.device).expand(G.shape[:-2])
    scale = (bound_sq * (1 + 1e-6)).clamp(min=torch.finfo(G.dtype).tiny)[..., None, None]
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    Y = G / scale
    factors = cholesky_inverse_factor(Y)
    L, Linv, factored = factors
    X1, newton_lower, newton = newton_start(L, Linv, factored, rcond)
    newton &= NEWTON_START

    def on_host(lower: Tensor) -> list[list[float]]:  # [lower bounds, Newton start taken], one host sync
        return torch.stack([lower, newton.to(lower.dtype)]).reshape(2, -1).tolist()

    bounds = on_host(newton_lower)
    if not all(bounds[1]):  # some matrix cannot take the Newton start: the λmin estimate schedules those
        lower = (smallest_eigenvalue_estimate(Y, factors=factors).clamp(min=0).sqrt() / 2).clamp(min=rcond, max=1.0)
        newton &= newton_lower > lower  # where it starts closer to convergence than the estimate
        bounds = on_host(torch.where(newton, newton_lower, lower))
    a_rows, b_rows, first_check = scaled_newton_schulz_schedule(bounds[0], rcond, tol)
    shape = (len(a_rows), *G.shape[:-2], 1, 1)
    A = torch.tensor(a_rows, dtype=G.dtype).reshape(shape).to(G.device)
    Bc = torch.tensor(b_rows, dtype=G.dtype).reshape(shape).to(G.device)
    last = len(a_rows)
    # the iterate and its Gram matrix (Lᵀ's is Y itself; I where Cholesky failed, so W stays finite)
    X, E = L.mT, torch.where(factored[..., None, None], Y, eye)
    if all(bounds[1]):  # the usual case: no selection
        X = X1
        E = symmetric_gram(X)
    elif any(bounds[1]):
        X = torch.where(newton[..., None, None], X1, X)
        E = torch.where(newton[..., None, None], symmetric_gram(X), E)
    for step in range(last + 1):
        if step:
            E = symmetric_gram(X)  # XᵀX from upper blocks: 5/8 of a GEMM at c ≥ 512
        E.diagonal(dim1=-2, dim2=-1).sub_(1)  # E = XᵀX − I, in place
        if step >= first_check or step == last:
            ok = torch.linalg.vector_norm(E, float("inf"), dim=(-2, -1)) <= tol
            # done when every matrix converged, has spent its budget (its steps are now I), or has no factor
            if step == last or bool((ok | (Bc[step, ..., 0, 0] == 0) | ~factored).all()):
                break
        # X (aI + b XᵀX) = X ((a + b) I + b E), the factor formed in E's memory (no c×c temporaries)
        E.mul_(Bc[step]).diagonal(dim1=-2, dim2=-1).add_((A[step] + Bc[step])[..., 0])
        X = X @ E
    if info is not None:
        info["steps"], info["newton"] = step, int(sum(bounds[1]))
    W = (Linv.mT @ X) / scale.sqrt()
    WG = W @ G
    ok &= factored & ((WG @ W - eye).abs().amax((-2, -1)) <= check)
    ok &= (WG - WG.mT).abs().amax((-2, -1)) <= check * scale[..., 0, 0].sqrt()
    return W, ok & (bound_sq > 0)


def newton_schulz_polar(X: Tensor, rcond: float, bound: float | None = None, tol: float = 1e-10) -> Tensor | None:
    """Polar factor of one matrix X by :func:`newton_schulz_whitening`, or ``None`` where its
    check fails (then the exact path must run). ``bound ≥ σmax(X)`` (default ‖X‖_F)."""
    X = X.double()
    G = X.mT @ X
    W, ok = newton_schulz_whitening(G, rcond, bound ** 2 if bound is not None else torch.trace(G), tol)
    return X @ W if bool(ok) else None


POLAR_METHODS = ("auto", "eigh", "newton-schulz")
# The whitening's pseudo-inverse cut, relative to the largest singular value of the
# concatenation: directions below it count as duplicated tasks and are zeroed; the rest are
# whitened, as the SVD definition does. 1e-7 is about the smallest σ/σmax a float64 Gram
# matrix resolves (its rounding noise measured ≈ 2e-8 at c ≈ 1000 columns), whatever the
# inputs' dtype. The cut used to be 8·eps of the inputs: 9.5e-7 for float32, which square
# concatenations (T·k = n, e.g. ViT-B/32 at T = 8) fall below in ~1 of 500, and the key's Δ then
# lost a rank-one part, 5e-2 of it; 1.8e-15 for float64, which whitened Gram noise
# (BENCHMARKS.md, session 7).
WHITENING_RCOND = 1e-7


def resolve_polar(method: str, device: torch.device) -> str:
    """``"auto"``: Newton–Schulz (checked, batched GEMMs) on a GPU, where cuSOLVER's eigh of a
    c×c matrix is a ~10 ms serial call per key side; LAPACK eigh on a CPU (BENCHMARKS.md)."""
    if method not in POLAR_METHODS:
        raise ValueError(f"unknown polar method {method!r}; choose one of {POLAR_METHODS}")
    if method == "auto":
        return "newton-schulz" if device.type == "cuda" else "eigh"
    return method


def sigma_max_sq_bound(G: Tensor, sizes: Sequence[int] | None = None, orthonormal: bool = True) -> Tensor | float:
    """An upper bound on λmax(G) = σmax(X)² for ``G = XᵀX`` (batched), as tight as what is known
    of X's task blocks (column counts ``sizes``): T for T orthonormal blocks;
    ``Σ_t (1 + ‖G_tt − I‖_F)`` for blocks orthonormal only to rounding (σmax(X)² ≤ Σ_t σmax(X_t)²
    by Cauchy–Schwarz, and λmax(G_tt) ≤ 1 + ‖G_tt − I‖₂); ``trace(G)`` without ``sizes``."""
    if sizes is None:
        return torch.diagonal(G, dim1=-2, dim2=-1).sum(-1)
    if orthonormal:
        return float(len(sizes))
    bound, start = 0.0, 0
    for size in sizes:
        eye = torch.eye(size, dtype=G.dtype, device=G.device)
        bound = bound + 1 + torch.linalg.matrix_norm(G[..., start:start + size, start:start + size] - eye)
        start += size
    return bound


def polar_from_blocks(X: Tensor, sizes: Sequence[int] | None, method: str = "auto",
                      counts: dict | None = None, orthonormal: bool = True) -> Tensor:
    """Polar factor of the concatenation ``X`` (float64 result), by ``method``.

    ``"eigh"`` is the exact float64 path (:func:`whitening`). ``"newton-schulz"`` is tried
    first and kept only where its check passes, the exact path running for the rest;
    ``counts`` (when given) tallies ``newton_schulz`` / ``fallback`` so callers can report
    it. ``"auto"`` picks one per device (:func:`resolve_polar`). Directions below
    ``WHITENING_RCOND`` are zeroed (:func:`whitening`). ``X`` may carry leading
    batch dimensions (several keys of one shape): Gram matrices, iterations and eigensolver
    calls are then batched, and each matrix is checked on its own. ``sizes``: the column
    counts of X's task blocks, ``orthonormal`` (default) when each is orthonormal to float64
    rounding (then the Gram matrix skips the identity diagonal blocks: :func:`block_gram`).
    Blocks orthonormal only to float32 rounding still tighten Newton–Schulz's bound on σmax²
    to ``Σ_t (1 + ‖X_tᵀX_t − I‖_F)`` ≈ T instead of ``trace(XᵀX)`` = T·k
    (:func:`sigma_max_sq_bound`), which starts the iteration √k times closer to convergence.
    """
    method = resolve_polar(method, X.device)
    rcond = WHITENING_RCOND
    if X.dim() == 2:  # one matrix: a batch of one
        return polar_from_blocks(X[None], sizes, method, counts, orthonormal)[0]
    X64 = X.double()
    G = block_gram(X64, sizes) if sizes is not None and orthonormal else X64.mT @ X64
    if method == "eigh":
        return X64 @ _eigh_inverse_sqrt(G, rcond)
    W, ok = newton_schulz_whitening(G, rcond, sigma_max_sq_bound(G, sizes, orthonormal))
    if counts is not None:
        n_ok = int(ok.sum())
        counts["newton_schulz"] = counts.get("newton_schulz", 0) + n_ok
        counts["fallback"] = counts.get("fallback", 0) + ok.numel() - n_ok
    if not bool(ok.all()):
        W[~ok] = _eigh_inverse_sqrt(G[~ok], rcond)
    return X64 @ W


def tsv_merge_factors(factors: Sequence[Factors], *, orthonormal: bool = False, polar: str = "auto",
                      counts: dict | None = None, dtype: torch.dtype | None = None) -> Factors:
    """TSV-M steps 2–3: concatenate and whiten both sides; ``Δ = U⊥ diag(S) V⊥ᵀ``.

    ``U⊥`` is formed in float64 and only then rounded: being orthonormal it survives
    rounding, whereas ``U`` times an ill-conditioned ``W_U`` would not. ``orthonormal``
    says each task's factors are orthonormal to float64 rounding (the exact solver's
    float64 output), so the Gram matrices skip their identity diagonal blocks. The
    result has ``dtype`` (default: that of the first task's S). One key of
    :func:`tsv_merge_batch`.
    """
    U, S, V = tsv_merge_batch([factors], orthonormal=orthonormal, polar=polar, counts=counts, dtype=dtype)
    return U[0], S[0], V[0]


def tsv_merge_batch(batch: Sequence[Sequence[Factors]], *, orthonormal: bool = False, polar: str = "auto",
                    counts: dict | None = None, dtype: torch.dtype | None = None) -> Factors:
    """:func:`tsv_merge_factors` for several keys of one shape at once: ``U⊥ (K, m, c)``,
    ``S (K, c)``, ``V⊥ (K, n, c)``. The K polar factors of each side are one batched Gram
    and one batched eigensolver call instead of K of each. Keys must have equal per-task
    ranks (true for one shape batch of dense tasks; the caller checks)."""
    first = batch[0]
    dtype = dtype or first[0][1].dtype
    K, device = len(batch), first[0][0].device
    m, n, c = first[0][0].shape[0], first[0][2].shape[0], sum(f[1].shape[0] for f in first)
    U = torch.empty(K, m, c, dtype=first[0][0].dtype, device=device)
    V = torch.empty(K, n, c, dtype=first[0][2].dtype, device=device)
    S = torch.empty(K, c, dtype=dtype, device=device)
    for j, factors in enumerate(batch):
        Us, Ss, Vs = zip(*factors)
        torch.cat(Us, dim=1, out=U[j]), torch.cat(Vs, dim=1, out=V[j])
        S[j] = torch.cat(Ss)
    sizes = [f[1].shape[0] for f in first]
    drop_null_directions(U, S, V, sizes, dtype)
    U_perp = polar_from_blocks(U, sizes, polar, counts, orthonormal).to(dtype)
    del U
    V_perp = polar_from_blocks(V, sizes, polar, counts, orthonormal).to(dtype)
    return U_perp, S, V_perp


# Devices where asking whether anything is dropped (a host sync) costs less than masking
# anyway: the CPU. On a GPU the masks run unconditionally (no sync).
HOST_CHECKED_DEVICES = {"cpu"}


def drop_null_directions(U: Tensor, S: Tensor, V: Tensor, sizes: Sequence[int], dtype: torch.dtype) -> None:
    """Zero, in place, the triplets of concatenated factors ``U (K, m, c)``, ``S (K, c)``,
    ``V (K, n, c)`` whose singular value is zero to the precision of the inputs (``dtype``:
    :func:`solvers.noise_level`) and of a float64 Gram matrix (``WHITENING_RCOND``), relative
    to the largest of their task (blocks of ``sizes`` columns).

    Why: a task of rank below k (a LoRA fine-tune, a key the fine-tune left unchanged) has
    singular vectors for s = 0 that are any basis of a null space. Kept, they would rotate
    the other tasks' vectors in the whitening, so Δ would depend on the solver. Zeroed, they
    are zero columns, which the whitening maps to zero columns whatever the Gram route (a
    decoupled unit diagonal in :func:`block_gram`, a zero eigenvalue below the cut
    otherwise), like the zero padding of the authors' code."""
    K, c = S.shape
    if c == 0:
        return
    rel = max(WHITENING_RCOND, noise_level(dtype, (U.shape[-2], V.shape[-2])))
    size = abs(S)  # stored factors may carry a sign in S (a runtime merge with α < 0)
    if len(set(sizes)) == 1:  # equal ranks: one reduction for all tasks
        T, k = len(sizes), sizes[0]
        top = size.view(K, T, k).amax(-1, keepdim=True).expand(K, T, k).reshape(K, c)
    else:  # blocks of rank 0 have no largest value (and no columns)
        top = torch.cat([b.amax(-1, keepdim=True).expand_as(b) if b.shape[-1] else b
                         for b in size.split(list(sizes), dim=1)], dim=1)
    keep = size > rel * top
    if S.device.type in HOST_CHECKED_DEVICES and bool(keep.all()):  # the usual case: nothing dropped
        return
    keep = keep.to(S.dtype)
    S.mul_(keep)
    U.mul_(keep.to(U.dtype).unsqueeze(-2))
    V.mul_(keep.to(V.dtype).unsqueeze(-2))


def singular_task_interference(factors: Sequence[Factors], dtype: torch.dtype | None = None) -> tuple[float, Tensor]:
    """STI of a key: ``‖(UᵀU − I) diag(S) (VᵀV − I)‖₁`` over all tasks, and per task pair.

    The pair value (i, j) is the same quantity for the concatenation of tasks i and j
    only; it reuses the cross-task blocks of the Gram matrices. The diagonal is 0.
    Triplets with s = 0 to the inputs' precision (``dtype``, default S's) are dropped first,
    as in TSV-M (:func:`drop_null_directions`): a task that left the key unchanged, or one
    of rank below k, adds no interference, whatever basis the solver gave its null space.
    """
    U, S, V = concat_factors(factors)  # new tensors: the in-place drop leaves the factors alone
    drop_null_directions(U[None], S[None], V[None], [f[1].shape[0] for f in factors], dtype or S.dtype)
    eye = torch.eye(U.shape[1], dtype=U.dtype, device=U.device)
    M = U.T @ U - eye
    N = V.T @ V - eye
    total = (M * S) @ N
    T = len(factors)
    pairs = torch.zeros(T, T, dtype=torch.float64)
    offsets = [0]
    for f in factors:
        offsets.append(offsets[-1] + f[1].shape[0])
    blocks = [torch.arange(offsets[t], offsets[t + 1], device=U.device) for t in range(T)]
    for i in range(T):
        for j in range(i + 1, T):
            idx = torch.cat([blocks[i], blocks[j]])
            value = ((M[idx][:, idx] * S[idx]) @ N[idx][:, idx]).abs().sum().item()
            pairs[i, j] = pairs[j, i] = value
    return total.abs().sum().item(), pairs

"""Shape batching across layers, the block Gram whitening and the checked Newton–Schulz polar
factor, each against an independent float64 reference (tests/reference.py) or the plain path."""

import math

import numpy as np
import pytest
import torch

import reference as ref
import tsv_fast
from tsv_fast import solvers
from tsv_fast.keys import is_matrix_key
from tsv_fast.merge import ELEMENTWISE_SETS, _plan, plan_shape_batches, stacked_bytes
from tsv_fast.methods import get_method
from tsv_fast.solvers import exact_topk
from tsv_fast.synthetic import (clip_vit_base, correlated_tasks, power_law_matrix, synthetic_finetuned,
                                 synthetic_task_vectors)
from tsv_fast.tsv import (block_gram, newton_schulz_polar, newton_schulz_whitening, polar_factor, polar_from_blocks,
                          resolve_polar, scaled_newton_schulz_schedule, shape_batch_factors, sigma_max_sq_bound,
                          smallest_eigenvalue_estimate, whitening)


def orthonormal_blocks(n, sizes, gen, overlap=0.0, dtype=torch.float64):
    """Blocks with orthonormal columns each; ``overlap`` mixes in a shared random subspace, so
    the concatenation is ill-conditioned (as tasks that share directions make it)."""
    shared = torch.linalg.qr(torch.randn(n, max(sizes), generator=gen, dtype=torch.float64)).Q
    blocks = []
    for k in sizes:
        own = torch.randn(n, k, generator=gen, dtype=torch.float64)
        blocks.append(torch.linalg.qr((1 - overlap) * own + overlap * shared[:, :k] * n ** 0.5).Q)
    return torch.cat(blocks, 1).to(dtype)


@pytest.mark.parametrize("sizes", [[5, 5], [8, 3, 6], [4] * 12])
def test_block_gram_equals_the_full_gram_of_orthonormal_blocks(sizes):
    X = orthonormal_blocks(120, sizes, torch.Generator().manual_seed(len(sizes)), overlap=0.5)
    torch.testing.assert_close(block_gram(X, sizes), X.mT @ X, atol=1e-13, rtol=0)


def test_batched_block_gram_and_whitening_equal_their_per_matrix_results():
    gen = torch.Generator().manual_seed(11)
    sizes = [7, 7, 7]
    X = torch.stack([orthonormal_blocks(90, sizes, gen, overlap) for overlap in (0.0, 0.9, 0.99)])
    G, W = block_gram(X, sizes), whitening(X, sizes)
    for i in range(3):
        torch.testing.assert_close(G[i], X[i].mT @ X[i], atol=1e-13, rtol=0)
        np.testing.assert_allclose((X[i] @ W[i]).numpy(), ref.whiten(X[i].numpy()), atol=1e-7)


@pytest.mark.parametrize("overlap", [0.0, 0.9, 0.999])
def test_block_whitening_gives_the_polar_factor(overlap):
    sizes = [10] * 6
    X = orthonormal_blocks(200, sizes, torch.Generator().manual_seed(3), overlap)
    P = X @ whitening(X, sizes)
    np.testing.assert_allclose(P.numpy(), ref.whiten(X.numpy()), atol=1e-7)
    torch.testing.assert_close(P, polar_factor(X), atol=1e-7, rtol=0)


def two_blocks_at_angle(n, k, angle, gen):
    """Two orthonormal n×k blocks whose first columns meet at ``angle``, the rest orthogonal:
    the concatenation's smallest singular value is √(1 − cos angle) ≈ angle/√2, σmax ≈ √2."""
    Q = torch.linalg.qr(torch.randn(n, 2 * k, generator=gen, dtype=torch.float64)).Q
    first = math.cos(angle) * Q[:, :1] + math.sin(angle) * Q[:, k:k + 1]
    return torch.cat([Q[:, :k], first, Q[:, k + 1:]], 1)


@pytest.mark.parametrize("method", ["eigh", "newton-schulz"])
def test_whitening_keeps_directions_float64_resolves_and_zeroes_those_under_the_cut(monkeypatch, method):
    """σmin/σmax = 3e-7: kept, as the SVD definition does (the default cut is 1e-7, what a
    float64 Gram matrix resolves; it was 8·eps of float32 = 9.5e-7, which dropped it); under
    a cut set above it exactly that rank-one part of the polar factor is zeroed. Newton–Schulz
    declines a concatenation this ill-conditioned (its step budget), so both routes end in
    the exact path here: what is tested is that the two agree."""
    import tsv_fast.tsv as tsv_module

    X = two_blocks_at_angle(60, 5, 6e-7, torch.Generator().manual_seed(2))
    P, s, Qh = np.linalg.svd(X.numpy(), full_matrices=False)
    assert 2e-7 < s[-1] / s[0] < 4e-7
    svd_polar, part = P @ Qh, np.outer(P[:, -1], Qh[-1])
    assert np.abs(part).max() > 0.1  # what a cut drops is not small
    kept = polar_from_blocks(X, [5, 5], method).numpy()
    # the Gram matrix holds σmin² = 1.8e-13 to float64 rounding: that direction's weight to ~1e-4
    np.testing.assert_allclose(kept, svd_polar, atol=1e-3)
    monkeypatch.setattr(tsv_module, "WHITENING_RCOND", 8 * torch.finfo(torch.float32).eps)
    cut = polar_from_blocks(X, [5, 5], method).numpy()
    np.testing.assert_allclose(cut, svd_polar - part, atol=1e-6)


@pytest.mark.parametrize("ratio", [1e-4, 1e-6, 1.5e-7])
@pytest.mark.parametrize("blocks", [True, False])
def test_whitening_above_the_cut_is_the_svd_polar_factor_to_the_gram_matrix_rounding(ratio, blocks):
    """README: above the cut the whitening is the SVD polar factor up to the float64 Gram matrix's
    rounding, which squares κ = σmax/σmin: within 4·u·κ² (u = 2⁻⁵³; measured up to 2.8·u·κ²),
    3e-8 at σmin/σmax = 1e-4 but a few percent just above the cut, not "equal"."""
    X = two_blocks_at_angle(200, 50, ratio * math.sqrt(2), torch.Generator().manual_seed(1))
    P, s, Qh = torch.linalg.svd(X, full_matrices=False)
    kappa = float(s[0] / s[-1])
    assert 0.5 / ratio < kappa < 2 / ratio
    err = torch.linalg.matrix_norm(polar_from_blocks(X, [50, 50] if blocks else None, "eigh") - P @ Qh, 2)
    assert err <= 4 * 2.0 ** -53 * kappa ** 2


@pytest.mark.parametrize("method", ["eigh", "newton-schulz"])
def test_directions_under_the_gram_resolution_are_zeroed_not_whitened_from_noise(method):
    """σmin/σmax = 1e-9 (float64 factors): a float64 Gram matrix holds σmin² = 1e-18 only as
    rounding noise, so whitening it would give neither the SVD polar factor nor the cut one
    (5e-2 and 3e-2 off with the cut at 8·eps of float64); the 1e-7 cut gives the
    pseudo-inverse result exactly."""
    X = two_blocks_at_angle(60, 5, 2e-9, torch.Generator().manual_seed(3))
    P, s, Qh = np.linalg.svd(X.numpy(), full_matrices=False)
    assert 5e-10 < s[-1] / s[0] < 2e-9
    np.testing.assert_allclose(polar_from_blocks(X, [5, 5], method).numpy(),
                               P @ Qh - np.outer(P[:, -1], Qh[-1]), atol=1e-6)


def test_exact_solver_float64_factors_are_orthonormal_to_float64_rounding():
    A = torch.stack([power_law_matrix(300, 80, torch.Generator().manual_seed(s), 0.5) for s in range(3)])
    U, S, V, _ = exact_topk(A, 20, torch.float64)
    assert U.dtype == V.dtype == S.dtype == torch.float64
    eye = torch.eye(20, dtype=torch.float64)
    assert (U.mT @ U - eye).abs().max() < 1e-12 and (V.mT @ V - eye).abs().max() < 1e-12
    U32, S32, V32, _ = exact_topk(A, 20)  # the default rounds to the input dtype
    assert U32.dtype == torch.float32
    torch.testing.assert_close(S32, S.float())


@pytest.mark.parametrize("cond", [1.0, 1e2, 1e4])
def test_newton_schulz_converges_to_the_polar_factor(cond):
    gen = torch.Generator().manual_seed(4)
    P = torch.linalg.qr(torch.randn(150, 30, generator=gen, dtype=torch.float64)).Q
    Q = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64)).Q
    X = (P * torch.logspace(0, -np.log10(cond), 30, dtype=torch.float64)) @ Q.T
    Y = newton_schulz_polar(X, rcond=1e-6)
    assert Y is not None
    np.testing.assert_allclose(Y.numpy(), ref.whiten(X.numpy()), atol=1e-8)


@pytest.mark.parametrize("smallest,rcond,converges", [(1e-9, 1e-6, False), (1e-4, 1e-6, True),
                                                      (1e-9, 1e-12, False),  # below the Gram side's resolution
                                                      (1e-3, 1e-6, True), (0.0, 1e-12, False)])
def test_newton_schulz_refuses_what_the_exact_path_would_treat_differently(smallest, rcond, converges):
    """The exact path zeroes σ < rcond·σmax; Newton–Schulz must then decline (None), never
    return a factor that whitened that direction, nor one that has not converged."""
    gen = torch.Generator().manual_seed(5)
    P = torch.linalg.qr(torch.randn(100, 20, generator=gen, dtype=torch.float64)).Q
    s = torch.ones(20, dtype=torch.float64)
    s[-1] = smallest
    Y = newton_schulz_polar(P * s, rcond=rcond)
    assert (Y is not None) == converges
    if converges:
        np.testing.assert_allclose(Y.numpy(), P.numpy(), atol=1e-8)


@pytest.mark.parametrize("kind", ["square", "tall", "clustered"])
def test_smallest_eigenvalue_estimate_is_from_above_and_close(kind):
    """Gram matrices of concatenations like TSV-M's: square (hard edge, σmin ≈ 1e-4·σmax),
    tall (soft edge: many eigenvalues near the smallest), and a cluster at the bottom."""
    gen = torch.Generator().manual_seed(21)
    c = 60
    if kind == "clustered":
        Q = torch.linalg.qr(torch.randn(c, c, generator=gen, dtype=torch.float64)).Q
        w = torch.cat([torch.full((10,), 1e-6), torch.linspace(1e-6 * 1.01, 1, c - 10)]).double()
        G = (Q * w) @ Q.T
    else:
        X = torch.randn(c + 1 if kind == "square" else 3 * c, c, generator=gen, dtype=torch.float64)
        G = X.T @ X
    truth = torch.linalg.eigvalsh(G)[0]
    est = smallest_eigenvalue_estimate(torch.stack([G, 2 * G]))
    for e, t in zip(est, [truth, 2 * truth]):
        assert t * (1 - 1e-9) <= e <= 1.5 * t, (kind, e.item(), t.item())
    singular = torch.zeros(c, c, dtype=torch.float64)
    singular[:5, :5] = torch.eye(5)
    assert smallest_eigenvalue_estimate(singular[None])[0] == 0  # Cholesky fails: reported as 0


@pytest.mark.parametrize("lower", [0.3, 1e-2, 1e-4, 1e-6])
def test_scaled_newton_schulz_schedule_converges_where_it_says_and_only_above_rcond(lower):
    """Replays the schedule on scalars x ∈ [lower, 1] (what it promises to converge) and
    below rcond (what it must not), independently of the matrix code."""
    rcond, tol = 1e-7, 1e-10
    a_rows, b_rows, first_check = scaled_newton_schulz_schedule([lower], rcond, tol)
    a = np.array(a_rows)[:, 0]
    b = np.array(b_rows)[:, 0]
    assert np.prod(a) <= 1 / rcond * (1 + 1e-12)  # no σ < rcond·bound can reach 1
    x = np.geomspace(lower, 1, 400)
    for j in range(first_check):
        x = a[j] * x + b[j] * x ** 3
    assert np.all(np.abs(x ** 2 - 1) <= tol), lower
    below = np.array([0.999 * rcond, 0.5 * rcond])
    for j in range(len(a)):  # every step the schedule has, not only up to its first check
        below = a[j] * below + b[j] * below ** 3
    assert np.all(below < 1 - 1e-3)
    plain = np.log(1 / lower) / np.log(1.5)  # steps plain Newton–Schulz needs for its growth alone
    if lower < 0.1:
        assert first_check < plain


def test_newton_schulz_takes_the_scaled_steps_on_an_ill_conditioned_square_concatenation():
    """σmin/σmax ≈ 1e-4, like the square keys of CLIP ViTs at T·k ≈ width (27–31 plain steps)."""
    gen = torch.Generator().manual_seed(22)
    n = 80
    P = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
    X = (P * torch.logspace(0, -4, n, dtype=torch.float64)) @ Q.T
    info = {}
    W, ok = newton_schulz_whitening(X.T @ X, 1e-6, 1.0, info=info)  # plain: ≥ log(1e4)/log(1.5) = 23
    # scaled cubic steps alone: 16; after the Newton start (κ 1e4 → ~50): 9
    assert bool(ok) and info["newton"] == 1 and info["steps"] <= 10
    np.testing.assert_allclose((X @ W).numpy(), ref.whiten(X.numpy()), atol=1e-8)


@pytest.mark.parametrize("spectrum", ["power", "cluster", "tall-concatenation", "tiny"])
def test_newton_start_keeps_the_polar_factor_and_the_interval_it_promises(spectrum):
    """The scaled Newton step from Cholesky's L⁻¹: X₁ has Lᵀ's polar factor (float64 SVD of
    each), its singular values lie in the promised ``[lower, 1]``, and it is offered only where
    σmin(Lᵀ) ≥ 2·rcond is proven (a near-duplicated direction at 1e-7 must not be lifted)."""
    import tsv_fast.tsv as tsv_module

    gen = torch.Generator().manual_seed(31)
    n, rcond = 60, 1e-7
    P = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
    if spectrum == "tall-concatenation":
        T, k = 6, 10
        X = _tsv_concatenation(3 * n, n, T, k, gen)
    else:
        f64 = dict(dtype=torch.float64)
        s = {"power": torch.logspace(0, -4, n, **f64),
             "cluster": torch.cat([torch.ones(n - 12, **f64), torch.full((12,), 3e-5, **f64)]),
             "tiny": torch.cat([torch.logspace(0, -2, n - 1, **f64), torch.tensor([1e-7], **f64)]),
             }[spectrum]
        X = (P * s) @ Q.T
    Y = X.mT @ X / (torch.linalg.matrix_norm(X, 2) ** 2 * (1 + 1e-6))
    L, Linv, factored = tsv_module.cholesky_inverse_factor(Y[None])
    X1, lower, usable = tsv_module.newton_start(L, Linv, factored, rcond)
    sv = torch.linalg.svdvals(L[0].mT)
    assert bool(usable[0]) == (spectrum != "tiny")
    if usable[0]:
        assert sv[-1] >= 2 * rcond
        s1 = torch.linalg.svdvals(X1[0])
        assert s1[-1] >= lower[0] * (1 - 1e-9) and s1[0] <= 1
        assert lower[0] > 3 * sv[-1]  # closer to convergence than Lᵀ itself (1e-4 → 1.4e-2 for "power")
        np.testing.assert_allclose(tsv_module.polar_factor(X1[0]).numpy(), tsv_module.polar_factor(L[0].mT).numpy(),
                                   atol=1e-9)


def _tsv_concatenation(m, n, T, k, gen, shared=0.9):
    """[U_1 … U_T]: each task's top-k left singular vectors (float64 SVD) of power-law task
    matrices sharing a component, as TSV-M concatenates them (ill-conditioned where square)."""
    taus = correlated_tasks(m, n, T, gen, shared=shared)
    return torch.cat([torch.linalg.svd(tau.double(), full_matrices=False)[0][:, :k] for tau in taus], 1)


class _GemmWork(torch.utils._python_dispatch.TorchDispatchMode):
    """Arithmetic of every matrix product, in units of one c×c×c product per matrix."""

    def __init__(self, c, batch):
        super().__init__()
        self.unit, self.units = batch * c ** 3, 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        if func in (aten.mm.default, aten.bmm.default, aten.baddbmm_.default, aten.baddbmm.default):
            a, b = args[-2:] if func in (aten.baddbmm_.default, aten.baddbmm.default) else args[:2]
            self.units += (a.shape[0] if a.dim() == 3 else 1) * a.shape[-2] * a.shape[-1] * b.shape[-1] / self.unit
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rows", [1, 4])
def test_newton_schulz_whitens_tsv_concatenations_like_the_svd_in_two_products_a_step(rows):
    """Square (the short side) and 4× tall concatenations of T = 8 tasks' factors: the polar
    factor to 1e-9 of the float64 SVD's, ``P Qᵀ``, in two c×c×c products per step (the
    Cholesky-factor form; the coupled Gram-side iteration took three)."""
    gen = torch.Generator().manual_seed(26)
    T, k = 8, 15
    c = T * k
    X = torch.stack([_tsv_concatenation(rows * c, c, T, k, gen) for _ in range(2)])
    G, counter, info = block_gram(X, [k] * T), _GemmWork(c, len(X)), {}
    with counter:
        W, ok = newton_schulz_whitening(G, 1e-6, float(T), info=info)
    assert ok.all()
    for x, w in zip(X, W):
        P, sv, Qh = np.linalg.svd(x.numpy(), full_matrices=False)
        assert sv[-1] / sv[0] < 0.02  # scaled steps needed (square: 5e-4)
        np.testing.assert_allclose((x @ w).numpy(), P @ Qh, atol=1e-9)
    extra = 1 if info["newton"] else 0  # the Newton start's XᵀX
    assert info["steps"] >= 4 and counter.units <= 2 * info["steps"] + 4 + extra, (counter.units, info)


def test_newton_schulz_with_a_too_high_lambda_min_estimate_still_converges_and_still_refuses(monkeypatch):
    """The estimate only schedules the steps: if it is far too high, values below the assumed
    interval still grow and converge; a direction below rcond is still refused."""
    import tsv_fast.tsv as tsv_module
    monkeypatch.setattr(tsv_module, "smallest_eigenvalue_estimate",
                        lambda G, **kwargs: torch.ones(G.shape[:-2], dtype=G.dtype))
    monkeypatch.setattr(tsv_module, "NEWTON_START", False)  # the estimate schedules every matrix
    gen = torch.Generator().manual_seed(23)
    P = torch.linalg.qr(torch.randn(60, 20, generator=gen, dtype=torch.float64)).Q
    for smallest, converges in [(1e-4, True), (1e-9, False)]:
        s = torch.ones(20, dtype=torch.float64)
        s[-1] = smallest
        Y = newton_schulz_polar(P * s, rcond=1e-6, bound=1.0)
        assert (Y is not None) == converges, smallest
        if converges:
            np.testing.assert_allclose(Y.numpy(), P.numpy(), atol=1e-8)


def test_newton_schulz_estimates_lambda_min_only_where_a_matrix_cannot_take_the_newton_start(monkeypatch):
    """The λmin estimate only schedules matrices without the Newton start's proven bound: a batch
    that all takes the start skips it; one matrix near the cut (σ = 1e-7·bound, under 2·rcond)
    brings it back, for that batch, and both batches still match the SVD's polar factor."""
    import tsv_fast.tsv as tsv_module
    calls = []
    real = tsv_module.smallest_eigenvalue_estimate
    monkeypatch.setattr(tsv_module, "smallest_eigenvalue_estimate",
                        lambda G, **kwargs: calls.append(G.shape) or real(G, **kwargs))
    gen = torch.Generator().manual_seed(31)
    for smallest, estimated in [(1e-3, False), (1e-7, True)]:
        calls.clear()
        X = []
        for i in range(3):
            P = torch.linalg.qr(torch.randn(40, 16, generator=gen, dtype=torch.float64)).Q
            Qr = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64)).Q
            s = torch.logspace(0, -2, 16, dtype=torch.float64)
            if i == 1:
                s[-1] = smallest
            X.append(P * s @ Qr.T)
        X = torch.stack(X)
        info = {}
        W, ok = newton_schulz_whitening(X.mT @ X, 1e-7, 1.0, info=info)
        assert bool(calls) == estimated and info["newton"] == (2 if estimated else 3)
        for x, w, good in zip(X, W, ok):
            if good:
                P, _, Qh = np.linalg.svd(x.numpy(), full_matrices=False)
                np.testing.assert_allclose((x @ w).numpy(), P @ Qh, atol=1e-8)
        assert ok[0] and ok[2]


def test_newton_schulz_on_two_batch_dims_with_per_matrix_bounds_and_an_early_stop():
    """(2, 2) Gram matrices, each with its own bound, one of them singular: each matrix is whitened
    or refused on its own, and the singular one does not hold the others to the step limit."""
    gen = torch.Generator().manual_seed(24)
    Xs, want_ok = [], []
    for i in range(4):
        P = torch.linalg.qr(torch.randn(50, 12, generator=gen, dtype=torch.float64)).Q
        s = torch.logspace(0, -2 * i, 12, dtype=torch.float64) * (i + 1)
        if i == 3:
            s[-1] = 0.0  # a duplicated direction: refused
        Xs.append(P * s)
        want_ok.append(i != 3)
    X = torch.stack(Xs).reshape(2, 2, 50, 12)
    G = X.mT @ X
    bound_sq = torch.tensor([float(i + 1) ** 2 for i in range(4)], dtype=torch.float64).reshape(2, 2)
    info = {}
    W, ok = newton_schulz_whitening(G, 1e-7, bound_sq, info=info)
    assert ok.reshape(-1).tolist() == want_ok
    assert torch.isfinite(W).all()  # also where refused (a failed Cholesky iterates from I)
    for i in range(3):
        x = X.reshape(4, 50, 12)[i]
        np.testing.assert_allclose((x @ W.reshape(4, 12, 12)[i]).numpy(), ref.whiten(x.numpy()), atol=1e-8)
    rows, _, _ = scaled_newton_schulz_schedule([1e-7], 1e-7, 1e-10)
    assert info["steps"] < len(rows)  # stopped once the singular matrix had spent its budget


@pytest.mark.parametrize("noise", [1e-7, 1e-3, 0.3])
def test_sigma_max_bound_from_blocks_is_a_bound_and_near_T_for_rounded_factors(noise):
    """Blocks orthonormal up to ``noise`` (1e-7: float32 rounding; 0.3: far from orthonormal),
    with a shared direction so that σmax² approaches T: the block bound is never below λmax,
    and for rounded factors it is T to 1e-4 where trace(G) is T·k."""
    gen = torch.Generator().manual_seed(25)
    sizes = [10] * 6
    X = orthonormal_blocks(90, sizes, gen, overlap=0.9)
    X = X + noise * torch.randn(X.shape, generator=gen, dtype=torch.float64)
    G = X.mT @ X
    lam_max = torch.linalg.eigvalsh(G)[-1]
    bound = sigma_max_sq_bound(G[None], sizes, orthonormal=False)[0]
    assert bound >= lam_max * (1 - 1e-12)
    assert sigma_max_sq_bound(G[None])[0] >= lam_max * (1 - 1e-12)  # the trace bound
    if noise < 1e-6:
        assert bound <= len(sizes) * (1 + 1e-4) < sigma_max_sq_bound(G[None])[0] / 5


def test_newton_schulz_with_the_block_bound_on_rounded_factors_matches_the_reference():
    """float32-rounded orthonormal blocks (the randomized solver's factors), ill-conditioned by a
    shared subspace: the tighter bound must still give the polar factor, not a sign-flipped one."""
    gen = torch.Generator().manual_seed(26)
    sizes = [12] * 8
    X = orthonormal_blocks(100, sizes, gen, overlap=0.7).float().double()
    counts = {}
    P = polar_from_blocks(X, sizes, "newton-schulz", counts=counts,
                          orthonormal=False)
    assert counts.get("newton_schulz", 0) == 1
    np.testing.assert_allclose(P.numpy(), ref.whiten(X.numpy()), atol=1e-8)


def test_batched_newton_schulz_checks_each_matrix_and_falls_back_per_matrix():
    """One well-conditioned and one singular (a duplicated task) concatenation in one batch:
    Newton–Schulz keeps the first, the exact path takes the second, each equal to its reference."""
    gen = torch.Generator().manual_seed(12)
    sizes = [6, 6, 6]
    good = orthonormal_blocks(80, sizes, gen, overlap=0.5)
    dup = orthonormal_blocks(80, sizes, gen, overlap=0.5)
    dup[:, 6:12] = dup[:, :6]
    counts = {}
    P = polar_from_blocks(torch.stack([good, dup]), sizes, "newton-schulz", counts=counts)
    assert counts == {"newton_schulz": 1, "fallback": 1}
    np.testing.assert_allclose(P[0].numpy(), ref.whiten(good.numpy()), atol=1e-8)
    torch.testing.assert_close(P[1], dup @ whitening(dup, sizes), atol=1e-10, rtol=0)
    assert resolve_polar("auto", torch.device("cpu")) == "eigh"
    assert resolve_polar("auto", torch.device("cuda")) == "newton-schulz"


@pytest.mark.parametrize("T", [2, 8])
def test_newton_schulz_polar_option_matches_the_reference(T):
    gen = torch.Generator().manual_seed(T)
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    base = {key: torch.zeros(256, 64)}
    common = power_law_matrix(256, 64, gen, 0.5)
    taus = [0.8 * power_law_matrix(256, 64, gen, 0.5) + 0.6 * common for _ in range(T)]
    stats = {}
    merged = tsv_fast.merge_layers(base, [tsv_fast.TaskVector({key: t}) for t in taus], polar="newton-schulz",
                                   stats=stats)
    assert sum(stats["polar"].values()) == 2  # U and V sides, each Newton–Schulz or a fallback
    want = ref.tsv_m_delta([t.double().numpy() for t in taus])
    assert ref.rel_err(ref.np64(merged[key]), want) < 1e-4


def test_newton_schulz_falls_back_on_duplicated_tasks():
    """Identical tasks make the concatenation singular up to rounding: the check fails and the
    exact pseudo-inverse path gives their common truncation."""
    tau = power_law_matrix(200, 80, torch.Generator().manual_seed(6), 0.5)
    base = {"w": torch.zeros(200, 80)}
    stats = {}
    merged = tsv_fast.merge_layers(base, [tsv_fast.TaskVector({"w": tau.clone()}) for _ in range(4)],
                                   polar="newton-schulz", stats=stats)
    assert stats["polar"].get("fallback", 0) >= 1
    U, S, V = ref.top_k(tau.double().numpy(), 20)
    assert ref.rel_err(ref.np64(merged["w"]), (U * S) @ V.T) < 1e-5


def test_unknown_polar_and_batch_modes_are_refused(small_base, small_tasks):
    with pytest.raises(tsv_fast.TSVInputError, match="polar must be one of"):
        tsv_fast.merge_layers(small_base, small_tasks, polar="svd-ish")
    with pytest.raises(tsv_fast.TSVInputError, match="batch must be one of"):
        tsv_fast.merge_layers(small_base, small_tasks, batch="layers")


@pytest.fixture(scope="module")
def deep_base():
    """Four blocks, so every shape of a ViT block repeats across layers."""
    return clip_vit_base(width=48, layers=4, patch_size=16, image_size=48, embed_dim=32, seed=2)


@pytest.mark.parametrize("solver", ["exact", "randomized", "svd"])
def test_shape_batches_give_the_per_key_result(deep_base, solver):
    tasks = synthetic_finetuned(deep_base, 5, seed=3)
    stats = {}
    by_shape = tsv_fast.merge_layers(deep_base, tasks, solver=solver, batch="shape", stats=stats)
    by_key = tsv_fast.merge_layers(deep_base, tasks, solver=solver, batch="key")
    assert stats["shape_batches"] == 4  # qkv, out_proj, c_fc, c_proj: one batch each over the 4 blocks
    for key in by_key:
        torch.testing.assert_close(by_shape[key], by_key[key], atol=1e-6, rtol=1e-5)
    if solver == "exact":
        expected = ref.merge(deep_base, tasks, "tsv", 1.0)
        for key, want in expected.items():
            b = ref.np64(deep_base[key])
            assert ref.rel_err(ref.np64(by_shape[key]) - b, want - b) < 2e-5, key


def test_randomized_shape_batches_give_the_per_key_result_where_it_samples(monkeypatch):
    """Width 64 and T = 8: k = 8, ℓ = 18 ≤ 64/3, so every key is sampled (at width 48 and T = 5,
    above, ℓ = 19 > 48/3 hands every key to the exact fallback). Each matrix sketched with the
    test matrix of its batch position: the two merges differed by tens of percent."""
    base = {k: v for k, v in clip_vit_base(width=64, layers=2, patch_size=16, image_size=32, embed_dim=32,
                                           seed=2).items() if ".resblocks." in k}  # short sides all 64
    tasks = synthetic_finetuned(base, 8, seed=3)
    fallbacks = []
    monkeypatch.setattr(solvers, "exact_topk", lambda *a, **kw: fallbacks.append(a[0].shape) or exact_topk(*a, **kw))
    stats = {}
    by_shape = tsv_fast.merge_layers(base, tasks, solver="randomized", batch="shape", stats=stats)
    by_key = tsv_fast.merge_layers(base, tasks, solver="randomized", batch="key")
    assert stats["shape_batches"] == 4 and not fallbacks
    for key in by_key:
        torch.testing.assert_close(by_shape[key], by_key[key], atol=1e-6, rtol=1e-5)


def test_shape_batches_with_newton_schulz_polar_give_the_per_key_result(deep_base):
    tasks = synthetic_finetuned(deep_base, 4, seed=7)
    stats = {}
    by_shape = tsv_fast.merge_layers(deep_base, tasks, batch="shape", polar="newton-schulz", stats=stats)
    per_key_stats = {}
    by_key = tsv_fast.merge_layers(deep_base, tasks, batch="key", polar="newton-schulz", stats=per_key_stats)
    assert stats["shape_batches"] == 4
    assert stats["polar"] == per_key_stats["polar"]  # every key's U and V still checked on its own
    for key in by_key:
        torch.testing.assert_close(by_shape[key], by_key[key], atol=1e-6, rtol=1e-5)


def test_shape_batches_respect_the_byte_budget(deep_base):
    T = 3
    spec = get_method("tsv")
    keys = set(deep_base)
    c_fc = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    one_key = T * deep_base[c_fc].numel() * 4
    groups = _plan(deep_base, spec, keys, T, None, "shape", 2 * one_key)[0]
    assert len(groups[c_fc]) == 2  # 4 blocks in two batches
    assert all(sum(T * deep_base[k].numel() * 4 for k in g) <= 2 * one_key for g in groups.values())
    assert max(len(g) for g in groups.values()) == 4  # the smaller out_proj keys fit one batch
    assert _plan(deep_base, spec, keys, T, None, "auto", 1 << 40) == ({}, {})  # CPU tensors: per key
    assert _plan(deep_base, get_method("ties"), keys, T, None, "shape", 1 << 40) == ({}, {})
    tasks = synthetic_finetuned(deep_base, T, seed=4)
    stats = {}
    small = tsv_fast.merge_layers(deep_base, tasks, batch="shape", batch_bytes=2 * one_key, stats=stats)
    whole = tsv_fast.merge_layers(deep_base, tasks, batch="key")
    assert all(torch.allclose(small[k], whole[k], atol=1e-6, rtol=1e-5) for k in whole)
    plan = plan_shape_batches(deep_base, tasks, keys, batch="shape", batch_bytes=2 * one_key)  # what --dry-run shows
    assert [run for run, _ in plan] == _runs(groups) and stats["shape_batches"] == len(plan)
    assert all(nbytes == stacked_bytes(deep_base, run, T) for run, nbytes in plan)
    assert stats["largest_batch_bytes"] == max(nbytes for _, nbytes in plan) == 2 * one_key  # two c_fc keys
    with pytest.raises(tsv_fast.TSVInputError, match="batch='key' forms none"):
        tsv_fast.merge_layers(deep_base, tasks, batch="key", batch_bytes=2 * one_key)


def _runs(groups: dict) -> list[list[str]]:
    return list({id(g): g for g in groups.values()}.values())


@pytest.mark.parametrize("method,alpha", [("tsv", 1.0), ("task_arithmetic", 0.3), ("mean", 0.7)])
def test_elementwise_keys_merge_at_once_as_key_by_key(deep_base, method, alpha, monkeypatch):
    """With shape batches, the keys a method merges elementwise (TSV-M: biases, LayerNorm and
    embeddings; Task Arithmetic and averaging: every key) merge as one run of multi-tensor ops:
    the same values as one key at a time, and the float64 definition's."""
    import dataclasses

    from tsv_fast import methods
    T = 5
    tasks = synthetic_finetuned(deep_base, T, seed=11)
    (run,) = _runs(_plan(deep_base, get_method(method), set(deep_base), T, None, "shape", 1 << 40)[1])
    assert set(run) == {k for k, v in deep_base.items()
                        if v.is_floating_point() and not (method == "tsv" and is_matrix_key(k, v))}
    assert len(run) >= 8 * 4 and list(run) == [k for k in deep_base if k in run]  # 8 per block, in order
    calls = []
    spec = methods.METHODS[method]
    spied = dataclasses.replace(spec, merge_elementwise=lambda keys, *a: calls.append(list(keys))
                                or spec.merge_elementwise(keys, *a))
    monkeypatch.setitem(methods.METHODS, method, spied)
    options = {"solver": "randomized"} if method == "tsv" else {}  # the matrix keys are not under test here
    by_shape = tsv_fast.merge_layers(deep_base, tasks, method, alpha, batch="shape", **options)
    assert calls == [run]  # the whole run in one call
    by_key = tsv_fast.merge_layers(deep_base, tasks, method, alpha, batch="key", **options)
    assert list(by_shape) == list(deep_base)
    expected = ref.merge(deep_base, tasks, method, alpha)
    for key in run:
        assert torch.equal(by_shape[key], by_key[key]), key
        b = ref.np64(deep_base[key])
        assert ref.rel_err(ref.np64(by_shape[key]) - b, expected[key] - b) < 1e-5, key


def test_elementwise_runs_split_by_dtype_and_budget(deep_base, monkeypatch):
    """A run holds one dtype (its keys' outputs keep their own) and keys whose running sum (about
    ELEMENTWISE_SETS float32 copies, whatever the number of tasks) fits ``batch_bytes`` and
    ELEMENTWISE_RUN_BYTES; TIES trims each key alone and a CPU merge on "auto" goes key by key."""
    from tsv_fast import merge
    T = 3
    base = {k: (v.half() if k.endswith("ln_1.weight") else v) for k, v in deep_base.items()}
    tasks = [{k: v.to(base[k].dtype) for k, v in t.items()} for t in synthetic_finetuned(deep_base, T, seed=12)]
    runs = _runs(_plan(base, get_method("mean"), set(base), T, None, "shape", 1 << 40)[1])
    assert sorted({base[k].dtype for k in run} == {torch.float16} for run in runs) == [False, True]
    assert all(len({base[k].dtype for k in run}) == 1 for run in runs)
    assert runs == _runs(_plan(base, get_method("mean"), set(base), 50, None, "shape", 1 << 40)[1])  # any T
    held = {k: ELEMENTWISE_SETS * base[k].numel() * 4 for k in base}  # float32 sums, deltas, copies, outputs
    budget = sum(held[k] for run in runs for k in run if "conv1" not in k) // 3
    small = _runs(_plan(base, get_method("mean"), set(base), T, None, "shape", budget)[1])
    assert len(small) > len(runs) and all(sum(held[k] for k in run) <= budget for run in small)
    monkeypatch.setattr(merge, "ELEMENTWISE_RUN_BYTES", budget)  # the cap whatever batch_bytes says
    assert _runs(_plan(base, get_method("mean"), set(base), T, None, "shape", 1 << 40)[1]) == small
    assert _plan(base, get_method("mean"), set(base), T, None, "auto", 1 << 40) == ({}, {})  # CPU tensors
    assert _plan(base, get_method("ties"), set(base), T, None, "shape", 1 << 40)[1] == {}
    by_shape = tsv_fast.merge_layers(base, tasks, "mean", batch="shape", batch_bytes=budget)
    by_key = tsv_fast.merge_layers(base, tasks, "mean", batch="key")
    expected = ref.merge(base, tasks, "mean", 1.0)
    for key, want in expected.items():
        assert by_shape[key].dtype == base[key].dtype and torch.equal(by_shape[key], by_key[key]), key
        tol = 2e-3 if base[key].dtype == torch.float16 else 1e-5
        assert np.abs(ref.np64(by_shape[key]) - want).max() <= tol * np.abs(want).max(), key


def test_shape_batches_with_compressed_tasks_and_streaming(deep_base):
    tasks = synthetic_finetuned(deep_base, 4, seed=5)
    compressed = tsv_fast.compress(deep_base, tasks[:2])
    mixed = [compressed[0], tasks[1], compressed[1], tasks[3]]
    stream = tsv_fast.iter_merge(deep_base, mixed, batch="shape")
    merged = dict(stream)
    assert list(merged) == list(deep_base)  # still yielded in the base's key order
    by_key = tsv_fast.merge_layers(deep_base, mixed, batch="key")
    for key in by_key:
        torch.testing.assert_close(merged[key], by_key[key], atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not tsv_fast.ops.load_extension()[0], reason="needs the compiled extension (kernel emulation)")
@pytest.mark.filterwarnings("ignore:1 matrix key:tsv_fast.errors.TSVRankWarning")  # the 10×192 positional embedding
def test_the_gpu_route_run_on_the_cpu_matches_the_float64_algorithm(monkeypatch):
    """What a GPU runs, with the CUDA kernel's CPU emulation in place of the kernel: shape batches,
    subspace iteration from estimated bounds with Rayleigh–Ritz by the Jacobi kernel (at its
    stopping tolerance, 512 threads), Newton–Schulz polar factors from upper-block products."""
    import functools

    from tsv_fast import ops, solvers

    base = clip_vit_base(width=192, layers=2, patch_size=16, image_size=48, embed_dim=32, seed=8)
    tasks = synthetic_finetuned(base, 16, seed=9)
    assert solvers.exact_route(192 // 16, 192, torch.device("cpu")) == "subspace"  # k = 12, ℓ = 24
    calls = []

    def kernel(A, max_sweeps=30, tol=0.0, threads=0):
        calls.append((tol, threads))
        return torch.ops.tsv_fast.batched_eigh_emulated(A, max_sweeps, tol, -1, threads)

    monkeypatch.setattr(ops, "batched_eigh", kernel)
    monkeypatch.setattr(solvers, "JACOBI_THREADS", 512)
    monkeypatch.setattr(solvers, "subspace_topk",
                        functools.partial(solvers.subspace_topk, small_eigh=solvers._jacobi_eigh))
    full_eigh = []  # subspace iteration's fallback for a matrix that never converges (one 2-D eigh): none
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda G: (G.dim() == 2 and full_eigh.append(G.shape)) or eigh(G))
    householder = []  # orthonormalize's fallback where CholeskyQR2 breaks down: none
    qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda *a, **kw: householder.append(1) or qr(*a, **kw))
    stats = {}
    merged = tsv_fast.merge_layers(base, tasks, batch="shape", polar="newton-schulz", stats=stats)
    assert not full_eigh and not householder
    assert calls and set(calls) == {(solvers.RAYLEIGH_RITZ_TOL, 512)}
    assert stats["shape_batches"] == 4 and stats["polar"]["fallback"] == 0
    expected = ref.merge(base, tasks, "tsv", 1.0)
    for key, want in expected.items():
        b = ref.np64(base[key])
        assert ref.rel_err(ref.np64(merged[key]) - b, want - b) < 2e-5, key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_shape_batches_on_cuda_match_cpu(deep_base):
    tasks = synthetic_finetuned(deep_base, 5, seed=6)
    stats = {}
    gpu = tsv_fast.merge_layers(deep_base, tasks, device="cuda", stats=stats)  # auto: shape batches on a GPU
    assert stats["shape_batches"] == 4
    cpu = tsv_fast.merge_layers(deep_base, tasks)
    for key in cpu:
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_vit_b32_block_on_cuda_matches_the_float64_algorithm():
    """A real-sized ViT-B/32 block, T = 8, through the GPU defaults (shape batches, subspace
    iteration with ℓ = 192, Newton–Schulz on square 768×768 concatenations) against the float64
    reference: the GPU benchmark saw Δ differ from float32 SVD (a) by up to 6e-2 here."""
    base = clip_vit_base(width=768, layers=1, patch_size=32, image_size=224)
    blocks = {k: v for k, v in base.items() if ".resblocks." in k}
    tasks = [tsv_fast.TaskVector(t) for t in synthetic_task_vectors(blocks, 8, seed=3)]
    stats = {}
    gpu = tsv_fast.merge_layers(blocks, tasks, device="cuda", stats=stats)
    for key, b in blocks.items():
        if b.dim() == 2 and ".ln_" not in key:
            want = ref.tsv_m_delta([t[key].double().numpy() for t in tasks])
            assert ref.rel_err(ref.np64(gpu[key]) - ref.np64(b), want) < 1e-4, (key, stats["polar"])


def test_newton_schulz_refuses_a_matrix_whose_cholesky_fails_and_keeps_its_neighbours():
    G = torch.stack([torch.eye(6, dtype=torch.float64) * 2, torch.zeros(6, 6, dtype=torch.float64)])
    G[1, :2, :2] = torch.eye(2)  # rank 2: Cholesky fails
    W, ok = newton_schulz_whitening(G, 1e-7, 2.0)
    assert ok.tolist() == [True, False] and torch.isfinite(W).all()
    torch.testing.assert_close(W[0], torch.eye(6, dtype=torch.float64) / 2 ** 0.5, rtol=1e-10, atol=1e-12)


def test_compressed_tasks_are_not_counted_in_the_stacked_batches(monkeypatch):
    """Compressed tasks give stored factors, so a shape batch stacks only the dense tasks' deltas:
    the batches, the solver's sub-batches and the plan ``--dry-run`` shows are sized by those."""
    from tsv_fast import methods
    base = {f"l{i}.weight": torch.randn(4096, 32) for i in range(8)}
    tasks = synthetic_finetuned(base, 8, seed=13)
    mixed = [tasks[0], *tsv_fast.compress(base, tasks[1:])]  # 1 dense task, 7 compressed
    one = 4096 * 32 * 4  # one key's stacked deltas: one dense task, float32
    calls = []
    monkeypatch.setattr(methods, "shape_batch_factors",
                        lambda sources, keys, *a, **kw: calls.append(len(keys)) or shape_batch_factors(sources, keys, *a, **kw))
    stats = {}
    merged = tsv_fast.merge_layers(base, mixed, batch="shape", batch_bytes=8 * one, stats=stats)
    assert stats["largest_batch_bytes"] == 8 * one  # one batch of the dense task's deltas
    # solver calls of several keys (the whitening's float64 work sets how many): pricing each key's
    # stack at all 8 tasks, as if none were compressed, left room for one key per call
    assert sum(calls) == 8 and max(calls) > 1
    plan = plan_shape_batches(base, mixed, batch="shape", batch_bytes=8 * one)
    assert plan == [(list(base), 8 * one)]
    by_key = tsv_fast.merge_layers(base, mixed, batch="key")
    for key in base:
        torch.testing.assert_close(merged[key], by_key[key], atol=1e-6, rtol=1e-5)


def test_runs_never_mix_devices():
    """Base tensors on two devices (here the CPU and ``meta``): each device's keys form their own runs."""
    base = {"a.bias": torch.randn(8), "b.bias": torch.empty(8, device="meta"), "c.bias": torch.randn(8),
            "d.bias": torch.empty(8, device="meta")}
    _, runs = _plan(base, get_method("mean"), set(base), 2, None, "shape", 1 << 20)
    assert _runs(runs) == [["a.bias", "c.bias"], ["b.bias", "d.bias"]]


def test_batch_bytes_auto_is_a_quarter_of_the_gpus_free_memory(monkeypatch):
    """``batch_bytes=None``: 2 GiB on a CPU; on a GPU a quarter of its free memory, so an H100/H200
    holds every matrix of a shape in one batch at ViT-L/14, T = 20, and a small card small ones."""
    from tsv_fast.merge import DEFAULT_BATCH_BYTES, resolve_batch_bytes
    GiB = 1 << 30
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (40 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 9 * GiB)  # the allocator's cache:
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 5 * GiB)  # 4 GiB of it unused
    cuda = torch.device("cuda")
    assert resolve_batch_bytes(None, cuda) == 11 * GiB and asked == [cuda]  # (40 + 4) / 4
    assert resolve_batch_bytes(5 * GiB, cuda) == 5 * GiB  # given: kept
    assert resolve_batch_bytes(None, torch.device("cpu")) == DEFAULT_BATCH_BYTES == 2 * GiB and len(asked) == 1
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * GiB, 16 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    assert resolve_batch_bytes(None, cuda) == GiB

"""Top-k solvers and the whitening step against float64 SVD, on realistic spectra."""

import math

import numpy as np
import pytest
import torch

import reference as ref
import tsv_fast
from tsv_fast import ops
from tsv_fast.solvers import SOLVERS, eigh_topk, exact_topk, orthonormalize, randomized_topk, subspace_topk
from tsv_fast.synthetic import correlated_tasks
from tsv_fast.tsv import polar_factor, whitening


def task_batch(m, n, count, decay=0.5, shared=0.3, seed=0):
    """Task-vector-like matrices: power-law spectra (nearly flat around k) plus a shared part."""
    return torch.stack(correlated_tasks(m, n, count, torch.Generator().manual_seed(seed), decay, shared))


def rank_k_errors(A, U, S, V):
    approx = (U.double() * S.double().unsqueeze(-2)) @ V.double().mT
    return (A.double() - approx).flatten(1).norm(dim=1)


def optimal_errors(A, k):
    s = torch.linalg.svdvals(A.double())
    return s[:, k:].square().sum(-1).sqrt()


SHAPES = [(512, 128, 2), (512, 128, 8), (512, 128, 20), (128, 512, 8), (192, 192, 5)]


@pytest.mark.parametrize("m,n,T", SHAPES)
@pytest.mark.parametrize("decay", [0.5, 1.0])
@pytest.mark.parametrize("solver", ["exact", "eigh", "subspace"])
def test_exact_topk_is_optimal_to_0_1_percent(m, n, T, decay, solver):
    A = task_batch(m, n, 3, decay)
    k = min(m, n) // T
    U, S, V, residual = SOLVERS[solver](A, k)
    assert residual is None and U.shape == (3, m, k) and S.shape == (3, k) and V.shape == (3, n, k)
    assert (rank_k_errors(A, U, S, V) <= optimal_errors(A, k) * 1.001).all()
    s = torch.linalg.svdvals(A.double())[:, :k]
    torch.testing.assert_close(S.double(), s, rtol=1e-5, atol=0)
    eye = torch.eye(k, dtype=torch.float64)
    torch.testing.assert_close(U.double().mT @ U.double(), eye.expand(3, k, k), atol=1e-5, rtol=0)
    torch.testing.assert_close(V.double().mT @ V.double(), eye.expand(3, k, k), atol=1e-5, rtol=0)


@pytest.mark.parametrize("m,n,T", SHAPES)
def test_randomized_within_2_percent_of_optimal_and_reports_its_error(m, n, T):
    A = task_batch(m, n, 3, 0.5, seed=T)
    k = min(m, n) // T
    U, S, V, residual = randomized_topk(A, k)
    err = rank_k_errors(A, U, S, V)
    assert (err <= optimal_errors(A, k) * 1.02).all()
    truth = err / A.double().flatten(1).norm(dim=1)
    assert ((residual / truth - 1).abs() < 1e-3).all()  # measured, not estimated: within 2× by far


def test_randomized_on_a_steep_spectrum_and_low_rank_input():
    A = task_batch(300, 100, 2, decay=2.0)
    U, S, V, residual = randomized_topk(A, 10)
    assert (rank_k_errors(A, U, S, V) <= optimal_errors(A, 10) * 1.02).all()
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(2, 300, 5, generator=gen) @ torch.randn(2, 5, 100, generator=gen)
    U, S, V, residual = randomized_topk(low, 20)  # k above the rank: Cholesky breaks down, QR takes over
    assert torch.isfinite(U).all() and (residual < 1e-5).all()
    assert (rank_k_errors(low, U, S, V) / low.flatten(1).norm(dim=1) < 1e-5).all()


@pytest.mark.parametrize("m,n", [(512, 128), (128, 512)])
def test_randomized_factors_of_a_matrix_do_not_depend_on_its_batch(m, n):
    """One Gaussian test matrix per batch position made a matrix's factors depend on where it sat
    in the batch (merges with batch="shape" and "key" differed by 57%). k = 16: ℓ = 26 ≤ 128/3,
    so the matrices are sampled, not handed to the exact fallback."""
    A = task_batch(m, n, 4, seed=5)
    k = 16

    def rank_k(f, i):
        return (f.U[i].double() * f.S[i].double()) @ f.V[i].double().mT

    whole, reversed_ = randomized_topk(A, k), randomized_topk(A.flip(0), k)
    for i in range(4):
        alone = randomized_topk(A[i:i + 1], k)
        for other in (rank_k(whole, i), rank_k(reversed_, 3 - i)):
            assert (other - rank_k(alone, 0)).norm() <= 1e-5 * other.norm()
        torch.testing.assert_close(alone.residual[0], whole.residual[i], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("shape", [(3, 80, 70), (2, 40, 96)])
def test_rank_zero_gives_empty_factors(solver, shape):
    U, S, V, _ = SOLVERS[solver](torch.randn(*shape), 0)
    assert U.shape == (*shape[:-1], 0) and S.shape == (shape[0], 0) and V.shape == (shape[0], shape[-1], 0)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_zero_matrix_gives_zero_factors(solver):
    U, S, V, _ = SOLVERS[solver](torch.zeros(2, 40, 30), 5)
    assert torch.isfinite(U).all() and torch.isfinite(V).all() and (S == 0).all()


def test_orthonormalize_is_orthonormal_on_ill_conditioned_input():
    gen = torch.Generator().manual_seed(1)
    Y = torch.randn(400, 30, generator=gen) * torch.logspace(0, -3, 30)
    Q = orthonormalize(Y)
    torch.testing.assert_close(Q.mT @ Q, torch.eye(30), atol=1e-5, rtol=0)
    assert torch.linalg.matrix_rank(torch.cat([Q, Y], 1), rtol=1e-4) == 30  # same span


def test_orthonormalize_takes_columns_of_very_different_norms_without_falling_back(monkeypatch):
    """A filtered block: well-separated directions whose norms span 1e12, cond(Y) ≈ 1e12, far
    beyond CholeskyQR's ~1e8. Cholesky is invariant to column scaling, so it stays on the GEMM
    path with the same span: what lets the Chebyshev filters use a 1e14 gain budget."""
    gen = torch.Generator().manual_seed(3)
    D = torch.linalg.qr(torch.randn(300, 20, generator=gen, dtype=torch.float64)).Q
    mix = torch.eye(20, dtype=torch.float64) + 0.3 * torch.randn(20, 20, generator=gen, dtype=torch.float64).triu(1)
    Y = (D @ mix) * torch.logspace(0, -12, 20, dtype=torch.float64)

    def no_qr(*args, **kwargs):
        raise AssertionError("fell back to Householder QR")
    monkeypatch.setattr(torch.linalg, "qr", no_qr)
    Q = orthonormalize(Y[None])[0]
    torch.testing.assert_close(Q.mT @ Q, torch.eye(20, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(Q @ Q.mT, D @ D.mT, atol=1e-10, rtol=0)  # the same span


@pytest.mark.parametrize("cond", [1e2, 1e5])
def test_orthonormalize_one_pass_keeps_the_span_and_is_orthonormal_to_a_few_digits(cond):
    """One CholeskyQR pass (between two filters of a round): the span of Y, orthonormal to about
    cond²·eps after column scaling, where the second pass brings it to rounding; checked against
    float64 Householder QR's projector on a block whose columns mix (not only scale) directions."""
    gen = torch.Generator().manual_seed(int(cond))
    D = torch.linalg.qr(torch.randn(500, 24, generator=gen, dtype=torch.float64)).Q
    mix = torch.linalg.qr(torch.randn(24, 24, generator=gen, dtype=torch.float64)).Q
    Y = (D * torch.logspace(0, -math.log10(cond), 24, dtype=torch.float64)) @ mix  # cond(Y) = cond
    want = torch.linalg.qr(Y).Q
    eye = torch.eye(24, dtype=torch.float64)
    one, two = orthonormalize(Y[None], passes=1)[0], orthonormalize(Y[None])[0]
    loss = (one.mT @ one - eye).abs().max()
    assert loss < 1e2 * cond ** 2 * 2.2e-16 and (cond < 1e4 or loss > 1e-12)  # one pass, not two
    assert (two.mT @ two - eye).abs().max() < 1e-13
    for Q in (one, two):
        assert (Q @ Q.mT - want @ want.mT).abs().max() < 1e3 * cond * 2.2e-16 + 1e-12  # the same span


@pytest.mark.parametrize("n", [1, 127, 129, 300, 1020])
def test_lower_triangular_inverse_by_gemms_matches_the_float64_inverse(n):
    """The block form (halves joined by GEMMs, the GPU's) against numpy's float64 inverse of the
    same factors, on Cholesky factors of Gram matrices whose condition spans 1 to 1e10 (κ(L) up
    to 1e5), with two batch dimensions; and the batched triangular solve (the CPU's) alike."""
    from tsv_fast.solvers import lower_triangular_inverse
    gen = torch.Generator().manual_seed(n)
    Ls = []
    for decades in (0, 4, 10):
        P = torch.linalg.qr(torch.randn(n + 5, n, generator=gen, dtype=torch.float64)).Q
        Qr = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
        X = P * torch.logspace(0, -decades / 2, n, dtype=torch.float64) @ Qr.T
        Ls.append(torch.linalg.cholesky(X.mT @ X))
    L = torch.stack(Ls + Ls[::-1]).reshape(2, 3, n, n)
    want = np.linalg.inv(L.numpy())
    for by_gemms in (True, False):
        got = lower_triangular_inverse(L, by_gemms=by_gemms)
        assert got.shape == L.shape and (got.triu(1) == 0).all()
        kappa = np.linalg.cond(L.numpy())
        err = np.abs(got.numpy() - want).max((-2, -1)) / np.abs(want).max((-2, -1))
        assert (err < 1e2 * n * kappa * 2.2e-16).all(), (by_gemms, err, kappa)


def test_newton_schulz_with_the_block_triangular_inverse_whitens_like_the_svd(monkeypatch):
    """The GPU's L⁻¹ (GEMM halves) through the whole Newton–Schulz whitening, on the CPU: the
    polar factor of an ill-conditioned 300-column concatenation, as the SVD gives it."""
    from tsv_fast import solvers
    monkeypatch.setattr(solvers, "TRIANGULAR_INVERSE_BY_GEMMS", ("cpu",))
    gen = torch.Generator().manual_seed(41)
    P = torch.linalg.qr(torch.randn(320, 300, generator=gen, dtype=torch.float64)).Q
    Qr = torch.linalg.qr(torch.randn(300, 300, generator=gen, dtype=torch.float64)).Q
    X = P * torch.logspace(0, -4, 300, dtype=torch.float64) @ Qr.T
    Y = tsv_fast.tsv.newton_schulz_polar(X, rcond=1e-7)
    assert Y is not None
    U, _, Vh = np.linalg.svd(X.numpy(), full_matrices=False)
    np.testing.assert_allclose(Y.numpy(), U @ Vh, atol=1e-8)


@pytest.mark.parametrize("cond", [1.0, 1e2, 1e4])
def test_whitening_gives_the_polar_factor(cond):
    gen = torch.Generator().manual_seed(2)
    P = torch.linalg.qr(torch.randn(300, 40, generator=gen, dtype=torch.float64))[0]
    Q = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))[0]
    X = (P * torch.logspace(0, -np.log10(cond), 40, dtype=torch.float64)) @ Q.T
    torch.testing.assert_close(X @ whitening(X), polar_factor(X), atol=1e-9, rtol=0)
    np.testing.assert_allclose((X @ whitening(X)).numpy(), ref.whiten(X.numpy()), atol=1e-8)


@pytest.mark.parametrize("T", [2, 8, 20])
def test_tsv_m_exact_matches_float64_reference_on_clip_aspect_keys(T):
    """A 4d×d key (CLIP MLP aspect), power-law spectra, shared components, float32 inputs."""
    taus = task_batch(768, 192, T, 0.5, shared=0.4, seed=T)
    base = {"visual.transformer.resblocks.0.mlp.c_fc.weight": torch.zeros(768, 192)}
    tasks = [tsv_fast.TaskVector({next(iter(base)): t}) for t in taus]
    merged = tsv_fast.merge_layers(base, tasks, solver="exact")
    want = ref.tsv_m_delta([t.double().numpy() for t in taus])
    assert ref.rel_err(ref.np64(next(iter(merged.values()))), want) < 1e-4  # issue target: 1e-3


def test_identical_tasks_merge_to_their_common_truncation():
    """A rank-deficient concatenation: the pseudo-inverse whitening keeps the common part."""
    taus = task_batch(200, 80, 1, 0.5)
    base = {"w": torch.zeros(200, 80)}
    tasks = [tsv_fast.TaskVector({"w": taus[0]}) for _ in range(4)]
    merged = tsv_fast.merge_layers(base, tasks)["w"]
    U, S, V = ref.top_k(taus[0].double().numpy(), 20)
    assert ref.rel_err(ref.np64(merged), (U * S) @ V.T) < 1e-5


def test_randomized_merge_reports_residuals():
    taus = task_batch(256, 64, 4, 0.5)
    base = {"w": torch.zeros(256, 64), "b": torch.zeros(64)}
    tasks = [tsv_fast.TaskVector({"w": t, "b": torch.ones(64)}) for t in taus]
    stats = {}
    tsv_fast.merge_layers(base, tasks, solver="randomized", stats=stats)
    assert stats["solver"] == "randomized" and set(stats["residuals"]) == {"w"}
    s = torch.linalg.svdvals(taus.double())
    optimal = (s[:, 16:].square().sum(-1) / s.square().sum(-1)).sqrt()
    np.testing.assert_array_less(optimal.numpy() * 0.999, np.array(stats["residuals"]["w"]))
    np.testing.assert_array_less(np.array(stats["residuals"]["w"]), optimal.numpy() * 1.02)


def test_compress_reports_residuals_for_every_solver():
    taus = task_batch(128, 64, 3, 0.5)
    base = {"w": torch.zeros(128, 64)}
    stats = {}
    tsv_fast.compress(base, [tsv_fast.TaskVector({"w": t}) for t in taus], stats=stats)
    s = torch.linalg.svdvals(taus.double())
    optimal = (s[:, 21:].square().sum(-1) / s.square().sum(-1)).sqrt()
    np.testing.assert_allclose(stats["residuals"]["w"], optimal.numpy(), rtol=1e-4)


def same_subspace_error(U1, U2):
    """‖U1U1ᵀ − U2U2ᵀ‖_F per matrix: zero when the spans agree, whatever the signs or rotations."""
    P1, P2 = U1.double() @ U1.double().mT, U2.double() @ U2.double().mT
    return (P1 - P2).flatten(1).norm(dim=1)


@pytest.mark.parametrize("decay,T", [(0.5, 8), (0.5, 20), (1.0, 12), (0.2, 20)])
def test_subspace_iteration_matches_full_eigh(decay, T):
    """Nearly flat spectra (decay 0.2: λ_i ∝ i^-0.4) converge slowest; the result must still be
    eigh's, in float64, to far below the float32 rounding of the inputs."""
    A = task_batch(600, 160, 4, decay, seed=T)
    k = 160 // T
    U1, S1, V1, _ = eigh_topk(A, k, torch.float64)
    U2, S2, V2, _ = subspace_topk(A, k, torch.float64)
    torch.testing.assert_close(S2, S1, rtol=1e-9, atol=0)
    assert (same_subspace_error(U1, U2) < 1e-6).all() and (same_subspace_error(V1, V2) < 1e-6).all()
    # singular vectors one by one (signs aside) where the spectrum separates them
    dots = (U1 * U2).sum(-2).abs()
    assert (dots > 1 - 1e-6).all()


@pytest.mark.parametrize("knob,value", [("WORK_SHARE", 1e-9), ("WORK_SHARE", 10.0), ("MAX_BLOCK", 30),
                                        ("SUBSPACE_OVERSAMPLE", 10), ("CHEBYSHEV_MIN_PRODUCTS", 2),
                                        ("CHEBYSHEV_MIN_PRODUCTS", 30), ("CHEBYSHEV_START", "rayleigh-ritz")])
def test_subspace_iteration_knobs_change_the_cost_not_the_result(monkeypatch, knob, value):
    """One Gram matrix at a time, all at once, or the smallest block (ℓ = k + 10, by cap or by
    oversampling): eigh's result."""
    import tsv_fast.solvers as solvers_module
    monkeypatch.setattr(solvers_module, knob, value)
    blocks = []
    block_size = solvers_module._block_size
    monkeypatch.setattr(solvers_module, "_block_size", lambda *a, **kw: blocks.append(block_size(*a, **kw)) or blocks[-1])
    A = task_batch(600, 160, 4, 0.5, seed=31)
    k = 20
    U1, S1, V1, _ = eigh_topk(A, k, torch.float64)
    U2, S2, V2, _ = subspace_topk(A, k, torch.float64)
    torch.testing.assert_close(S2, S1, rtol=1e-9, atol=0)
    assert (same_subspace_error(U1, U2) < 1e-6).all() and (same_subspace_error(V1, V2) < 1e-6).all()
    assert blocks == [k + 10 if knob in ("MAX_BLOCK", "SUBSPACE_OVERSAMPLE") else 2 * k]


def test_work_base_sizes_the_chunks_by_the_merges_largest_batch(monkeypatch):
    """A small shape in a merge with larger batches: chunks sized by WORK_SHARE of the largest batch
    (fewer Gram matrices formed apart, fewer Rayleigh–Ritz launches on a GPU); eigh's result."""
    import tsv_fast.solvers as solvers_module
    chunks = []
    gram64 = solvers_module.gram64
    monkeypatch.setattr(solvers_module, "gram64", lambda X: chunks.append(X.shape[0]) or gram64(X))
    A = task_batch(200, 64, 3, 0.5, seed=32).repeat(2, 1, 1)  # 6 matrices
    k = 8
    own = A.numel() * A.element_size()
    U1, S1, V1, _ = eigh_topk(A, k, torch.float64)
    results = {}
    for base in (None, own, 8 * own):
        chunks.clear()
        with solvers_module.work_base(base):
            topk = subspace_topk(A, k, torch.float64)
        results[base] = (list(chunks), topk)
    assert results[None][0] == results[own][0] and len(results[None][0]) > 1  # the batch's own bytes: several
    assert results[8 * own][0] == [6]  # eight times them: one chunk
    for _, (U2, S2, V2, _) in results.values():
        torch.testing.assert_close(S2, S1, rtol=1e-9, atol=0)
        assert (same_subspace_error(U1, U2) < 1e-6).all() and (same_subspace_error(V1, V2) < 1e-6).all()
    assert solvers_module._WORK_BASE.get() is None  # reset on leaving the block


def test_squeeze_moves_the_active_gram_matrices_forward_in_place():
    """Converged matrices leave the batch without a copy of the rest (``G[keep]`` held both)."""
    from tsv_fast.memory import peak_tensor_bytes
    from tsv_fast.solvers import _squeeze

    G = torch.randn(6, 40, 40, dtype=torch.float64)
    keep = torch.tensor([False, True, True, False, True, False])
    want = G[keep].clone()
    peak, out = peak_tensor_bytes(lambda: _squeeze(G, keep))
    assert torch.equal(out, want) and out.data_ptr() == G.data_ptr()
    assert peak < 40 * 40 * 8  # not even one matrix's worth allocated
    assert _squeeze(G, torch.zeros(6, dtype=torch.bool)).shape[0] == 0


def test_chebyshev_min_products_sets_the_products_between_rayleigh_ritz_steps(monkeypatch):
    """More products between two Rayleigh–Ritz steps: fewer steps (the knob is read per call)."""
    import tsv_fast.solvers as solvers_module

    steps = {}
    rayleigh_ritz = solvers_module._Batch.rayleigh_ritz
    A = task_batch(600, 160, 4, 0.5, seed=31)
    for value in (1, 30):
        monkeypatch.setattr(solvers_module, "CHEBYSHEV_MIN_PRODUCTS", value)
        calls = []
        monkeypatch.setattr(solvers_module._Batch, "rayleigh_ritz",
                            lambda self, *a: calls.append(1) or rayleigh_ritz(self, *a))
        subspace_topk(A, 20, torch.float64)
        steps[value] = len(calls)
    assert steps[1] > steps[30] >= 1
    monkeypatch.setattr(solvers_module, "CHEBYSHEV_MIN_PRODUCTS", 0)
    with pytest.raises(ValueError, match="≥ 1"):
        subspace_topk(A, 20, torch.float64)


def test_estimated_start_spares_a_rayleigh_ritz_step_not_accuracy(monkeypatch):
    """The first filter's interval from estimates instead of a Rayleigh–Ritz step on the random
    start block: fewer steps (one fewer per matrix on CLIP-shaped spectra, BENCHMARKS.md), and
    still eigh's result."""
    import tsv_fast.solvers as solvers_module

    assert solvers_module.CHEBYSHEV_START == "estimate"
    A = torch.stack(correlated_tasks(300, 200, 6, torch.Generator().manual_seed(41)))
    B = torch.stack(correlated_tasks(1024, 256, 8, torch.Generator().manual_seed(8)))  # broke down with a 1e14 gain
    k = 200 // 6  # the paper's rank: k = r / T
    exact = eigh_topk(A, k, torch.float64)
    steps = {}
    rayleigh_ritz = solvers_module._Batch.rayleigh_ritz
    householder = []  # orthonormalize's fallback where CholeskyQR2 breaks down: the first filter must not cause it
    qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda *a, **kw: householder.append(1) or qr(*a, **kw))
    for start in ("rayleigh-ritz", "estimate"):
        monkeypatch.setattr(solvers_module, "CHEBYSHEV_START", start)
        calls = []
        monkeypatch.setattr(solvers_module._Batch, "rayleigh_ritz",
                            lambda self, *a: calls.append(1) or rayleigh_ritz(self, *a))
        U, S, V, _ = subspace_topk(A, k, torch.float64)
        torch.testing.assert_close(S, exact.S, rtol=1e-9, atol=0)
        assert (same_subspace_error(U, exact.U) < 1e-6).all()
        steps[start] = len(calls)
    assert steps["estimate"] == 2 * steps["rayleigh-ritz"] // 3  # 2 steps per chunk instead of 3
    assert not householder
    torch.testing.assert_close(subspace_topk(B, 32, torch.float64).S, eigh_topk(B, 32, torch.float64).S, rtol=1e-9, atol=0)
    assert not householder
    monkeypatch.setattr(solvers_module, "CHEBYSHEV_START", "ritz")
    with pytest.raises(ValueError, match="CHEBYSHEV_START must be one of"):
        subspace_topk(A, k, torch.float64)


def test_spectrum_bounds_err_towards_a_narrower_interval():
    """λmax from below (power iteration), λmin from above (inverse iteration), both close."""
    from tsv_fast.solvers import _spectrum_bounds, orthonormalize

    tasks = correlated_tasks(200, 120, 3, torch.Generator().manual_seed(5))
    G = torch.stack([t.double().mT @ t.double() for t in tasks])
    Q = orthonormalize(G @ torch.randn(3, 120, 30, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    bounds = _spectrum_bounds(Q, G @ Q)
    w = torch.linalg.eigvalsh(Q.mT @ G @ Q)
    top, bottom = w[:, -1], w[:, 0]
    assert bounds.shape == (3, 2)
    assert (bounds[:, 0] <= top * (1 + 1e-12)).all() and (bounds[:, 0] >= 0.9 * top).all()
    assert (bounds[:, 1] >= bottom * (1 - 1e-12)).all() and (bounds[:, 1] <= 1.5 * bottom).all()
    singular = torch.zeros(1, 120, 120, dtype=torch.float64)  # Cholesky fails: λmin reported as 0
    assert _spectrum_bounds(Q[:1], singular @ Q[:1])[0, 1] == 0


def test_block_size_is_capped_but_never_below_k_plus_10():
    from tsv_fast.solvers import _block_size
    assert _block_size(50, 1024) == 100 and _block_size(50, 1024, cap=118) == 100  # 2k under the cap
    assert _block_size(60, 1024, cap=118) == 118 and _block_size(108, 1024, cap=118) == 118
    assert _block_size(109, 1024) == 218  # no cap: 2k
    assert _block_size(109, 1024, cap=118) == 119 and _block_size(128, 1024, cap=118) == 138  # k + 10 > cap
    assert _block_size(60, 1024, oversample=5, cap=100) == 65  # an explicit oversample is not capped
    assert _block_size(60, 100, cap=118) == 100  # never more than the short side


def test_block_cap_auto_is_the_shared_memory_order_on_a_gpu_only(monkeypatch):
    import tsv_fast.solvers as solvers_module
    assert solvers_module.MAX_BLOCK == "auto" and solvers_module._block_cap(torch.device("cpu")) is None
    monkeypatch.setattr(ops, "eigh_shared_order", lambda device, dtype: 118)
    assert solvers_module._block_cap(torch.device("cuda")) == 118
    monkeypatch.setattr(solvers_module, "MAX_BLOCK", 64)
    assert solvers_module._block_cap(torch.device("cpu")) == 64


def test_subspace_iteration_falls_back_to_eigh_when_it_has_not_converged():
    A = task_batch(300, 100, 3, 0.5, seed=3)
    exact = eigh_topk(A, 10, torch.float64)
    for iters in (0, 1):  # no step at all, or one: nothing has converged to 1e-10
        U, S, V, _ = subspace_topk(A, 10, torch.float64, max_iters=iters)
        torch.testing.assert_close(S, exact.S, rtol=1e-12, atol=0)
        assert (same_subspace_error(U, exact.U) < 1e-9).all()


def test_subspace_iteration_with_the_jacobi_kernel_for_the_small_problems():
    """The GPU route solves its ℓ×ℓ problems with the compiled batched Jacobi op; its CPU twin
    runs the same algorithm, so this checks the conventions (order, layout) of that hand-off."""
    A = task_batch(400, 120, 3, 0.5, seed=4)
    exact = eigh_topk(A, 12, torch.float64)
    U, S, V, _ = subspace_topk(A, 12, torch.float64, small_eigh=ops.batched_eigh)
    torch.testing.assert_close(S, exact.S, rtol=1e-9, atol=0)
    assert (same_subspace_error(U, exact.U) < 1e-6).all()


@pytest.mark.skipif(not ops.load_extension()[0], reason="needs the compiled extension (the kernel's CPU emulation)")
@pytest.mark.parametrize("threads", [0, 1024])
def test_subspace_iteration_with_the_gpu_rayleigh_ritz_settings(monkeypatch, threads):
    """The GPU's Rayleigh–Ritz eigensolver as configured (the Jacobi op stopping at
    ``RAYLEIGH_RITZ_TOL``, ``JACOBI_THREADS``), run by the kernel's CPU emulation: on nearly flat
    spectra (T = 20) the result is still eigh's, because only pairs that pass the residual test
    are kept."""
    from tsv_fast import solvers

    assert solvers.RAYLEIGH_RITZ_TOL == 1e-12 and solvers.JACOBI_THREADS == 0
    monkeypatch.setattr(solvers, "JACOBI_THREADS", threads)
    calls = []

    def emulated(A, max_sweeps=30, tol=0.0, threads=0):
        calls.append((tol, threads))
        return torch.ops.tsv_fast.batched_eigh_emulated(A, max_sweeps, tol, -1, threads)

    monkeypatch.setattr(ops, "batched_eigh", emulated)
    A = task_batch(400, 160, 3, 0.2, seed=20)
    k = 8
    exact = eigh_topk(A, k, torch.float64)
    full_eigh = []  # the fallback for matrices that never pass the residual test: must not run
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda G: full_eigh.append(G.shape) or eigh(G))
    U, S, V, _ = subspace_topk(A, k, torch.float64, small_eigh=solvers._jacobi_eigh)
    assert not full_eigh
    torch.testing.assert_close(S, exact.S, rtol=1e-9, atol=0)
    assert (same_subspace_error(U, exact.U) < 1e-6).all() and (same_subspace_error(V, exact.V) < 1e-6).all()
    assert calls and set(calls) == {(1e-12, threads)}


def test_exact_routes_by_device(monkeypatch):
    from tsv_fast import solvers

    A = task_batch(200, 64, 2, 0.5)
    calls = []
    monkeypatch.setitem(solvers.EXACT_ROUTE, "cpu", "subspace")
    monkeypatch.setattr(solvers, "subspace_topk", lambda *a, **kw: calls.append("subspace") or subspace_topk(*a, **kw))
    U, S, V, _ = exact_topk(A, 8)
    assert calls == ["subspace"]
    torch.testing.assert_close(S, eigh_topk(A, 8).S, rtol=1e-6, atol=0)


def test_exact_on_cpu_routes_by_block_size(monkeypatch):
    """LAPACK eigh while ℓ = 2k is a large share of the short side, subspace iteration once ℓ ≤ q/6."""
    from tsv_fast import solvers

    assert solvers.EXACT_ROUTE["cpu"] == "by-size"
    A = task_batch(300, 120, 2, 0.5)
    calls = []
    monkeypatch.setattr(solvers, "subspace_topk", lambda *a, **kw: calls.append("subspace") or subspace_topk(*a, **kw))
    monkeypatch.setattr(solvers, "eigh_topk", lambda *a, **kw: calls.append("eigh") or eigh_topk(*a, **kw))
    for k in (10, 11, 30):  # ℓ = 20 (6ℓ = 120 ≤ q), 22 and 60
        exact_topk(A, k)
    assert calls == ["subspace", "eigh", "eigh"]


def test_exact_on_a_gpu_routes_by_the_capped_block(monkeypatch):
    """On a GPU ℓ is capped (at the Jacobi kernel's shared-memory order, or k + 10), so subspace
    iteration runs up to larger k than on a CPU; eigh once even the capped ℓ exceeds q/4 (the
    break-even measured on an H200 lies between ℓ = q/4.8 and q/3.8)."""
    from tsv_fast import solvers

    assert solvers.EXACT_ROUTE["cuda"] == "by-size"
    monkeypatch.setattr(ops, "eigh_shared_order", lambda device, dtype: 118 if device.type == "cuda" else None)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    # ViT-L/14 (q = 1024): T = 20, 14, 8, 6, 5 (ℓ = 102, 118, 138, 180, 214) subspace; T = 4 (ℓ = 266) eigh
    assert [solvers.exact_route(1024 // T, 1024, gpu) for T in (20, 14, 8, 6, 5, 4)] == \
        ["subspace"] * 5 + ["eigh"]
    assert [solvers.exact_route(1024 // T, 1024, cpu) for T in (20, 14, 8)] == ["subspace", "subspace", "eigh"]  # ℓ = 2k
    # ViT-B/32 (q = 768): T = 8, 6 (ℓ = 118, 138) subspace; T = 4 (ℓ = 202) eigh
    assert [solvers.exact_route(768 // T, 768, gpu) for T in (8, 6, 4)] == ["subspace", "subspace", "eigh"]
    assert solvers.exact_route(256, 1064, gpu) == "subspace" and solvers.exact_route(256, 1063, gpu) == "eigh"
    monkeypatch.setitem(solvers.EXACT_ROUTE, "cuda", "subspace")
    assert solvers.exact_route(1024 // 4, 1024, gpu) == "subspace"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("solver", ["exact", "subspace", "randomized"])
def test_solvers_on_cuda_match_cpu_eigh(solver):
    A = task_batch(512, 128, 6, 0.5, seed=7)
    k = 128 // 8
    want = eigh_topk(A, k, torch.float64)
    U, S, V, _ = SOLVERS[solver](A.cuda(), k)
    if solver == "randomized":
        assert (rank_k_errors(A, U.cpu(), S.cpu(), V.cpu()) <= optimal_errors(A, k) * 1.02).all()
    else:
        torch.testing.assert_close(S.cpu().double(), want.S, rtol=1e-5, atol=0)
        assert (same_subspace_error(U.cpu(), want.U) < 1e-4).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_subspace_on_cuda_matches_cpu_eigh_at_vit_b32_scale():
    """ViT-B/32 width, T = 8: k = 96 and ℓ = 118 (shared memory) over a batch of 24; and ViT-L/14
    width, T = 8: k = 128, ℓ = k + 10 = 138 > 118, the Jacobi kernel's global-memory mode."""
    for m, n, k in ((3072, 768, 96), (4096, 1024, 128)):
        A = task_batch(m, n, 24 if n == 768 else 8, 0.5, seed=8)
        want = eigh_topk(A, k, torch.float64)
        U, S, V, _ = subspace_topk(A.cuda(), k, torch.float64)
        torch.testing.assert_close(S.cpu(), want.S, rtol=1e-8, atol=0)
        for got, ref_vecs in ((U.cpu(), want.U), (V.cpu(), want.V)):  # ‖P1 − P2‖_F without m×m projectors
            overlap = (got.mT @ ref_vecs).square().sum((-2, -1))
            assert ((2 * (k - overlap)).clamp(min=0).sqrt() < 1e-4).all()


@pytest.mark.parametrize("decay,T", [(0.5, 8), (0.2, 20), (1.0, 8)])
def test_chebyshev_filter_converges_without_the_eigh_fallback_and_in_fewer_steps(monkeypatch, decay, T):
    """Both filters give the same exact result; Chebyshev must get there on its own (no full
    eigh fallback) with at most half the orthonormalisations of the power form on flat
    spectra, and no more on steep ones."""
    from tsv_fast import solvers

    A = task_batch(768, 192, 4, decay, seed=9)
    k = 192 // T
    counts = {"orthonormalize": 0, "full eigh": 0}
    orth, eigh = solvers.orthonormalize, torch.linalg.eigh
    monkeypatch.setattr(solvers, "orthonormalize", lambda Y, *passes: counts.__setitem__(
        "orthonormalize", counts["orthonormalize"] + 1) or orth(Y, *passes))
    monkeypatch.setattr(torch.linalg, "eigh", lambda H: counts.__setitem__(
        "full eigh", counts["full eigh"] + (H.shape[-1] == 192)) or eigh(H))
    results = {}
    for filter in ("power", "chebyshev"):
        counts.update({"orthonormalize": 0, "full eigh": 0})
        results[filter] = subspace_topk(A, k, torch.float64, filter=filter), dict(counts)
    (cheb, cheb_counts), (_, power_counts) = results["chebyshev"], results["power"]
    assert cheb_counts["full eigh"] == 0
    limit = power_counts["orthonormalize"] // 2 if decay < 1 else power_counts["orthonormalize"]
    assert cheb_counts["orthonormalize"] <= limit, (cheb_counts, power_counts)
    want = eigh_topk(A, k, torch.float64)
    torch.testing.assert_close(cheb.S, want.S, rtol=1e-9, atol=0)
    assert (same_subspace_error(cheb.V, want.V) < 1e-5).all()


@pytest.mark.parametrize("filter", ["chebyshev", "power"])
def test_subspace_handles_rank_deficient_and_zero_matrices(filter):
    """A rank-3 matrix (k = 5: two directions are rounding noise) and a zero one: finite factors,
    and the rank-k product equals eigh's (the noise directions carry nothing)."""
    g = torch.Generator().manual_seed(0)
    low = torch.randn(200, 3, generator=g) @ torch.randn(3, 100, generator=g)
    A = torch.stack([low, torch.zeros(200, 100), torch.randn(200, 100, generator=g)])
    U, S, V, _ = subspace_topk(A, 5, torch.float64, filter=filter)
    want = eigh_topk(A, 5, torch.float64)
    assert torch.isfinite(U).all() and torch.isfinite(V).all() and torch.isfinite(S).all()
    got, expected = (U * S.unsqueeze(-2)) @ V.mT, (want.U * want.S.unsqueeze(-2)) @ want.V.mT
    assert (got - expected).abs().max() < 1e-9 * low.abs().max()


@pytest.mark.parametrize("shape,blocks", [((3, 50, 20), None), ((2, 7, 1), None), ((2, 33, 13), 4), ((2, 40, 30), 7),
                                          ((1, 9, 64), 2), ((2, 300, 97), 1), ((1, 40, 300), None),
                                          ((1, 20, 600), None), ((2, 0, 5), None)])
def test_gram64_is_the_float64_gram_matrix_from_upper_blocks(shape, blocks):
    """Only the upper column blocks are multiplied (5/8 of the GEMM work at 4 blocks); the result
    is XᵀX in float64 to rounding (both triangles: LAPACK's eigh reads one)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tsv_fast.solvers import GRAM_BLOCKS, gram64

    class Flops(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.baddbmm_.default, torch.ops.aten.baddbmm.default):
                a, b = args[1], args[2]
                Flops.total += a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
            return func(*args, **(kwargs or {}))

    X = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    with Flops():
        G = gram64(X, blocks)
    exact = X.double().mT @ X.double()
    torch.testing.assert_close(G, exact, rtol=0, atol=1e-13 * exact.abs().max().item())
    B, p, q = shape
    b = min(blocks, q) if blocks else max(1, min(GRAM_BLOCKS, q // 128))  # default: blocks ≥ 128 wide
    share = sum((q * (i + 1) // b - q * i // b) * (q - q * i // b) for i in range(b)) / q ** 2
    assert Flops.total == B * p * q * q * share and (b == 1 or share < 1)


@pytest.mark.parametrize("shape,blocks", [((1020, 1020), None), ((2, 3, 300, 256), None), ((4, 30, 17), 3),
                                          ((2, 9, 9), 1), ((5, 1), None), ((2, 0, 5), None)])
def test_symmetric_gram_is_xtx_with_mirrored_blocks(shape, blocks):
    """Newton–Schulz's XᵀX (any leading dims, X's dtype): XᵀX in float64 to rounding; the blocks
    below the diagonal blocks are copies of those above."""
    from tsv_fast.solvers import symmetric_gram

    X = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)), dtype=torch.float64)
    G = symmetric_gram(X, blocks)
    exact = X.mT @ X
    assert G.shape == exact.shape and G.dtype == torch.float64
    torch.testing.assert_close(G, exact, rtol=0, atol=1e-13 * exact.abs().max().item())
    q = shape[-1]
    b = blocks or max(1, min(4, q // 128))
    for i in range(1, b):  # rows of block i, columns left of it: mirrored
        lo, hi = q * i // b, q * (i + 1) // b
        assert torch.equal(G[..., lo:hi, :lo], G[..., :lo, lo:hi].mT)
    assert symmetric_gram(X.float()).dtype == torch.float32


@pytest.mark.parametrize("degree", [1, 2, 5, 16])
def test_chebyshev_filter_is_the_scaled_chebyshev_polynomial_of_g(degree):
    """p(G) V with p(λ) = T_d((2λ − b)/b) / T_d((2θ1 − b)/b), from G's eigendecomposition: the
    interval [0, b] damped, 1 at the top Ritz value (independent of the three-term recurrence)."""
    from tsv_fast.solvers import chebyshev_filter

    g = torch.Generator().manual_seed(33)
    X = torch.randn(2, 150, 60, generator=g, dtype=torch.float64)
    G = X.mT @ X
    V = torch.linalg.qr(torch.randn(2, 60, 12, generator=g, dtype=torch.float64)).Q
    ritz = torch.linalg.eigvalsh(V.mT @ G @ V).flip(-1)
    top, b = ritz[:, :1], ritz[:, -1:]
    w, P = torch.linalg.eigh(G)
    p = _chebyshev_t(degree, (2 * w - b) / b) / _chebyshev_t(degree, (2 * top - b) / b)
    want = P @ (p.unsqueeze(-1) * (P.mT @ V))
    got = chebyshev_filter(G, V, G @ V, ritz, degree)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * float(want.abs().max()))


def _chebyshev_t(d, y):
    """T_d(y) by the three-term recurrence, valid inside and outside [−1, 1]."""
    t0, t1 = torch.ones_like(y), y
    for _ in range(d - 1):
        t0, t1 = t1, 2 * y * t1 - t0
    return t1 if d else t0


@pytest.mark.parametrize("use", [True, False], ids=["scipy", "torch"])
def test_symmetric_eigh_is_torch_eigh_by_either_library(monkeypatch, use):
    """SciPy's LAPACK (syevd; syevr for the top pairs) or torch.linalg.eigh: the same conventions
    (ascending, vectors in columns, batched), checked against float64 definitions: G V = V diag(w),
    VᵀV = I, eigenvalues those of torch, the top pairs the largest ones, on spectra with a
    repeated eigenvalue and a zero one."""
    pytest.importorskip("scipy")
    from tsv_fast import solvers

    monkeypatch.setattr(solvers, "USE_SCIPY_EIGH", use)
    gen = torch.Generator().manual_seed(9)
    n = 60
    Q = torch.linalg.qr(torch.randn(2, 3, n, n, generator=gen, dtype=torch.float64)).Q
    spectrum = torch.logspace(0, -6, n, dtype=torch.float64).flip(0).clone()
    spectrum[:2], spectrum[-4:-2] = 0.0, spectrum[-2]  # a zero pair and a repeated value near the top
    G = (Q * spectrum) @ Q.mT
    want = torch.linalg.eigvalsh(G)
    for top in (None, 7, 0, n + 5):
        w, V = solvers.symmetric_eigh(G, top)
        k = n if top is None else min(top, n)
        assert w.shape == (2, 3, k) and V.shape == (2, 3, n, k) and w.dtype == V.dtype == torch.float64
        torch.testing.assert_close(w, want[..., n - k:], rtol=0, atol=1e-13)
        torch.testing.assert_close(G @ V, V * w.unsqueeze(-2), rtol=0, atol=1e-13)
        torch.testing.assert_close(V.mT @ V, torch.eye(k, dtype=torch.float64).expand(2, 3, k, k), rtol=0, atol=1e-13)
    w32, V32 = solvers.symmetric_eigh(G.float(), 3)  # float32 (and any GPU tensor): torch's
    assert w32.dtype == torch.float32 and V32.shape == (2, 3, n, 3)
    bad = G[0, 0].clone()
    bad[5, 3] = float("nan")  # SciPy refuses it; torch decides, as it did before
    torch.testing.assert_close(solvers.symmetric_eigh(bad)[0], torch.linalg.eigh(bad)[0], equal_nan=True)


def test_scipy_eigh_runs_on_one_blas_thread_per_matrix(monkeypatch):
    """With OpenBLAS's own threads, any other load on the machine left each syevd waiting on
    descheduled spinning threads (10 s instead of 0.07 s for 768×768): each call must see one
    BLAS thread, the batch spread over torch's threads, and the caller's setting come back."""
    pytest.importorskip("scipy")
    pytest.importorskip("threadpoolctl")
    import threading

    import scipy.linalg
    from threadpoolctl import threadpool_info, threadpool_limits

    from tsv_fast import solvers

    monkeypatch.setattr(solvers, "USE_SCIPY_EIGH", True)
    seen, real = [], scipy.linalg.eigh

    def recording(*args, **kwargs):
        seen.append(({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"},
                     threading.get_ident()))
        return real(*args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "eigh", recording)
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(6, 40, 40, generator=gen, dtype=torch.float64)
    G = X @ X.mT
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threadpool_limits(2, user_api="blas"):
            w, V = solvers.symmetric_eigh(G, 5)
            assert {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} == {2}
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 6 and all(n == {1} for n, _ in seen)
    assert len({ident for _, ident in seen} - {threading.get_ident()}) >= 1  # on worker threads
    torch.testing.assert_close(w, torch.linalg.eigvalsh(G)[..., -5:], rtol=0, atol=1e-10)
    torch.testing.assert_close(G @ V, V * w.unsqueeze(-2), rtol=0, atol=1e-10)
    monkeypatch.setattr(solvers, "SCIPY_ONE_BLAS_THREAD", False)  # the old way: the caller's threads
    seen.clear()
    with threadpool_limits(2, user_api="blas"):
        solvers.symmetric_eigh(G[:2])
    assert [n for n, _ in seen] == [{2}, {2}]


def test_scipy_eigh_auto_follows_the_openmp_wait_policy(monkeypatch):
    pytest.importorskip("scipy")
    from tsv_fast import solvers

    assert solvers.USE_SCIPY_EIGH == "auto"
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert solvers._scipy_linalg() is not None
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert solvers._scipy_linalg() is None
    monkeypatch.setattr(solvers, "USE_SCIPY_EIGH", True)
    assert solvers._scipy_linalg() is not None


def test_symmetric_eigh_when_syevr_answers_short_or_grad_is_required(monkeypatch):
    """syevr returned 28 of 32 pairs when equal eigenvalues straddled the cut (float64 tasks with
    a flat top spectrum), and a merge crashed; tensors that require grad cannot go to NumPy."""
    pytest.importorskip("scipy")
    from tsv_fast import solvers

    monkeypatch.setattr(solvers, "USE_SCIPY_EIGH", True)
    gen = torch.Generator().manual_seed(1)
    n, k = 256, 32
    found = False
    for _ in range(40):  # eigenvalues exactly 1 across the cut: syevr is short on some of them
        Q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
        s = torch.ones(n, dtype=torch.float64)
        s[200:] = 0.5
        G = (Q * s) @ Q.T
        import scipy.linalg

        found |= len(scipy.linalg.eigh(G.numpy(), subset_by_index=[n - k, n - 1], driver="evr")[0]) != k
        w, V = solvers.symmetric_eigh(G, k)
        assert w.shape == (k,) and V.shape == (n, k)
        torch.testing.assert_close(w, torch.ones(k, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(G @ V, V * w, rtol=0, atol=1e-12)
        if found:
            break
    assert found  # the case was exercised
    A = torch.randn(1, 40, 30, dtype=torch.float64, requires_grad=True)
    w, V = solvers.symmetric_eigh(A.mT @ A, 5)
    w.sum().backward()  # torch's eigh, with its backward
    assert A.grad is not None

"""Tests for tsv_fast.ops.batched_cholesky_inverse (CholeskyQR's R⁻¹ in one launch): the compiled
CPU op, its emulation of the CUDA kernel's threads, the pure-PyTorch fallback and (when a GPU is
visible) the CUDA kernel, against float64 LAPACK (Cholesky, then a dense inverse)."""

import pytest
import torch

from op_checks import refuses_grad_inputs
from tsv_fast import ops, solvers

EXT_OK, EXT_WHY = ops.load_extension()
needs_ext = pytest.mark.skipif(not EXT_OK, reason=EXT_WHY)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
needs_cuda_ext = pytest.mark.skipif(
    not (EXT_OK and ops.has_cuda_kernels()), reason="extension built without CUDA kernels"
)
EPS = {torch.float64: 2.220446049250313e-16, torch.float32: 1.1920928955078125e-07}


def gram(n, B=3, kind="graded", seed=0, rows=None):
    """``YᵀY`` (float64) of blocks Y like those CholeskyQR sees: ``graded``, Gaussian columns scaled
    by a power law over 4 decades with mixed directions (a filtered block, κ(G) ~ 1e8); ``flat``,
    nearly orthonormal (the second pass); ``wide``, a well-conditioned Gaussian block."""
    g = torch.Generator().manual_seed(seed)
    rows = rows or max(2 * n, 8)
    Y = torch.randn(B, rows, n, generator=g, dtype=torch.float64)
    if kind == "graded":
        Q = torch.linalg.qr(torch.randn(B, n, n, generator=g, dtype=torch.float64)).Q
        Y = (Y * torch.logspace(0, -4, n, dtype=torch.float64)) @ Q
    elif kind == "flat":
        Y = torch.linalg.qr(Y).Q + 1e-6 * torch.randn(Y.shape, generator=g, dtype=torch.float64)
    return Y.mT @ Y


def reference(G):
    """float64 LAPACK: R from Cholesky of the symmetric matrix G's upper triangle defines, then R⁻¹ by a
    dense inverse (a different algorithm from the op's back substitution)."""
    G = G.double()
    sym = G.triu() + G.triu(1).mT
    R = torch.linalg.cholesky(sym).mT
    return torch.linalg.inv(R)


def check_inverse(G, Rinv, info, slack=1.0):
    """R⁻¹ upper triangular, within ~n·κ(G)·eps of the reference, and R⁻ᵀ G R⁻¹ = I to ~n·κ(G)·eps
    (what CholeskyQR needs: Q = Y R⁻¹ orthonormal). κ(G), not κ(R): the Cholesky factor of a
    perturbed G moves by up to κ(G)·eps (measured: LAPACK's own R⁻¹ differs from the reference
    by 7·n·κ(R)·eps at n = 7 on the graded kind); on the wide and flat kinds κ(G) is under 20."""
    assert info.dtype == torch.int32 and (info == 0).all()
    n = G.shape[-1]
    ref = reference(G)
    X = Rinv.double().cpu()
    assert (X.tril(-1) == 0).all()
    R = torch.linalg.inv(ref)
    kappa = torch.linalg.cond(R)
    eps = EPS[Rinv.dtype]
    err = torch.linalg.matrix_norm(X - ref) / torch.linalg.matrix_norm(ref)
    assert (err <= slack * 4 * n * kappa.square() * eps).all(), (err, kappa)
    sym = G.double().cpu().triu() + G.double().cpu().triu(1).mT
    resid = torch.linalg.matrix_norm(X.mT @ sym @ X - torch.eye(n, dtype=torch.float64), ord=2)
    assert (resid <= slack * 4 * n * kappa.square() * eps).all(), (resid, kappa)


def run(impl, G, threads=0):
    if impl == "op":
        return torch.ops.tsv_fast.batched_cholesky_inverse(G, threads)
    if impl == "fallback":
        return ops._cholesky_inverse_torch(G, threads)
    return ops.batched_cholesky_inverse(G, threads)


IMPLS = [pytest.param("op", marks=needs_ext), "fallback", "public"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["graded", "flat", "wide"])
@pytest.mark.parametrize("n", [1, 2, 7, 33, 102, 170])
def test_against_float64_lapack(impl, kind, n):
    G = gram(n, B=2 if n > 100 else 3, kind=kind, seed=n)
    Rinv, info = run(impl, G)
    check_inverse(G, Rinv, info)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [5, 64])
def test_float32(impl, n):
    G = gram(n, kind="wide", seed=3).float()
    Rinv, info = run(impl, G)
    assert Rinv.dtype == torch.float32
    check_inverse(G, Rinv, info, slack=2.0)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("n", [1, 31, 102])
def test_emulated_threads_agree_bitwise(n, dtype):
    """Each entry sees the same operations in the same order whatever the kernel's deal of rows and
    columns to threads, so every simulated block size gives the plain algorithm's result bit for bit:
    this runs the CUDA kernel's indexing (groups of 32, rows cyclic over groups) on the CPU."""
    G = gram(n, B=2, kind="graded" if dtype == torch.float64 else "wide", seed=11).to(dtype)
    R0, info0 = torch.ops.tsv_fast.batched_cholesky_inverse(G, 0)
    check_inverse(G, R0, info0, slack=2.0)
    for threads in (1, 2, 8, 32, 64, 256, 1024):
        R, info = torch.ops.tsv_fast.batched_cholesky_inverse(G, threads)
        assert torch.equal(R, R0) and torch.equal(info, info0), threads


@pytest.mark.parametrize("impl", IMPLS)
def test_lower_triangle_is_never_read(impl):
    G = gram(12, seed=5)
    junk = G.triu() + torch.full_like(G, float("nan")).tril(-1)
    Rinv, info = run(impl, G)
    Rj, infoj = run(impl, junk)
    assert torch.equal(info, infoj) and torch.allclose(Rinv, Rj, rtol=1e-12, atol=0)


def not_positive_definite():
    """Four matrices: fine, fails at pivot 4 (G's leading 4×4 minor is indefinite), zero (pivot 1),
    NaN in the upper triangle."""
    g = torch.Generator().manual_seed(2)
    A = torch.randn(4, 6, 6, generator=g, dtype=torch.float64)
    G = A @ A.mT + 6 * torch.eye(6, dtype=torch.float64)
    G[1, 3, 3] -= 100.0
    G[2] = 0
    G[3, 1, 4] = float("nan")
    return G


@pytest.mark.parametrize("impl", IMPLS)
def test_failed_pivot_info_and_nan(impl):
    G = not_positive_definite()
    Rinv, info = run(impl, G)
    _, lapack_info = torch.linalg.cholesky_ex(G[:3], upper=True)  # G[3]: where LAPACK notices NaN varies
    assert info[:3].tolist() == lapack_info.tolist() == [0, 4, 1]
    assert info[3] > 0
    assert Rinv[1:].isnan().all()
    check_inverse(G[:1], Rinv[:1], info[:1])  # the batch's other matrices are unaffected


def failing_every_other(B=200, n=3):
    """Matrices that fail at pivot 1 (zero) alternating with the identity: in a batch split into
    chunks of two or more (the CPU op's parallel_for), a fine matrix follows a failed one."""
    G = torch.eye(n, dtype=torch.float64).repeat(B, 1, 1)
    G[::2] = 0
    return G


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("threads", [0, 32])
def test_info_is_reset_for_each_matrix(impl, threads):
    Rinv, info = run(impl, failing_every_other(), threads)
    assert info[::2].eq(1).all() and info[1::2].eq(0).all()
    assert Rinv[::2].isnan().all() and torch.equal(Rinv[1::2], torch.eye(3, dtype=torch.float64).expand(100, 3, 3))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("threads", [0, 64])
def test_failed_pivot_info_across_lapack_blocks(impl, threads):
    """LAPACK's potrf factors blocks of columns (64 in the reference implementation), the op one
    column at a time: a clearly failing pivot is the same one either way, also at a block's edges."""
    pivots = [1, 2, 63, 64, 65, 97, 128, 129, 130]
    g = torch.Generator().manual_seed(7)
    A = torch.randn(len(pivots) + 1, 130, 130, generator=g, dtype=torch.float64)
    G = A @ A.mT / 130 + torch.eye(130, dtype=torch.float64)
    for b, p in enumerate(pivots):
        G[b, p - 1, p - 1] -= 1e3
    _, lapack_info = torch.linalg.cholesky_ex(G, upper=True)
    Rinv, info = run(impl, G, threads)
    assert info.tolist() == lapack_info.tolist() == pivots + [0]
    assert Rinv[:-1].isnan().all() and Rinv[-1].isfinite().all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(0, 5, 5), (3, 0, 0), (0, 0)])
def test_empty(impl, shape):
    G = torch.empty(shape, dtype=torch.float64)
    Rinv, info = run(impl, G)
    assert Rinv.shape == G.shape and info.shape == G.shape[:-2] and info.dtype == torch.int32


@pytest.mark.parametrize("impl", IMPLS)
def test_unbatched_and_noncontiguous(impl):
    G = gram(9, B=2, seed=4)
    Rinv, info = run(impl, G[1])
    assert Rinv.shape == (9, 9) and info.shape == ()
    check_inverse(G[1:], Rinv[None], info[None])
    Gt = G.mT.contiguous().mT  # same values, transposed strides
    R2, _ = run(impl, Gt)
    assert torch.allclose(R2, run(impl, G)[0], rtol=1e-13, atol=0)


BAD = [
    ("1-D", lambda: torch.ones(4, dtype=torch.float64), "G must be 2-D .n, n. or 3-D batched"),
    ("not square", lambda: torch.ones(2, 3, 4, dtype=torch.float64), "G must be square"),
    ("int", lambda: torch.ones(3, 3, dtype=torch.int64), "G must have dtype float32 or float64"),
    ("half", lambda: torch.ones(3, 3, dtype=torch.float16), "G must have dtype float32 or float64"),
    ("too large", lambda: torch.empty(0, 46341, 46341, dtype=torch.float64),
     "matrices of order n = 46341 are too large .at most 46340."),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("desc,build,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_clear_errors(impl, desc, build, msg):
    with pytest.raises(ValueError, match=f"batched_cholesky_inverse: {msg}"):
        run(impl, build())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("threads", [-1, 3, 48, 2048])
def test_bad_threads(impl, threads):
    with pytest.raises(ValueError, match="threads must be 0 .the default. or a power of two from 1 to 1024"):
        run(impl, gram(3), threads)


def test_public_wrapper_falls_back_for_autograd():
    G = gram(5, B=1).requires_grad_()
    Rinv, info = ops.batched_cholesky_inverse(G)
    Rinv.sum().backward()
    assert G.grad is not None and (info == 0).all()


@needs_ext
def test_public_wrapper_uses_the_op_without_grad_mode(monkeypatch):
    G = gram(5, B=2).requires_grad_()
    monkeypatch.setattr(ops, "_cholesky_inverse_torch", None)  # the fallback must not be reached
    with torch.no_grad():
        Rinv, info = ops.batched_cholesky_inverse(G)
    assert not Rinv.requires_grad and torch.equal(Rinv, torch.ops.tsv_fast.batched_cholesky_inverse(G.detach())[0])


@needs_ext
def test_op_refuses_inputs_that_require_grad_and_passes_opcheck():
    G = gram(6, B=2).requires_grad_()
    Rinv, info = refuses_grad_inputs("batched_cholesky_inverse", (G,), "G")
    assert not Rinv.requires_grad
    check_inverse(G.detach(), Rinv, info)
    op = torch.ops.tsv_fast.batched_cholesky_inverse.default
    torch.library.opcheck(op, (gram(6, B=2),))
    torch.library.opcheck(op, (gram(5, B=1)[0].float(),), {"threads": 64})


@needs_ext
def test_fake_tensor_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        Rinv, info = torch.ops.tsv_fast.batched_cholesky_inverse(torch.empty(7, 12, 12, dtype=torch.float64))
        assert Rinv.shape == (7, 12, 12) and info.shape == (7,) and info.dtype == torch.int32
        with pytest.raises(ValueError, match="G must be square"):
            torch.ops.tsv_fast.batched_cholesky_inverse(torch.empty(3, 4))


def _bytes(n, size):
    return (n * n + n + 1) * size + 4  # A, tmp (n + 1) and info, as kernels/cholesky_inverse.h


@needs_ext
@pytest.mark.parametrize("smem", [0, 100, 48 * 1024, 166912, 232448])
def test_shared_order_is_the_largest_n_that_fits(smem):
    for float64, size in ((True, 8), (False, 4)):
        n = torch.ops.tsv_fast.batched_cholesky_inverse_shared_order(smem, float64)
        assert (n == 0 or _bytes(n, size) <= smem) and _bytes(n + 1, size) > smem
    assert torch.ops.tsv_fast.batched_cholesky_inverse_shared_order(232448, True) == 169  # H100/H200
    assert torch.ops.tsv_fast.batched_cholesky_inverse_shared_order(166912, True) == 143  # A100
    assert ops.cholesky_inverse_shared_order(torch.device("cpu")) is None


# ---------------------------------------------------------------------------
# CholeskyQR through the fused op (solvers.orthonormalize), on the CPU by declaring the CPU a
# fused device: on a GPU this is the default route.

@needs_ext
@pytest.mark.parametrize("passes", [1, 2])
def test_orthonormalize_through_the_fused_op(monkeypatch, passes):
    g = torch.Generator().manual_seed(9)
    Y = (torch.randn(6, 300, 40, generator=g, dtype=torch.float64) * torch.logspace(0, -4, 40, dtype=torch.float64)
         ) @ torch.randn(6, 40, 40, generator=g, dtype=torch.float64)
    library = solvers.orthonormalize(Y, passes)
    calls = []
    real = ops.batched_cholesky_inverse
    monkeypatch.setattr(ops, "batched_cholesky_inverse", lambda G, threads=0: calls.append(G.shape) or real(G))
    monkeypatch.setattr(ops, "cholesky_inverse_shared_order", lambda device, dtype: 64)
    monkeypatch.setattr(solvers, "FUSED_CHOLESKY_INVERSE", ("cpu",))
    Q = solvers.orthonormalize(Y, passes)
    assert calls == [(6, 40, 40)] * passes
    eye = torch.eye(40, dtype=torch.float64)
    ortho, ortho_library = (torch.linalg.matrix_norm(X.mT @ X - eye).amax() for X in (Q, library))
    assert ortho <= (1e-13 if passes == 2 else 1e-5) and ortho <= 2 * ortho_library + 1e-15  # κ(Y) ~ 4e5
    assert torch.linalg.matrix_norm(Q - library).amax() <= (1e-9 if passes == 2 else 1e-5)
    monkeypatch.setattr(ops, "cholesky_inverse_shared_order", lambda device, dtype: 39)  # too large: library
    calls.clear()
    solvers.orthonormalize(Y, passes)
    assert calls == []


@needs_ext
def test_orthonormalize_falls_back_to_qr_when_the_fused_op_fails(monkeypatch):
    """A rank-deficient block: the fused op reports the failed pivot and CholeskyQR takes Householder QR.
    A zero column makes pivot 4 exactly 0 (a duplicated one leaves it to rounding, which may pass)."""
    Y = torch.randn(4, 50, 10, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    Y[1, :, 3] = 0
    monkeypatch.setattr(ops, "cholesky_inverse_shared_order", lambda device, dtype: 64)
    monkeypatch.setattr(solvers, "FUSED_CHOLESKY_INVERSE", ("cpu",))
    assert ops.batched_cholesky_inverse(Y.mT @ Y)[1].tolist() == [0, 4, 0, 0]
    Q = solvers.orthonormalize(Y)
    assert torch.equal(Q, torch.linalg.qr(Y).Q)


# ---------------------------------------------------------------------------
# CUDA kernel (float64 n ≤ 169 in shared memory on sm_90, ≤ 143 on sm_80; n = 200 in global memory)

CUDA_CASES = [(1, torch.float64, "wide"), (33, torch.float32, "wide"), (102, torch.float64, "graded"),
              (102, torch.float64, "flat"), (150, torch.float64, "graded"), (200, torch.float64, "graded"),
              (180, torch.float32, "wide")]


@needs_cuda
@needs_cuda_ext
@pytest.mark.parametrize("n,dtype,kind", CUDA_CASES)
@pytest.mark.parametrize("threads", [0, 32, 1024])
def test_cuda_matches_cpu_op_and_reference(n, dtype, kind, threads):
    G = gram(n, B=80 if n == 102 else 3, kind=kind, seed=n).to(dtype)
    Rinv, info = torch.ops.tsv_fast.batched_cholesky_inverse(G.cuda(), threads)
    check_inverse(G, Rinv, info.cpu(), slack=2.0)
    Rc, infoc = torch.ops.tsv_fast.batched_cholesky_inverse(G, threads)
    assert torch.equal(info.cpu(), infoc)
    ref = reference(G)
    kappa = torch.linalg.cond(torch.linalg.inv(ref)).amax()
    scale = torch.linalg.matrix_norm(ref).amax()
    assert (Rinv.cpu().double() - Rc.double()).abs().max() <= 4 * n * kappa * EPS[dtype] * scale


@needs_cuda
@needs_cuda_ext
def test_cuda_failed_pivots_match_cpu():
    G = not_positive_definite()
    Rinv, info = torch.ops.tsv_fast.batched_cholesky_inverse(G.cuda())
    assert info.cpu().tolist()[:3] == [0, 4, 1] and info[3] > 0 and Rinv[1:].isnan().all()
    for threads in (0, 32):  # info starts at 0 in every block (shared memory is not zeroed)
        G = failing_every_other()
        Rinv, info = torch.ops.tsv_fast.batched_cholesky_inverse(G.cuda(), threads)
        assert info.cpu().tolist() == [1, 0] * 100 and Rinv[::2].isnan().all() and Rinv[1::2].isfinite().all()

"""Tests for tsv_fast.ops.batched_eigh: compiled CPU op, CPU emulation of the CUDA kernel
(shared- and global-memory workspace), pure-PyTorch fallback and (when a GPU is visible)
the CUDA kernel, all against torch.linalg.eigh in float64."""

import pytest
import torch

from op_checks import refuses_grad_inputs
from tsv_fast import ops

EXT_OK, EXT_WHY = ops.load_extension()
needs_ext = pytest.mark.skipif(not EXT_OK, reason=EXT_WHY)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
needs_cuda_ext = pytest.mark.skipif(
    not (EXT_OK and ops.has_cuda_kernels()), reason="extension built without CUDA kernels"
)

# ---------------------------------------------------------------------------
# Inputs


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _orthogonal(B, n, g):
    Q, R = torch.linalg.qr(torch.randn(B, n, n, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)


def _with_spectrum(lam):
    """Q diag(lam) Q^T for a (B, n) spectrum, exactly symmetric, float64."""
    Q = _orthogonal(lam.shape[0], lam.shape[1], _gen(lam.shape[1] + 7))
    A = (Q * lam.unsqueeze(-2)) @ Q.mT
    return (A + A.mT) / 2


def make(kind, n, B=2, seed=0):
    """A (B, n, n) float64 symmetric test batch of the given kind."""
    g = _gen(seed * 1000 + n)
    if kind == "random":
        X = torch.randn(B, n, n, generator=g, dtype=torch.float64)
        return (X + X.mT) / 2
    if kind == "repeated":  # eigenvalues with multiplicities (and sign changes)
        vals = torch.tensor([-2.0, 0.5, 0.5, 3.0, 3.0, 3.0], dtype=torch.float64)
        lam = vals[torch.arange(n) % len(vals)].sort().values.expand(B, n).clone()
        return _with_spectrum(lam)
    if kind == "gram":  # X^T X with X of rank n // 3: rank-deficient, zero eigenvalues
        X = torch.randn(B, max(n // 3, 1), n, generator=g, dtype=torch.float64)
        return X.mT @ X
    if kind == "zero":
        return torch.zeros(B, n, n, dtype=torch.float64)
    if kind == "diagonal":
        return torch.diag_embed(torch.randn(B, n, generator=g, dtype=torch.float64))
    if kind == "negative":  # negative definite
        X = torch.randn(B, n, n, generator=g, dtype=torch.float64)
        return -(X @ X.mT) - torch.eye(n, dtype=torch.float64)
    if kind == "mixed":  # condition numbers 1 .. 1e12 in one batch, one of them scaled by 1e6
        conds = [1.0, 1e3, 1e8, 1e12][:B] + [1e4] * max(0, B - 4)
        lam = torch.stack([
            torch.logspace(0, -torch.log10(torch.tensor(c)).item(), n, dtype=torch.float64)
            * (1 - 2 * (torch.arange(n) % 2)) for c in conds
        ])
        A = _with_spectrum(lam.sort(-1).values)
        A[-1] *= 1e6
        return A
    raise ValueError(kind)


KINDS = ["random", "repeated", "gram", "zero", "diagonal", "negative", "mixed"]

# ---------------------------------------------------------------------------
# Checks


def _tols(dtype, n, work64):
    """(eigenvalue, residual, orthogonality) tolerances, the first two relative to ||A||_F."""
    if dtype == torch.float64:
        return 1e-12, 1e-12, 1e-13 * max(n, 10)
    if work64:  # CPU op: float64 iteration, float32 input/output rounding only
        return 1e-6, 2e-6, 1e-6
    return 1e-5, 1e-5, 1e-6 + 4e-7 * n  # float32 iteration (emulated kernel, CUDA)


def check_eigh(A, w, V, *, work64=False, slack=1.0):
    """w, V against torch.linalg.eigh of A (as given, rounded to its dtype) in float64."""
    assert w.dtype == A.dtype and V.dtype == A.dtype
    assert w.device == A.device and V.device == A.device
    assert w.shape == A.shape[:-1] and V.shape == A.shape
    n = A.shape[-1]
    if n == 0:
        return
    A64 = A.detach().cpu().double()
    A64 = ((A64 + A64.mT) / 2).reshape(-1, n, n)
    w64 = w.detach().cpu().double().reshape(-1, n)
    V64 = V.detach().cpu().double().reshape(-1, n, n)
    wr, Vr = torch.linalg.eigh(A64)
    norm = torch.linalg.matrix_norm(A64).clamp_min(1e-300)  # Frobenius, per matrix
    etol, rtol, otol = (slack * t for t in _tols(A.dtype, n, work64))

    assert bool((w64[:, 1:] >= w64[:, :-1]).all()), "eigenvalues not ascending"
    werr = ((w64 - wr).abs().amax(-1) / norm).max().item()
    assert werr <= etol, f"eigenvalue error {werr:.3g} * ||A|| > {etol:.3g}"
    res = ((A64 @ V64 - V64 * w64.unsqueeze(-2)).abs().amax((-2, -1)) / norm).max().item()
    assert res <= rtol, f"residual |AV - V diag(w)| = {res:.3g} * ||A|| > {rtol:.3g}"
    orth = (V64.mT @ V64 - torch.eye(n, dtype=torch.float64)).abs().max().item()
    assert orth <= otol, f"|V^T V - I| = {orth:.3g} > {otol:.3g}"

    # Eigenspaces: group (numerically) repeated reference eigenvalues, and compare the
    # subspaces through sin(theta) = |Vr[:, not g]^T V[:, g]|, bounded by ~ residual / gap.
    M = Vr.mT @ V64  # (B, n, n): coordinates of our vectors in the reference basis
    for b in range(wr.shape[0]):
        lam, scale = wr[b], norm[b].item()
        cut = [0] + [i + 1 for i in range(n - 1) if lam[i + 1] - lam[i] > 1e-6 * scale] + [n]
        for lo, hi in zip(cut[:-1], cut[1:]):
            left = (lam[lo] - lam[lo - 1]).item() if lo > 0 else float("inf")
            right = (lam[hi] - lam[hi - 1]).item() if hi < n else float("inf")
            gap = min(left, right)
            bound = 10 * (rtol * scale) * (hi - lo) ** 0.5 / gap + 10 * otol
            if bound >= 0.5:
                continue  # too close to a neighbour for the check to mean anything
            block = M[b, :, lo:hi]
            sin2 = (block[:lo].square().sum() + block[hi:].square().sum()).item()
            assert sin2 ** 0.5 <= bound, (
                f"matrix {b}, eigenvalues {lo}:{hi}: subspace angle {sin2 ** 0.5:.3g} > {bound:.3g}"
            )


def run(impl, A, **kw):
    if impl == "op":
        return torch.ops.tsv_fast.batched_eigh(A, **kw)
    if impl == "emulated":
        return torch.ops.tsv_fast.batched_eigh_emulated(A, **kw)
    if impl == "emulated-global":
        return torch.ops.tsv_fast.batched_eigh_emulated(A, force_path=0, **kw)
    if impl == "emulated-shared":
        return torch.ops.tsv_fast.batched_eigh_emulated(A, force_path=1, **kw)
    if impl == "fallback":
        return ops._batched_eigh_torch(A, **kw)
    return ops.batched_eigh(A, **kw)


# ---------------------------------------------------------------------------
# Compiled CPU op (float64 iteration), all kinds and sizes.

SIZES = [1, 2, 3, 7, 16, 33, 64, 100, 130, 256]


def _batch(n):
    return 3 if n <= 33 else (2 if n <= 130 else 1)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("n", SIZES)
def test_cpu_op_random(n, dtype):
    A = make("random", n, _batch(n)).to(dtype)
    check_eigh(A, *run("op", A), work64=True)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("n", [1, 2, 7, 33, 64])
@pytest.mark.parametrize("kind", KINDS[1:])
def test_cpu_op_kinds(kind, n, dtype):
    A = make(kind, n, B=4 if kind == "mixed" else 2).to(dtype)
    check_eigh(A, *run("op", A), work64=True)


@needs_ext
@pytest.mark.parametrize("kind", ["repeated", "gram"])
def test_cpu_op_kinds_large(kind):
    A = make(kind, 130, B=1)
    check_eigh(A, *run("op", A), work64=True)


# ---------------------------------------------------------------------------
# CPU emulation of the CUDA kernel: float32/float64 iteration, the kernel's thread
# count, both workspace placements.  Smaller sizes only (it is slow).

EMU_CASES = [
    # (impl, kind, n): auto path = shared memory for all of these ...
    *[("emulated", "random", n) for n in (1, 2, 3, 7, 16, 17, 33, 49, 64)],
    *[("emulated", k, n) for k in KINDS[1:] for n in (7, 33)],
    # ... forced global-memory workspace, and forced shared
    *[("emulated-global", k, n) for k, n in (("random", 3), ("random", 33), ("repeated", 64),
                                             ("gram", 16), ("mixed", 20), ("zero", 5))],
    ("emulated-shared", "random", 40),
]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("impl,kind,n", EMU_CASES)
def test_emulated_kernel(impl, kind, n, dtype):
    A = make(kind, n, B=4 if kind == "mixed" else 2, seed=1).to(dtype)
    check_eigh(A, *run(impl, A))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_emulated_auto_path_beyond_shared_limit(dtype):
    """n = 130: float64 exceeds the 227 KB shared memory of sm_90 (global path), float32 fits."""
    A = make("random", 130, B=1, seed=2).to(dtype)
    w, V = run("emulated", A)
    check_eigh(A, w, V)
    with pytest.raises(ValueError, match="needs .* bytes of shared memory") if dtype == torch.float64 \
            else _nullcontext():
        run("emulated-shared", A)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind,n", [("random", 102), ("mixed", 64), ("repeated", 40), ("gram", 130), ("random", 3)])
def test_emulated_kernel_thread_counts(kind, n, dtype):
    """Blocks of 512 and 1024 threads do the rotations and norms on 256 of them, so they must give
    256's result bit for bit, and so must the default (256 threads for 48 < n ≤ 80, 512 above);
    32 threads reduce in another order."""
    A = make(kind, n, B=4 if kind == "mixed" else 2, seed=6).to(dtype)
    w, V = run("emulated", A, threads=256)
    check_eigh(A, w, V)
    for threads in (0, 512, 1024):
        wt, Vt = run("emulated", A, threads=threads)
        assert torch.equal(wt, w) and torch.equal(Vt, V), threads
    check_eigh(A, *run("emulated", A, threads=32))
    if n == 130:  # the global-memory workspace (float64 beyond sm_90's shared memory) too
        assert torch.equal(run("emulated-global", A, threads=1024)[1], V)


@needs_ext
def test_emulated_kernel_more_pairs_than_rotation_threads():
    """n = 520: 260 pairs a round, more than the 256 threads that compute rotations (thread k also
    takes pair k + 256); 1024 threads give 256's result bit for bit."""
    A = make("random", 520, B=1, seed=8).float()
    w, V = run("emulated", A, threads=256)
    check_eigh(A, w, V)
    wt, Vt = run("emulated", A, threads=1024)
    assert torch.equal(wt, w) and torch.equal(Vt, V)


def _workspace_bytes(n, size):
    """Shared memory of one block at order n, from the kernel's documented layout: A and W
    (n² each), cos/sin/tan per pair (⌈n/2⌉ each), two int pair indices and n int ranks, padded
    to 16 bytes, plus a reduction buffer of 3 doubles per reducing thread (64 / 128 / 256 threads:
    blocks of 512 threads, above n = 80, reduce on 256)."""
    pairs = (n + 1) // 2
    body = 2 * n * n * size + 3 * pairs * size + 2 * pairs * 4 + n * 4
    threads = 64 if n <= 16 else 128 if n <= 48 else 256
    return -(-body // 16) * 16 + 3 * threads * 8


@needs_ext
@pytest.mark.parametrize("smem", [0, 48 * 1024, 163 * 1024, 227 * 1024])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_shared_order_is_the_largest_n_that_fits(smem, dtype):
    """What solvers size their Rayleigh–Ritz blocks by (H100/H200: 227 KB, A100: 163 KB)."""
    size = torch.finfo(dtype).bits // 8
    n = torch.ops.tsv_fast.batched_eigh_shared_order(smem, dtype == torch.float64)
    assert n == 0 or _workspace_bytes(n, size) <= smem
    assert _workspace_bytes(n + 1, size) > smem
    if smem == 227 * 1024:  # the emulator's sm_90 limit: order n runs in shared memory, n + 1 refuses
        A = make("random", n, B=1, seed=4).to(dtype)
        check_eigh(A, *run("emulated-shared", A))
        with pytest.raises(ValueError, match="needs .* bytes of shared memory"):
            run("emulated-shared", make("random", n + 1, B=1, seed=4).to(dtype))
    with pytest.raises(ValueError, match="smem_bytes must be >= 0"):
        torch.ops.tsv_fast.batched_eigh_shared_order(-1, True)


def test_shared_order_of_a_device():
    assert ops.eigh_shared_order(torch.device("cpu")) is None
    with pytest.raises(ValueError, match="float32 or float64"):
        ops.eigh_shared_order(torch.device("cpu"), torch.float16)
    if EXT_OK and ops.has_cuda_kernels() and torch.cuda.is_available():
        optin = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
        n = ops.eigh_shared_order(torch.device("cuda"))
        assert n == torch.ops.tsv_fast.batched_eigh_shared_order(optin, True) and n >= 64


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@needs_ext
@pytest.mark.parametrize("n", [5, 33])
def test_emulated_paths_agree_bitwise_and_match_cpu_op(n):
    A = make("random", n, B=2, seed=3)
    wg, Vg = run("emulated-global", A)
    ws, Vs = run("emulated-shared", A)
    assert torch.equal(wg, ws) and torch.equal(Vg, Vs)
    w, V = run("op", A)  # same algorithm, same dtype (float64) -> same sweeps, same rounding
    torch.testing.assert_close(wg, w, rtol=0, atol=1e-13 * n)
    torch.testing.assert_close(Vg, V, rtol=0, atol=1e-12 * n)


# ---------------------------------------------------------------------------
# Fallback and public wrapper


@pytest.mark.parametrize("impl", ["fallback", "public"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind,n", [("random", 1), ("random", 33), ("repeated", 12), ("gram", 30),
                                    ("zero", 4), ("mixed", 16), ("random", 0)])
def test_fallback_and_public(impl, kind, n, dtype):
    A = make(kind, n, B=4 if kind == "mixed" else 2).to(dtype)
    check_eigh(A, *run(impl, A), work64=impl == "public" and EXT_OK, slack=10 if dtype == torch.float32 else 1)


@pytest.mark.parametrize("impl", [pytest.param("op", marks=needs_ext), pytest.param("emulated", marks=needs_ext),
                                  "fallback", "public"])
def test_unbatched_noncontiguous_and_asymmetric(impl):
    """2-D input, a transposed (non-contiguous) view, and an asymmetric input (symmetrised)."""
    g = _gen(5)
    X = torch.randn(9, 9, generator=g, dtype=torch.float64)
    w, V = run(impl, X.mT)
    assert w.shape == (9,) and V.shape == (9, 9)
    check_eigh((X + X.mT) / 2, w, V, work64=True)


@pytest.mark.parametrize("impl", [pytest.param("op", marks=needs_ext), pytest.param("emulated", marks=needs_ext),
                                  "fallback"])
@pytest.mark.parametrize("shape", [(0, 0), (3, 0, 0), (0, 4, 4), (1, 1), (2, 1, 1)])
def test_empty_and_1x1(impl, shape):
    A = torch.full(shape, -2.5, dtype=torch.float64)
    w, V = run(impl, A)
    assert w.shape == shape[:-1] and V.shape == shape
    if A.numel():
        assert bool((w == -2.5).all()) and bool((V == 1).all())


@needs_ext
@pytest.mark.parametrize("impl", ["op", "emulated"])
def test_zero_and_diagonal_exact(impl):
    w, V = run(impl, torch.zeros(2, 6, 6))
    assert torch.equal(w, torch.zeros(2, 6)) and torch.equal(V, torch.eye(6).expand(2, 6, 6))
    d = torch.tensor([3.0, -1.0, 2.0, 0.5, -1.0], dtype=torch.float64)
    w, V = run(impl, torch.diag(d))
    assert torch.equal(w, d.sort().values)
    assert torch.equal(torch.diag(d) @ V, V * w)  # V is a permutation: exact


@needs_ext
@pytest.mark.parametrize("impl", ["op", "emulated"])
def test_max_sweeps_and_tol(impl):
    A = make("random", 20, B=2, seed=7)
    w0, V0 = run(impl, A, max_sweeps=0)  # no sweep: sorted diagonal, V a permutation
    assert torch.equal(w0, torch.diagonal(A, dim1=-2, dim2=-1).sort(-1).values)
    assert torch.equal(V0.abs().sum(-2), torch.ones(2, 20, dtype=torch.float64))
    w1, _ = run(impl, A, max_sweeps=1)  # one sweep is not enough for 1e-12
    assert (w1 - torch.linalg.eigvalsh(A)).abs().max() > 1e-12
    w2, V2 = run(impl, A, tol=1e-4)  # loose tolerance: off(A) <= 1e-4 ||A|| -> eigenvalues ~ 1e-4 ||A||
    check_eigh(A, w2, V2, slack=1e8)
    norm = torch.linalg.matrix_norm(A).max()
    assert (w2 - torch.linalg.eigvalsh(A)).abs().max() <= 1e-4 * norm


@needs_ext
@pytest.mark.parametrize("impl", ["op", "emulated", "emulated-global"])
@pytest.mark.parametrize("dtype,powers", [(torch.float64, [-560, -530, -40, 515, 600]),
                                          (torch.float32, [-100, 100])])
@pytest.mark.parametrize("kind", ["random", "mixed"])
def test_tiny_and_huge_matrices_are_solved_like_unit_ones(impl, dtype, powers, kind):
    """Entries near 1e-170 used to square to 0 (converged before any sweep: eigenvalues off by
    100%) and near 1e154 to overflow the norm; the kernel now scales A by a power of four."""
    A = make(kind, 12, B=3, seed=2).to(dtype)
    for p in powers:
        w, V = run(impl, A * 2.0 ** p)  # exact: a power of two
        check_eigh(A, w / 2.0 ** p, V, work64=impl == "op")


@pytest.mark.parametrize("impl", [pytest.param("op", marks=needs_ext), pytest.param("emulated", marks=needs_ext),
                                  "fallback"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_gives_all_nan_at_once(impl, bad):
    """(The fallback used to raise torch.linalg.eigh's LinAlgError instead.)"""
    A = make("random", 8, B=2)
    A[0, 3, 5] = A[0, 5, 3] = bad
    for sweeps in (0, 1 << 20):  # NaN used to run every sweep allowed, or (0) return a finite diagonal
        w, V = run(impl, A, max_sweeps=sweeps)
        assert w.shape == (2, 8) and bool(w[0].isnan().all()) and bool(V[0].isnan().all())
    check_eigh(A[1:], w[1:], V[1:], work64=impl == "op")  # the other matrix is unaffected


BAD = [
    ("1-D", lambda: torch.zeros(4), r"A must be 2-D \(n, n\) or 3-D batched \(B, n, n\), got a 1-D"),
    ("4-D", lambda: torch.zeros(2, 2, 3, 3), r"got a 4-D tensor"),
    ("not square", lambda: torch.zeros(2, 3, 4), r"A must be square \(its last two dims equal\), got shape \[2, 3, 4\]"),
    ("int", lambda: torch.zeros(3, 3, dtype=torch.int32), r"A must have dtype float32 or float64, got (torch\.)?[Ii]nt"),
    ("half", lambda: torch.zeros(3, 3, dtype=torch.float16), r"A must have dtype float32 or float64, got"),
]


@pytest.mark.parametrize("impl", [pytest.param("op", marks=needs_ext), pytest.param("emulated", marks=needs_ext),
                                  "fallback", "public"])
@pytest.mark.parametrize("desc,build,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_clear_errors(impl, desc, build, msg):
    with pytest.raises(ValueError, match=msg):
        run(impl, build())


@pytest.mark.parametrize("impl", [pytest.param("op", marks=needs_ext), "fallback"])
def test_bad_sweeps_and_tol(impl):
    A = torch.eye(3)
    with pytest.raises(ValueError, match="max_sweeps must be >= 0"):
        run(impl, A, max_sweeps=-1)
    with pytest.raises(ValueError, match="tol must be a finite number >= 0"):
        run(impl, A, tol=-0.5)
    with pytest.raises(ValueError, match="tol must be a finite number >= 0"):
        run(impl, A, tol=float("inf"))
    for threads in (16, 48, 2048, -1):
        with pytest.raises(ValueError, match="threads must be 0 .* or a power of two from 32 to 1024"):
            run(impl, A, threads=threads)


def test_public_wrapper_supports_autograd():
    A = make("random", 5, B=1).requires_grad_()
    w, V = ops.batched_eigh(A)
    w.sum().backward()  # d(sum of eigenvalues)/dA = I
    torch.testing.assert_close(A.grad, torch.eye(5, dtype=torch.float64).expand(1, 5, 5))


def test_public_wrapper_with_grad_gives_nan_for_nonfinite_matrices():
    """The autograd path (torch.linalg.eigh) follows the kernels' NaN convention too."""
    A = make("random", 5, B=2)
    A[0, 1, 1] = float("inf")
    A.requires_grad_()
    w, V = ops.batched_eigh(A)
    assert w[0].isnan().all() and V[0].isnan().all() and w[1].isfinite().all()
    w[1].sum().backward()
    torch.testing.assert_close(A.grad[1], torch.eye(5, dtype=torch.float64))
    assert torch.equal(A.grad[0], torch.zeros(5, 5, dtype=torch.float64))


@needs_ext
@pytest.mark.parametrize("op_name", ["batched_eigh", "batched_eigh_emulated"])
def test_ops_refuse_inputs_that_require_grad(op_name):
    """The ops have no derivative: their outputs used to require grad and get none."""
    A = make("random", 6, B=2).requires_grad_()
    w, V = refuses_grad_inputs(op_name, (A,), "A")
    assert not w.requires_grad and not V.requires_grad
    check_eigh(A.detach(), w, V, work64=op_name == "batched_eigh")


@needs_ext
@pytest.mark.parametrize("op_name", ["batched_eigh", "batched_eigh_emulated"])
@pytest.mark.parametrize("shape,dtype", [((3, 6, 6), torch.float64), ((5, 5), torch.float32)])
def test_opcheck(op_name, shape, dtype):
    A = make("random", shape[-1], B=shape[0] if len(shape) == 3 else 1).reshape(shape).to(dtype)
    torch.library.opcheck(getattr(torch.ops.tsv_fast, op_name).default, (A, 30, 0.0))
    torch.library.opcheck(getattr(torch.ops.tsv_fast, op_name).default, (A,), {"threads": 512})


@needs_ext
def test_fake_tensor_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        A = torch.empty(7, 12, 12, dtype=torch.float64)
        w, V = torch.ops.tsv_fast.batched_eigh(A)
        assert w.shape == (7, 12) and V.shape == (7, 12, 12) and w.dtype == torch.float64
        w, V = torch.ops.tsv_fast.batched_eigh_emulated(torch.empty(4, 4), 30, 0.0, 0)
        assert w.shape == (4,) and V.shape == (4, 4)
        with pytest.raises(ValueError, match="order n = 46341 are too large"):  # as the real op says
            torch.ops.tsv_fast.batched_eigh(torch.empty(46341, 46341))
        with pytest.raises(ValueError, match="force_path must be -1 .auto., 0 .global memory. or 1"):
            torch.ops.tsv_fast.batched_eigh_emulated(torch.empty(4, 4), 30, 0.0, 2)


# ---------------------------------------------------------------------------
# CUDA kernel (float32 n = 33, 106, 130 and float64 n = 33 use shared memory; float64
# n = 130 and 256 the global-memory workspace on both sm_80 and sm_90).

CUDA_CASES = [("random", 1, torch.float64), ("random", 7, torch.float32), ("repeated", 33, torch.float64),
              ("gram", 33, torch.float32), ("mixed", 64, torch.float64), ("random", 106, torch.float32),
              ("random", 130, torch.float32), ("random", 130, torch.float64), ("gram", 256, torch.float64),
              ("zero", 9, torch.float32)]


@needs_cuda
@needs_cuda_ext
@pytest.mark.parametrize("kind,n,dtype", CUDA_CASES)
def test_cuda_matches_cpu_op_and_reference(kind, n, dtype):
    A = make(kind, n, B=4 if kind == "mixed" else 3, seed=4).to(dtype)
    w, V = torch.ops.tsv_fast.batched_eigh(A.cuda())
    check_eigh(A.cuda(), w, V)
    wc, _ = run("op", A)
    norm = torch.linalg.matrix_norm(A.double()).amax()
    assert (w.cpu().double() - wc.double()).abs().max() <= _tols(dtype, n, False)[0] * norm
    we, Ve = run("emulated", A)  # same algorithm and dtype: close to the emulator
    assert (w.cpu().double() - we.double()).abs().max() <= _tols(dtype, n, False)[0] * norm


@needs_cuda
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("threads", [32, 512, 1024])
def test_cuda_thread_counts(threads, dtype):
    """The kernel's other block sizes (ℓ = 102 is the Rayleigh–Ritz size of ViT-L/14, T = 20) against the
    reference and the emulator with the same thread count."""
    A = make("random", 102, B=5, seed=7).to(dtype)
    w, V = torch.ops.tsv_fast.batched_eigh(A.cuda(), 30, 0.0, threads)
    check_eigh(A.cuda(), w, V)
    we, _ = run("emulated", A, threads=threads)
    norm = torch.linalg.matrix_norm(A.double()).amax()
    assert (w.cpu().double() - we.double()).abs().max() <= _tols(dtype, 102, False)[0] * norm


@needs_cuda
@needs_cuda_ext
def test_cuda_public_big_batch_and_opcheck():
    A = make("random", 40, B=300, seed=5).float().cuda()
    w, V = ops.batched_eigh(A)
    check_eigh(A, w, V)
    torch.library.opcheck(torch.ops.tsv_fast.batched_eigh.default, (A[:3].double(), 30, 0.0))

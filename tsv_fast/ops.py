"""Fused low-rank ops, backed by the compiled extension ``tsv_fast._C`` when it is built.

Every public op here has a pure-PyTorch fallback with identical semantics, so the
library works (slower, with an extra temporary) without a compiler.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = ["load_extension", "has_cuda_kernels", "reconstruct"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_EXT_STATUS: tuple[bool, str] | None = None
# |alpha| limit of every op (csrc/checks.h check_alpha): alpha scales float32 accumulators
_ALPHA_MAX = torch.finfo(torch.float32).max


def load_extension() -> tuple[bool, str]:
    """Import ``tsv_fast._C`` once (registering ``torch.ops.tsv_fast.*`` and their fake kernels);
    return (loaded, why). Runs when this module is imported, so the ops never exist without
    their fake kernels (torch.compile needs them), however the user reaches the ops."""
    global _EXT_STATUS
    if _EXT_STATUS is None:
        try:
            from tsv_fast import _C  # noqa: F401  (import registers the ops)
        except ImportError as e:
            _EXT_STATUS = (False, f"compiled extension not available ({e}); build it with: make build")
        else:
            _register_fakes()
            kind = "CPU + CUDA kernels" if has_cuda_kernels() else "CPU kernels only: built without CUDA"
            _EXT_STATUS = (True, f"compiled extension loaded ({kind})")
    return _EXT_STATUS


def _has_kernel(op: str, dispatch_key: str | None) -> bool:
    if dispatch_key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"tsv_fast::{op}", dispatch_key)
    except RuntimeError:  # op not registered at all
        return False


def has_cuda_kernels() -> bool:
    """Whether the extension registered its CUDA kernels (true even on a machine without a GPU)."""
    return _has_kernel("reconstruct", "CUDA")


def _register_fakes() -> None:
    """Shape functions so torch.compile / FakeTensor can trace through the custom ops."""

    def reconstruct_fake(name):
        def fake(base: Tensor, U: Tensor, S: Tensor, V: Tensor, alpha: float) -> Tensor:
            _check_reconstruct_args(base, U, S, V, alpha, op=name)
            return base.new_empty(base.shape)
        return fake

    for name in ("reconstruct", "reconstruct_emulated"):
        torch.library.register_fake(f"tsv_fast::{name}")(reconstruct_fake(name))

    _register_eigh_fakes()
    _register_cholinv_fake()
    _register_segmented_fakes()


def _check_alpha(op: str, alpha: float) -> None:
    """csrc/checks.h check_alpha: one rule on every device (the CPU's GEMMs refused an alpha beyond
    float32 while the kernels turned it into Inf)."""
    if not (math.isfinite(alpha) and abs(alpha) <= _ALPHA_MAX):
        raise ValueError(f"{op}: alpha must be a finite number within the float32 range "
                         f"(|alpha| <= {_ALPHA_MAX!r}), got {alpha}")


def _check_reconstruct_args(base: Tensor, U: Tensor, S: Tensor, V: Tensor, alpha: float,
                            op: str = "reconstruct") -> None:
    """Same checks, in the same order, as csrc/reconstruct.h; raises ValueError."""
    if base.dim() not in (2, 3):
        raise ValueError(
            f"{op}: base must be 2-D (m, n) or 3-D batched (B, m, n), got a {base.dim()}-D "
            f"tensor of shape {list(base.shape)}"
        )
    batched = base.dim() == 3
    for name, t, want in (("U", U, base.dim()), ("S", S, base.dim() - 1), ("V", V, base.dim())):
        if t.dim() != want:
            raise ValueError(f"{op}: {name} must be {want}-D, got a {t.dim()}-D tensor of shape {list(t.shape)}")
    for name, t in (("base", base), ("U", U), ("S", S), ("V", V)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{op}: {name} must have a floating dtype (float32, float64, float16 or bfloat16), got {t.dtype}"
            )
    for name, t in (("S", S), ("V", V)):
        if t.dtype != U.dtype:
            raise ValueError(f"{op}: {name} has dtype {t.dtype} but U has dtype {U.dtype}; U, S and V must share one dtype")
    for name, t in (("U", U), ("S", S), ("V", V)):
        if t.device != base.device:
            raise ValueError(f"{op}: {name} is on {t.device} but base is on {base.device}; all inputs must be on the same device")

    off = 1 if batched else 0
    m, n, k = base.shape[off], base.shape[off + 1], U.shape[off + 1]

    def need(name: str, t: Tensor, d: int, expected: int, what: str, ref_name: str, ref: Tensor) -> None:
        if t.shape[d] != expected:
            raise ValueError(
                f"{op}: {name}.size({d}) must equal {what} = {expected}, but {name} has shape "
                f"{list(t.shape)} and {ref_name} has shape {list(ref.shape)}"
            )

    if batched:
        for name, t in (("U", U), ("S", S), ("V", V)):
            need(name, t, 0, base.shape[0], "the batch size B = base.size(0)", "base", base)
    need("U", U, off, m, "m (rows of base)", "base", base)
    need("V", V, off, n, "n (columns of base)", "base", base)
    need("S", S, off, k, "k (columns of U)", "U", U)
    need("V", V, off + 1, k, "k (columns of U)", "U", U)
    _check_alpha(op, alpha)


def _reconstruct_torch(base: Tensor, U: Tensor, S: Tensor, V: Tensor, alpha: float = 1.0) -> Tensor:
    """Pure-PyTorch reconstruct: same dtype rules as the kernels (float32/float64 compute, one final cast)."""
    _check_reconstruct_args(base, U, S, V, alpha)
    ct = torch.float64 if torch.float64 in (base.dtype, U.dtype) else torch.float32
    b = base.to(ct)
    # U diag(S) alpha without forming diag(S), in the kernels' order: NaN/Inf factors give NaN/Inf
    # as they do there, also for alpha = 0 (addmm's own alpha = 0 may skip the product)
    US = U.to(ct) * S.to(ct).unsqueeze(-2) * alpha
    Vt = V.to(ct).transpose(-1, -2)
    mm = torch.baddbmm if base.dim() == 3 else torch.addmm
    return mm(b, US, Vt).to(base.dtype).contiguous()


# From this rank on, reconstruct on a GPU is cuBLAS's addmm: on an H200 the fused kernel took
# 0.48–0.55× of addmm's speed at k = 768 (TSV-M merges call it with k ≈ the width) and was
# 1.3–1.6× faster at k = 96 (benchmarks/bench_merge.py); the crossover was not measured.
_CUDA_GEMM_RANK = 256


def reconstruct(base: Tensor, U: Tensor, S: Tensor, V: Tensor, alpha: float = 1.0) -> Tensor:
    """Return ``base + alpha * U @ diag(S) @ V^T`` as a new tensor of base's dtype, shape and device.

    Rebuilds a weight from its low-rank factors without materialising the low-rank
    product separately.  Shapes: base (m, n), U (m, k), S (k,), V (n, k), or the same
    with a leading batch dim B.  Factors may have a different float dtype than base
    (all three the same); accumulation is float32 (float64 if anything is float64).
    ``alpha`` must be finite and within the float32 range; NaN/Inf in the inputs give
    NaN/Inf in the outputs they reach, as IEEE arithmetic does (``alpha = 0`` included:
    0·Inf = NaN), on every path.
    Uses the compiled kernel for base's device when available, else PyTorch (also when
    gradients are needed: the compiled op has no autograd formula, and on a GPU from
    rank 256 on, where cuBLAS is faster).
    """
    ok, _ = load_extension()
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (base, U, S, V))
    cublas_wins = base.is_cuda and U.dim() > 0 and U.shape[-1] >= _CUDA_GEMM_RANK  # (0-D: the op's checks say why)
    if ok and not needs_grad and not cublas_wins and _has_kernel("reconstruct", _DISPATCH_KEYS.get(base.device.type)):
        return torch.ops.tsv_fast.reconstruct(base, U, S, V, float(alpha))
    return _reconstruct_torch(base, U, S, V, alpha)


# ---------------------------------------------------------------------------
# batched_eigh: eigen-decomposition of a batch of small symmetric matrices
# (csrc/eigh.h, csrc/kernels/jacobi_eigh.h, csrc/cpu/eigh*.cpp, csrc/cuda/eigh.cu).
# ---------------------------------------------------------------------------

__all__ += ["batched_eigh"]

_EIGH_DTYPES = (torch.float32, torch.float64)
_EIGH_MAX_N = 46340  # csrc/eigh.h kEighMaxN: the kernels index one matrix with int (n·n < 2^31)


# CUDA threads per matrix that batched_eigh accepts besides 0 (the kernel's choice): powers of two
_EIGH_THREADS = (32, 64, 128, 256, 512, 1024)


def _check_square_matrices(op: str, name: str, A: Tensor) -> None:
    """A matrix (n, n) or a batch (B, n, n) in float32 or float64, as csrc/checks.h's
    check_square_matrices (the small-matrix ops' first checks); raises ValueError."""
    if A.dim() not in (2, 3):
        raise ValueError(f"{op}: {name} must be 2-D (n, n) or 3-D batched (B, n, n), got a {A.dim()}-D tensor of "
                         f"shape {list(A.shape)}")
    if A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{op}: {name} must be square (its last two dims equal), got shape {list(A.shape)}")
    if A.dtype not in _EIGH_DTYPES:
        raise ValueError(f"{op}: {name} must have dtype float32 or float64, got {A.dtype}")


def _check_eigh_args(op: str, A: Tensor, max_sweeps: int, tol: float, threads: int = 0) -> None:
    """Same checks, in the same order, as csrc/eigh.h; raises ValueError."""
    _check_square_matrices(op, "A", A)
    if max_sweeps < 0:
        raise ValueError(f"{op}: max_sweeps must be >= 0, got {max_sweeps}")
    if not (tol >= 0 and tol != float("inf")):
        raise ValueError(f"{op}: tol must be a finite number >= 0 (0 = working precision), got {tol}")
    if threads != 0 and threads not in _EIGH_THREADS:
        raise ValueError(f"{op}: threads must be 0 (the kernel's choice) or a power of two from 32 to 1024, "
                         f"got {threads}")
    if A.shape[-1] > _EIGH_MAX_N:
        raise ValueError(f"{op}: matrices of order n = {A.shape[-1]} are too large for the Jacobi kernels "
                         f"(at most {_EIGH_MAX_N})")


def _register_eigh_fakes() -> None:
    def eigh_fake(A: Tensor, max_sweeps: int = 30, tol: float = 0.0, threads: int = 0) -> tuple[Tensor, Tensor]:
        _check_eigh_args("batched_eigh", A, max_sweeps, tol, threads)
        return A.new_empty(A.shape[:-1]), A.new_empty(A.shape)

    def eigh_emulated_fake(A: Tensor, max_sweeps: int = 30, tol: float = 0.0,
                           force_path: int = -1, threads: int = 0) -> tuple[Tensor, Tensor]:
        _check_eigh_args("batched_eigh_emulated", A, max_sweeps, tol, threads)
        if force_path not in (-1, 0, 1):  # as csrc/cpu/eigh_emulated.cpp
            raise ValueError("batched_eigh_emulated: force_path must be -1 (auto), 0 (global memory) or "
                             f"1 (shared memory), got {force_path}")
        return A.new_empty(A.shape[:-1]), A.new_empty(A.shape)

    for name, fake in (("batched_eigh", eigh_fake), ("batched_eigh_emulated", eigh_emulated_fake)):
        try:  # an extension built before batched_eigh existed lacks the ops: keep it usable
            torch._C._dispatch_find_schema_or_throw(f"tsv_fast::{name}", "")
        except RuntimeError:
            continue
        torch.library.register_fake(f"tsv_fast::{name}")(fake)


def _batched_eigh_torch(A: Tensor, max_sweeps: int = 30, tol: float = 0.0, threads: int = 0) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch batched_eigh: torch.linalg.eigh of the symmetrised input (max_sweeps/tol/threads unused).

    A matrix holding NaN/Inf gets all-NaN eigenvalues and eigenvectors, as from the kernels
    (torch.linalg.eigh raises or returns garbage for it); the others are unaffected."""
    _check_eigh_args("batched_eigh", A, max_sweeps, tol, threads)
    bad = ~A.isfinite().all(-1).all(-1)  # () or (B,), without a device sync
    w, V = torch.linalg.eigh(((A + A.mT) * 0.5).masked_fill(bad[..., None, None], 0))
    return w.masked_fill(bad[..., None], math.nan), V.masked_fill(bad[..., None, None], math.nan)


def batched_eigh(A: Tensor, max_sweeps: int = 30, tol: float = 0.0, threads: int = 0) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of symmetric matrices: ``(eigenvalues, eigenvectors)``.

    ``A`` is (n, n) or a batch (B, n, n), float32 or float64, symmetric; the kernels
    use the symmetrised ``(A + A^T) / 2`` (both triangles are read).  Returns the
    eigenvalues (..., n) in ascending order and the eigenvectors (..., n, n) as
    columns, like ``torch.linalg.eigh``, in A's dtype and on A's device.

    The compiled op runs a parallel-ordered (round-robin) two-sided Jacobi iteration
    with Rutishauser's rotations, every matrix of the batch at once: one CUDA block
    per matrix on the GPU (in shared memory up to n ~ 140..167 in float32, 99..118 in
    float64, depending on the GPU), ``at::parallel_for`` over the batch on the CPU
    (iterating in float64).  It stops after ``max_sweeps`` sweeps or when the
    off-diagonal norm is <= ``tol * ||A||_F`` (``tol = 0``: machine epsilon of the
    working precision) or a sweep rotates nothing.  ``threads``: CUDA threads per
    matrix (0: 64 to 512 by size, 512 above n = 80; up to 1024: the rotations and norms use at most 256
    of them, the updates of A and V all, so above n = 48 every count from 256 on gives the
    default's result bit for bit, only faster or slower).  Eigenvectors of repeated
    eigenvalues are an arbitrary orthonormal basis of their eigenspace, and signs
    are arbitrary, as with any eigensolver.

    A matrix holding NaN or Inf gets all-NaN eigenvalues and eigenvectors (the others of
    the batch are unaffected).

    Falls back to ``torch.linalg.eigh`` (same conventions, NaN/Inf included) when the
    extension has no kernel for A's device, and when gradients are needed (the compiled
    op has no autograd formula: called directly, it refuses inputs that require grad).
    """
    ok, _ = load_extension()
    needs_grad = torch.is_grad_enabled() and A.requires_grad
    if ok and not needs_grad and _has_kernel("batched_eigh", _DISPATCH_KEYS.get(A.device.type)):
        return tuple(torch.ops.tsv_fast.batched_eigh(A, int(max_sweeps), float(tol), int(threads)))
    return _batched_eigh_torch(A, max_sweeps, tol, threads)


@functools.cache
def _shared_order(op: str, index: int, float64: bool) -> int | None:
    """``op``'s CUDA kernel's largest shared-memory order on GPU ``index`` (its
    ``<op>_shared_order`` computes it from the device's opt-in limit); None without the kernel."""
    ok, _ = load_extension()
    if not ok or not _has_kernel(op, "CUDA"):
        return None
    optin = torch.cuda.get_device_properties(index).shared_memory_per_block_optin
    return int(getattr(torch.ops.tsv_fast, f"{op}_shared_order")(int(optin), float64))


def eigh_shared_order(device: torch.device, dtype: torch.dtype = torch.float64) -> int | None:
    """Largest n for which :func:`batched_eigh` keeps an n×n matrix in the shared memory of
    ``device`` (118 in float64 on an H100/H200); ``None`` without the CUDA kernel."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"eigh_shared_order: batched_eigh runs in float32 or float64, not {dtype}")
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _shared_order("batched_eigh", index, dtype == torch.float64)


# ---------------------------------------------------------------------------
# batched_cholesky_inverse: CholeskyQR's R⁻¹ in one launch (csrc/cholesky_inverse.h,
# csrc/kernels/cholesky_inverse.h, csrc/cpu/cholesky_inverse.cpp, csrc/cuda/cholesky_inverse.cu).
# ---------------------------------------------------------------------------

_CHOLINV_THREADS = tuple(2 ** i for i in range(11))  # besides 0: powers of two from 1 to 1024


def _check_cholinv_args(op: str, G: Tensor, threads: int) -> None:
    """Same checks, in the same order, as csrc/cholesky_inverse.h; raises ValueError."""
    _check_square_matrices(op, "G", G)
    if threads != 0 and threads not in _CHOLINV_THREADS:
        raise ValueError(f"{op}: threads must be 0 (the default) or a power of two from 1 to 1024, got {threads}")
    if G.shape[-1] > _EIGH_MAX_N:
        raise ValueError(f"{op}: matrices of order n = {G.shape[-1]} are too large (at most {_EIGH_MAX_N})")


def _register_cholinv_fake() -> None:
    def fake(G: Tensor, threads: int = 0) -> tuple[Tensor, Tensor]:
        _check_cholinv_args("batched_cholesky_inverse", G, threads)
        return G.new_empty(G.shape), G.new_empty(G.shape[:-2], dtype=torch.int32)

    try:  # an extension built before the op existed lacks it: keep it usable
        torch._C._dispatch_find_schema_or_throw("tsv_fast::batched_cholesky_inverse", "")
    except RuntimeError:
        return
    torch.library.register_fake("tsv_fast::batched_cholesky_inverse")(fake)


def _cholesky_inverse_torch(G: Tensor, threads: int = 0) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch batched_cholesky_inverse: ``cholesky_ex`` of G's upper triangle, then a
    triangular solve against I; all NaN where Cholesky fails, as from the kernels."""
    _check_cholinv_args("batched_cholesky_inverse", G, threads)
    upper = G.triu()
    R, info = torch.linalg.cholesky_ex(upper + upper.triu(1).mT, upper=True)
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    Rinv = torch.linalg.solve_triangular(torch.where((info == 0)[..., None, None], R, eye), eye, upper=True)
    return Rinv.masked_fill((info != 0)[..., None, None], math.nan), info


def batched_cholesky_inverse(G: Tensor, threads: int = 0) -> tuple[Tensor, Tensor]:
    """``(R⁻¹, info)`` for symmetric positive definite ``G = RᵀR`` (R upper triangular, from
    G's upper triangle only; the lower one is never read), a matrix (n, n) or a batch (B, n, n)
    in float32 or float64: what CholeskyQR multiplies by (``Q = Y R⁻¹``).

    ``info`` (int32, one per matrix) is 0, or like ``torch.linalg.cholesky_ex``'s the 1-based
    index of the first pivot that is not positive (G not numerically positive definite, or
    NaN): that matrix's R⁻¹ is then all NaN.  Where G is singular to working precision, a
    pivot is rounding noise, so whether and where it fails may differ from LAPACK's (as
    between LAPACK builds).  The compiled op factors and inverts each matrix
    in one CUDA block (in shared memory up to n = 169 in float64 on an H100/H200, see
    :func:`cholesky_inverse_shared_order`; ``threads`` per block, default 256), where the
    library route is a batched Cholesky and a batched triangular solve; on the CPU it runs
    the same algorithm (``threads`` > 0 emulates the kernel's threads, for testing).  Error
    of R⁻¹: that of LAPACK's potrf + trtri, about κ(R)·eps.  Falls back to torch (the
    library route) without the extension, and when gradients are needed.
    """
    ok, _ = load_extension()
    needs_grad = torch.is_grad_enabled() and G.requires_grad
    if ok and not needs_grad and _has_kernel("batched_cholesky_inverse", _DISPATCH_KEYS.get(G.device.type)):
        return tuple(torch.ops.tsv_fast.batched_cholesky_inverse(G, int(threads)))
    return _cholesky_inverse_torch(G, threads)


def cholesky_inverse_shared_order(device: torch.device, dtype: torch.dtype = torch.float64) -> int | None:
    """Largest n for which :func:`batched_cholesky_inverse`'s CUDA kernel keeps an n×n matrix in
    the shared memory of ``device`` (169 in float64 on an H100/H200); ``None`` without the CUDA
    kernel.  Larger matrices are factored in global memory, much slower than the library."""
    if dtype not in _EIGH_DTYPES:
        raise ValueError(f"cholesky_inverse_shared_order: the op runs in float32 or float64, not {dtype}")
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _shared_order("batched_cholesky_inverse", index, dtype == torch.float64)


# ---------------------------------------------------------------------------
# segmented_lowrank_apply: the SGMV pattern of LoRA servers, one call per layer
# for a whole mixed-task batch (csrc/segmented.h, csrc/kernels/segmented_lowrank.h,
# csrc/cpu/segmented*.cpp, csrc/cuda/segmented.cu).
#
#   out[a:b] += alpha * ((x[a:b] V_p[:, :k]) * S_p[:k]) U_p[:, :k]^T
#   for every segment s: a, b = offsets[s], offsets[s+1]; p = slots[s] (-1: none); k = ranks[p]
#
# The factors live in a padded table of P slots, U (P, m, kmax), S (P, kmax),
# V (P, n, kmax), ranks (P,), built once with `pack_factors` when the tasks are
# loaded; a call passes only the row offsets and each segment's slot.
# ---------------------------------------------------------------------------

__all__ += ["pack_factors", "segmented_lowrank_apply_packed"]


def _check_factor_triple(where: str, u, s, v) -> bool:
    """Whether one (U, S, V) entry holds a delta: all three None (no delta) or tensors of shapes
    (m, k), (k,), (n, k); anything else (one of them None, a wrong dim) raises TSVInputError
    naming ``where``, rather than failing later or passing for "no delta"."""
    from .errors import TSVInputError

    if u is None and s is None and v is None:
        return False
    if not all(isinstance(t, Tensor) for t in (u, s, v)) or u.dim() != 2 or s.dim() != 1 or v.dim() != 2:
        def describe(t):
            return str(tuple(t.shape)) if isinstance(t, Tensor) else repr(t) if t is None else type(t).__name__

        raise TSVInputError(f"{where}: U, S, V must be (m, k), (k,), (n, k) or all None, got "
                            f"{', '.join(describe(t) for t in (u, s, v))}")
    return True


def pack_factors(U_list, S_list, V_list, dtype: torch.dtype | None = None, *,
                 shape: tuple[int, int] | None = None,
                 device: torch.device | str | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pack per-slot factors into the table of :func:`segmented_lowrank_apply_packed`.

    ``U_list[p]``, ``S_list[p]``, ``V_list[p]`` are (m, k_p), (k_p,), (n, k_p) (a delta
    ``U diag(S) Vᵀ`` of shape m×n), or all three None for a slot without a delta
    (rank 0). Returns ``(U, S, V, ranks)``: U (P, m, kmax), S (P, kmax), V (P, n, kmax),
    zero-padded beyond each slot's rank, in ``dtype`` (default: the promoted dtype of the
    factors) on ``device`` (default: the factors' device, or the CPU when every slot is
    None: pass the inputs' device then), and ranks (P,) int64 on the CPU. ``shape=(m, n)``
    is needed only when every entry is None.
    """
    from .errors import TSVInputError

    P = len(U_list)
    if not (len(S_list) == len(V_list) == P):
        raise TSVInputError(f"pack_factors: got {len(U_list)} U, {len(S_list)} S and {len(V_list)} V")
    m, n = shape if shape is not None else (None, None)
    ranks, dtypes = [], []
    for p, (u, s, v) in enumerate(zip(U_list, S_list, V_list)):
        if not _check_factor_triple(f"pack_factors: slot {p}", u, s, v):
            ranks.append(0)
            continue
        m = u.shape[0] if m is None else m
        n = v.shape[0] if n is None else n
        if u.shape[0] != m or v.shape[0] != n or not (u.shape[1] == s.shape[0] == v.shape[1]):
            raise TSVInputError(f"pack_factors: slot {p}: U{tuple(u.shape)} S{tuple(s.shape)} V{tuple(v.shape)} do "
                                f"not fit a delta of shape ({m}, {n})")
        ranks.append(u.shape[1])
        dtypes += [u.dtype, s.dtype, v.dtype]
        device = u.device if device is None else device
    if m is None:
        raise TSVInputError("pack_factors: every slot is None: pass shape=(m, n)")
    if dtype is None:
        dtype = torch.float32
        if dtypes:
            dtype = dtypes[0]
            for d in dtypes[1:]:
                dtype = torch.promote_types(dtype, d)
    kmax = max(ranks, default=0)
    U = torch.zeros(P, m, kmax, dtype=dtype, device=device)
    S = torch.zeros(P, kmax, dtype=dtype, device=device)
    V = torch.zeros(P, n, kmax, dtype=dtype, device=device)
    for p, (u, s, v) in enumerate(zip(U_list, S_list, V_list)):
        if u is not None:
            k = ranks[p]
            U[p, :, :k] = u
            S[p, :k] = s
            V[p, :, :k] = v
    return U, S, V, torch.tensor(ranks, dtype=torch.long)


# Memory-overlap rules of csrc/segmented.h, so the PyTorch fallback refuses what the compiled op
# refuses. torch._debug_has_internal_overlap is ATen's has_internal_overlap: 0 No, 1 Yes, 2 TooHard
# (0 exactly for non-overlapping dense tensors).
_OVERLAP_NO, _OVERLAP_YES, _OVERLAP_TOO_HARD = 0, 1, 2


def _distinct_elements_2d(t: Tensor) -> bool:
    """No two elements of a 2-D tensor share an address (csrc/segmented.h distinct_elements_2d):
    ATen answers for dense layouts and zero strides; the rest pass when one dim steps over the
    whole extent of the other."""
    status = torch._debug_has_internal_overlap(t)
    if status != _OVERLAP_TOO_HARD:
        return status == _OVERLAP_NO
    if t.shape[0] <= 1 or t.shape[1] <= 1:
        return True
    inner = 0 if t.stride(0) <= t.stride(1) else 1
    return t.stride(1 - inner) >= t.stride(inner) * t.shape[inner]


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata


def _storage_bytes(t: Tensor) -> tuple[int, int]:
    """The bytes [first, end) of its storage that a tensor's elements lie in (strides are >= 0)."""
    last = t.storage_offset() + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.storage_offset() * t.element_size(), (last + 1) * t.element_size()


def _overlap_status(a: Tensor, b: Tensor) -> str:
    """ATen's get_overlap_status: "full" (same elements), "partial", "no" or "too_hard" (a layout
    that is not dense)."""
    if a is b:
        return "full"
    if a.numel() == 0 or b.numel() == 0:
        return "no"
    if torch._debug_has_internal_overlap(a) != _OVERLAP_NO or torch._debug_has_internal_overlap(b) != _OVERLAP_NO:
        return "too_hard"
    if _same_storage(a, b):
        a_first, b_first = a.storage_offset() * a.element_size(), b.storage_offset() * b.element_size()
        a_end, b_end = a_first + a.numel() * a.element_size(), b_first + b.numel() * b.element_size()
        if (a_first, a_end) == (b_first, b_end):
            return "full" if a.stride() == b.stride() else "partial"
        if a_first < b_end and b_first < a_end:
            return "partial"
    return "no"


def _may_share_memory(a: Tensor, b: Tensor) -> bool:
    """csrc/segmented.h may_share_memory: ATen's answer for dense layouts; for the others only
    separate storages, or disjoint byte ranges of one storage, rule an overlap out."""
    status = _overlap_status(a, b)
    if status != "too_hard":
        return status != "no"
    if a.numel() == 0 or b.numel() == 0 or not _same_storage(a, b):
        return False
    (a_first, a_end), (b_first, b_end) = _storage_bytes(a), _storage_bytes(b)
    return a_first < b_end and b_first < a_end


def _check_out_memory(op: str, out_name: str, out: Tensor, x: Tensor, reads: dict[str, Tensor]) -> None:
    """csrc/segmented.h's rule: out's elements distinct, out is x itself or shares no memory with
    it, nor with anything else the op reads (the CPU op and the CUDA kernel read x in different
    orders, so they agree only then); raises ValueError in the compiled op's words."""
    if not _distinct_elements_2d(out):
        raise ValueError(f"{op}: {out_name} has elements that share memory (an expanded or overlapping strided "
                         f"view, got strides {list(out.stride())} for shape {list(out.shape)}); pass a tensor with "
                         f"distinct elements")
    if _overlap_status(out, x) != "full" and _may_share_memory(out, x):
        raise ValueError(f"{op}: {out_name} must be x itself or share no memory with it, but they overlap (or share "
                         f"a storage in layouts too irregular to rule that out)")
    for name, t in reads.items():
        if _may_share_memory(out, t):
            raise ValueError(f"{op}: {out_name} shares memory with {name}, which it reads; pass a separate tensor")


def _check_segmented_args(op: str, out_name: str, out: Tensor, x: Tensor, offsets: Tensor, slots: Tensor,
                          U: Tensor, S: Tensor, V: Tensor, ranks: Tensor, alpha: float,
                          values: bool = True) -> None:
    """Same checks, in the same order and words, as csrc/segmented.h; raises ValueError.
    ``values=False`` skips the checks that read index values or memory addresses (fake tensors)."""
    for name, t, want, layout in (("x", x, 2, "(N, n)"), (out_name, out, 2, "(N, m)"), ("U", U, 3, "(P, m, kmax)"),
                                  ("S", S, 2, "(P, kmax)"), ("V", V, 3, "(P, n, kmax)")):
        if t.dim() != want:
            raise ValueError(f"{op}: {name} must be {want}-D {layout}, got a {t.dim()}-D tensor of shape {list(t.shape)}")
    for name, t in (("x", x), (out_name, out), ("U", U), ("S", S), ("V", V)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must have a floating dtype (float32, float64, float16 or bfloat16), "
                             f"got {t.dtype}")
    if out.dtype != x.dtype:
        raise ValueError(f"{op}: {out_name} has dtype {out.dtype} but x has dtype {x.dtype}; "
                         f"these arguments must share one dtype")
    for name, t in (("S", S), ("V", V)):
        if t.dtype != U.dtype:
            raise ValueError(f"{op}: {name} has dtype {t.dtype} but U has dtype {U.dtype}; "
                             f"these arguments must share one dtype")
    for name, t in ((out_name, out), ("U", U), ("S", S), ("V", V)):
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; all inputs must be on the same device")
    if values:
        _check_out_memory(op, out_name, out, x, {"U": U, "S": S, "V": V, "offsets": offsets, "slots": slots,
                                                 "ranks": ranks})
    N, n, m = x.shape[0], x.shape[1], out.shape[1]
    P, kmax = U.shape[0], U.shape[2]

    def need(name, t, d, expected, what, ref_name, ref):
        if t.shape[d] != expected:
            raise ValueError(f"{op}: {name}.size({d}) must equal {what} = {expected}, but {name} has shape "
                             f"{list(t.shape)} and {ref_name} has shape {list(ref.shape)}")

    need(out_name, out, 0, N, "N (rows of x)", "x", x)
    need("U", U, 1, m, f"m (columns of {out_name})", out_name, out)
    need("V", V, 0, P, "P (factor slots, U.size(0))", "U", U)
    need("V", V, 1, n, "n (columns of x)", "x", x)
    need("V", V, 2, kmax, "kmax (U.size(2))", "U", U)
    need("S", S, 0, P, "P (factor slots, U.size(0))", "U", U)
    need("S", S, 1, kmax, "kmax (U.size(2))", "U", U)
    if offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(f"{op}: offsets must be 1-D with T+1 >= 1 entries, got shape {list(offsets.shape)}")
    T = offsets.shape[0] - 1
    for name, t, length, what in (("offsets", offsets, T + 1, "T+1"), ("slots", slots, T, "T (offsets has T+1 entries)"),
                                  ("ranks", ranks, P, "P (factor slots, U.size(0))")):
        if t.dtype != torch.int64:
            raise ValueError(f"{op}: {name} must have dtype int64, got {t.dtype}")
        if t.dim() != 1 or t.shape[0] != length:
            raise ValueError(f"{op}: {name} must be 1-D of length {what} = {length}, got shape {list(t.shape)}")
        if t.device.type != "cpu" and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; {name} must be on the CPU or on "
                             f"x's device")
    _check_alpha(op, alpha)
    if not values:
        return
    o, sl, rk = (t.tolist() if t.device.type == "cpu" else None for t in (offsets, slots, ranks))
    if o is not None:
        if o[0] < 0 or o[T] > N:
            raise ValueError(f"{op}: offsets must lie within [0, N = {N}], got offsets[0] = {o[0]} and "
                             f"offsets[{T}] = {o[T]}")
        for s in range(T):
            if o[s + 1] < o[s]:
                raise ValueError(f"{op}: offsets must be non-decreasing, but offsets[{s + 1}] = {o[s + 1]} < "
                                 f"offsets[{s}] = {o[s]}")
    if sl is not None:
        for s, p in enumerate(sl):
            if not -1 <= p < P:
                raise ValueError(f"{op}: slots[{s}] = {p} is not a factor slot: must be -1 (no delta) or in "
                                 f"[0, P = {P})")
    if rk is not None:
        for p, k in enumerate(rk):
            if not 0 <= k <= kmax:
                raise ValueError(f"{op}: ranks[{p}] = {k} must lie within [0, kmax = {kmax}] (kmax = U.size(2))")


def _register_segmented_fakes() -> None:
    def functional_fake(name):
        def fake(base, x, offsets, slots, U, S, V, ranks, alpha):
            _check_segmented_args(name, "base", base, x, offsets, slots, U, S, V, ranks, alpha, values=False)
            return base.new_empty(base.shape)
        return fake

    def inplace_fake(name):
        def fake(out, x, offsets, slots, U, S, V, ranks, alpha):
            _check_segmented_args(name, "out", out, x, offsets, slots, U, S, V, ranks, alpha, values=False)
        return fake

    for name in ("segmented_lowrank_apply", "segmented_lowrank_apply_emulated"):
        for op, make in ((name, functional_fake), (name + "_", inplace_fake)):
            try:  # an extension built before this op existed: keep it usable
                torch._C._dispatch_find_schema_or_throw(f"tsv_fast::{op}", "")
            except RuntimeError:
                continue
            torch.library.register_fake(f"tsv_fast::{op}")(make(name))


def _segmented_torch_(out: Tensor, x: Tensor, offsets: Tensor, slots: Tensor, U: Tensor, S: Tensor, V: Tensor,
                      ranks: Tensor, alpha: float = 1.0) -> Tensor:
    """Pure-PyTorch in-place segmented apply: same checks and dtype rules as the kernels
    (float32/float64 compute, one rounding of out); autograd works through it."""
    _check_segmented_args("segmented_lowrank_apply", "out", out, x, offsets, slots, U, S, V, ranks, alpha)
    ct = torch.float64 if torch.float64 in (x.dtype, U.dtype) else torch.float32
    o, sl, rk = offsets.tolist(), slots.tolist(), ranks.tolist()
    for s in range(len(sl)):
        a, b, p = o[s], o[s + 1], sl[s]
        if b == a or p < 0 or rk[p] == 0:
            continue
        k = rk[p]
        # shrink, alpha applied as in the kernels (NaN/Inf factors give NaN/Inf also for alpha = 0)
        t = (x[a:b].to(ct) @ V[p, :, :k].to(ct)) * S[p, :k].to(ct) * alpha
        Ut = U[p, :, :k].to(ct).T
        seg = out[a:b]
        if out.dtype == ct:
            seg.addmm_(t, Ut)  # expand
        else:
            seg.copy_(torch.addmm(seg.to(ct), t, Ut))
    return out


def _as_index(v, name: str) -> Tensor:
    if isinstance(v, Tensor):
        return v
    try:
        return torch.tensor(list(v), dtype=torch.long)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"segmented_lowrank_apply: {name} must be a sequence of ints or an int64 tensor ({e})") from None


def segmented_lowrank_apply_packed(x: Tensor, offsets, U: Tensor, S: Tensor, V: Tensor, ranks: Tensor,
                                   out: Tensor | None = None, alpha: float = 1.0, slots=None) -> Tensor:
    """``out[o_s:o_{s+1}] += α ((x[o_s:o_{s+1}] V_p) ⊙ S_p) U_pᵀ`` for every segment s, in one call.

    Args:
        x: (N, n) input rows, grouped by segment; float32/float64/float16/bfloat16.
        offsets: T+1 non-decreasing row offsets within [0, N] (ints or an int64 tensor);
            rows outside every segment are left alone.
        U, S, V, ranks: the factor table of :func:`pack_factors`: (P, m, kmax), (P, kmax),
            (P, n, kmax) in one float dtype (may differ from x's), ranks (P,) int64; only
            the first ``ranks[p]`` columns of slot p are read.
        out: (N, m) tensor of x's dtype, updated in place (typically ``x W0ᵀ + b``);
            a new zero tensor when None.
        slots: factor slot of each segment (T ints or an int64 tensor; -1 = no delta);
            default ``range(T)`` (segment s uses slot s).

    Returns ``out``. Accumulates in float32 (float64 if x or the factors are float64)
    and rounds each output element once. ``alpha`` and NaN/Inf as in :func:`reconstruct`;
    ``out`` must not overlap itself, nor share memory with the other inputs unless it is
    x itself (the compiled op and the PyTorch path both refuse it, with the same error).
    Index tensors may be on the CPU (validated) or, on CUDA, on the GPU (not validated, no
    device sync). Uses the compiled op for x's device when the extension has one and no
    gradient is needed, else PyTorch.
    """
    if x.dim() != 2:
        raise ValueError(f"segmented_lowrank_apply: x must be 2-D (N, n), got a {x.dim()}-D tensor of shape "
                         f"{list(x.shape)}")
    offsets = _as_index(offsets, "offsets")
    if slots is None:
        slots = torch.arange(max(offsets.shape[0] - 1, 0) if offsets.dim() == 1 else 0, dtype=torch.long)
    slots = _as_index(slots, "slots")
    if out is None:
        if U.dim() != 3:
            raise ValueError(f"segmented_lowrank_apply: U must be 3-D (P, m, kmax), got a {U.dim()}-D tensor of "
                             f"shape {list(U.shape)}")
        out = x.new_zeros(x.shape[0], U.shape[1])
    ok, _ = load_extension()
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, U, S, V, out))
    if ok and not needs_grad and _has_kernel("segmented_lowrank_apply_", _DISPATCH_KEYS.get(x.device.type)):
        torch.ops.tsv_fast.segmented_lowrank_apply_(out, x, offsets, slots, U, S, V, ranks, float(alpha))
        return out
    return _segmented_torch_(out, x, offsets, slots, U, S, V, ranks, alpha)


# Load the ops with their fake kernels now, not on first use: torch.compile then finds both however
# the ops are reached (the wrappers here, torch.ops.tsv_fast.* after importing tsv_fast._C).
load_extension()

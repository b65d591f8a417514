"""Fused low-rank ops, backed by the compiled extension ``tsv_fast._C`` when it is built.

Every public op here has a pure-PyTorch fallback with identical semantics, so the
library works (slower, with an extra temporary) without a compiler.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["load_extension", "has_cuda_kernels", "reconstruct"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_EXT_STATUS: tuple[bool, str] | None = None


def load_extension() -> tuple[bool, str]:
    """Import ``tsv_fast._C`` once (registering ``torch.ops.tsv_fast.*``); return (loaded, why)."""
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

    def reconstruct_fake(base: Tensor, U: Tensor, S: Tensor, V: Tensor, alpha: float) -> Tensor:
        _check_reconstruct_args(base, U, S, V)
        return base.new_empty(base.shape)

    for name in ("reconstruct", "reconstruct_emulated"):
        torch.library.register_fake(f"tsv_fast::{name}")(reconstruct_fake)

    _register_eigh_fakes()


def _check_reconstruct_args(base: Tensor, U: Tensor, S: Tensor, V: Tensor) -> None:
    """Same checks, in the same order, as csrc/reconstruct.h; raises ValueError."""
    if base.dim() not in (2, 3):
        raise ValueError(
            f"reconstruct: base must be 2-D (m, n) or 3-D batched (B, m, n), got a {base.dim()}-D "
            f"tensor of shape {list(base.shape)}"
        )
    batched = base.dim() == 3
    for name, t, want in (("U", U, base.dim()), ("S", S, base.dim() - 1), ("V", V, base.dim())):
        if t.dim() != want:
            raise ValueError(f"reconstruct: {name} must be {want}-D, got a {t.dim()}-D tensor of shape {list(t.shape)}")
    for name, t in (("base", base), ("U", U), ("S", S), ("V", V)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"reconstruct: {name} must have a floating dtype (float32, float64, float16 or bfloat16), got {t.dtype}"
            )
    for name, t in (("S", S), ("V", V)):
        if t.dtype != U.dtype:
            raise ValueError(f"reconstruct: {name} has dtype {t.dtype} but U has dtype {U.dtype}; U, S and V must share one dtype")
    for name, t in (("U", U), ("S", S), ("V", V)):
        if t.device != base.device:
            raise ValueError(f"reconstruct: {name} is on {t.device} but base is on {base.device}; all inputs must be on the same device")

    off = 1 if batched else 0
    m, n, k = base.shape[off], base.shape[off + 1], U.shape[off + 1]

    def need(name: str, t: Tensor, d: int, expected: int, what: str, ref_name: str, ref: Tensor) -> None:
        if t.shape[d] != expected:
            raise ValueError(
                f"reconstruct: {name}.size({d}) must equal {what} = {expected}, but {name} has shape "
                f"{list(t.shape)} and {ref_name} has shape {list(ref.shape)}"
            )

    if batched:
        for name, t in (("U", U), ("S", S), ("V", V)):
            need(name, t, 0, base.shape[0], "the batch size B = base.size(0)", "base", base)
    need("U", U, off, m, "m (rows of base)", "base", base)
    need("V", V, off, n, "n (columns of base)", "base", base)
    need("S", S, off, k, "k (columns of U)", "U", U)
    need("V", V, off + 1, k, "k (columns of U)", "U", U)


def _reconstruct_torch(base: Tensor, U: Tensor, S: Tensor, V: Tensor, alpha: float = 1.0) -> Tensor:
    """Pure-PyTorch reconstruct: same dtype rules as the kernels (float32/float64 compute, one final cast)."""
    _check_reconstruct_args(base, U, S, V)
    ct = torch.float64 if torch.float64 in (base.dtype, U.dtype) else torch.float32
    b = base.to(ct)
    US = U.to(ct) * S.to(ct).unsqueeze(-2)  # U @ diag(S) without forming diag(S)
    Vt = V.to(ct).transpose(-1, -2)
    mm = torch.baddbmm if base.dim() == 3 else torch.addmm
    return mm(b, US, Vt, beta=1, alpha=alpha).to(base.dtype).contiguous()


def reconstruct(base: Tensor, U: Tensor, S: Tensor, V: Tensor, alpha: float = 1.0) -> Tensor:
    """Return ``base + alpha * U @ diag(S) @ V^T`` as a new tensor of base's dtype, shape and device.

    Rebuilds a weight from its low-rank factors without materialising the low-rank
    product separately.  Shapes: base (m, n), U (m, k), S (k,), V (n, k), or the same
    with a leading batch dim B.  Factors may have a different float dtype than base
    (all three the same); accumulation is float32 (float64 if anything is float64).
    Uses the compiled kernel for base's device when available, else PyTorch (also when
    gradients are needed: the compiled op has no autograd formula).
    """
    ok, _ = load_extension()
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (base, U, S, V))
    if ok and not needs_grad and _has_kernel("reconstruct", _DISPATCH_KEYS.get(base.device.type)):
        return torch.ops.tsv_fast.reconstruct(base, U, S, V, float(alpha))
    return _reconstruct_torch(base, U, S, V, alpha)


# ---------------------------------------------------------------------------
# batched_eigh: eigen-decomposition of a batch of small symmetric matrices
# (csrc/eigh.h, csrc/kernels/jacobi_eigh.h, csrc/cpu/eigh*.cpp, csrc/cuda/eigh.cu).
# ---------------------------------------------------------------------------

__all__ += ["batched_eigh"]

_EIGH_DTYPES = (torch.float32, torch.float64)


def _check_eigh_args(op: str, A: Tensor, max_sweeps: int, tol: float) -> None:
    """Same checks, in the same order, as csrc/eigh.h; raises ValueError."""
    if A.dim() not in (2, 3):
        raise ValueError(
            f"{op}: A must be 2-D (n, n) or 3-D batched (B, n, n), got a {A.dim()}-D tensor of shape {list(A.shape)}"
        )
    if A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{op}: A must be square (its last two dims equal), got shape {list(A.shape)}")
    if A.dtype not in _EIGH_DTYPES:
        raise ValueError(f"{op}: A must have dtype float32 or float64, got {A.dtype}")
    if max_sweeps < 0:
        raise ValueError(f"{op}: max_sweeps must be >= 0, got {max_sweeps}")
    if not (tol >= 0 and tol != float("inf")):
        raise ValueError(f"{op}: tol must be a finite number >= 0 (0 = working precision), got {tol}")


def _register_eigh_fakes() -> None:
    def eigh_fake(A: Tensor, max_sweeps: int = 30, tol: float = 0.0) -> tuple[Tensor, Tensor]:
        _check_eigh_args("batched_eigh", A, max_sweeps, tol)
        return A.new_empty(A.shape[:-1]), A.new_empty(A.shape)

    def eigh_emulated_fake(A: Tensor, max_sweeps: int = 30, tol: float = 0.0,
                           force_path: int = -1) -> tuple[Tensor, Tensor]:
        _check_eigh_args("batched_eigh_emulated", A, max_sweeps, tol)
        return A.new_empty(A.shape[:-1]), A.new_empty(A.shape)

    for name, fake in (("batched_eigh", eigh_fake), ("batched_eigh_emulated", eigh_emulated_fake)):
        try:  # an extension built before batched_eigh existed lacks the ops: keep it usable
            torch._C._dispatch_find_schema_or_throw(f"tsv_fast::{name}", "")
        except RuntimeError:
            continue
        torch.library.register_fake(f"tsv_fast::{name}")(fake)


def _batched_eigh_torch(A: Tensor, max_sweeps: int = 30, tol: float = 0.0) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch batched_eigh: torch.linalg.eigh of the symmetrised input (max_sweeps/tol unused)."""
    _check_eigh_args("batched_eigh", A, max_sweeps, tol)
    w, V = torch.linalg.eigh((A + A.mT) * 0.5)
    return w, V


def batched_eigh(A: Tensor, max_sweeps: int = 30, tol: float = 0.0) -> tuple[Tensor, Tensor]:
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
    working precision) or a sweep rotates nothing.  Eigenvectors of repeated
    eigenvalues are an arbitrary orthonormal basis of their eigenspace, and signs
    are arbitrary, as with any eigensolver.

    Falls back to ``torch.linalg.eigh`` (same conventions) when the extension has
    no kernel for A's device, and when gradients are needed (the compiled op has
    no autograd formula).
    """
    ok, _ = load_extension()
    needs_grad = torch.is_grad_enabled() and A.requires_grad
    if ok and not needs_grad and _has_kernel("batched_eigh", _DISPATCH_KEYS.get(A.device.type)):
        return tuple(torch.ops.tsv_fast.batched_eigh(A, int(max_sweeps), float(tol)))
    return _batched_eigh_torch(A, max_sweeps, tol)

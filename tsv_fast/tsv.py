"""Task Singular Vectors, one matrix key at a time (SPEC.md: TSV-C, TSV-M, STI).

Everything here works on the factors of one key; :mod:`tsv_fast.merge`,
:mod:`tsv_fast.compress` and :mod:`tsv_fast.interference` loop over keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .solvers import get_solver
from .tasks import Factors, TaskSource, stack_deltas


def task_factors(
    sources: Sequence[TaskSource], key: str, base_tensor: Tensor, k: int,
    solver: str = "exact", device: torch.device | None = None, residuals: dict | None = None,
) -> list[Factors]:
    """The k leading singular triplets of every task's delta for ``key`` (TSV-C, step 1 of TSV-M).

    Dense tasks are stacked and factorised in one batched solver call; compressed tasks
    give their stored factors (already at most their stored rank). An approximate
    solver's relative residual per task goes into ``residuals[key]`` when given.
    """
    device = device or base_tensor.device
    dense = [i for i, s in enumerate(sources) if s.factors(key) is None]
    out: list[Factors | None] = [None] * len(sources)
    if dense:
        stack = stack_deltas([sources[i] for i in dense], key, base_tensor, device)
        U, S, V, residual = get_solver(solver)(stack, k)
        if residuals is not None and residual is not None:
            residuals[key] = residual.tolist()
        for j, i in enumerate(dense):
            out[i] = (U[j], S[j], V[j])
        del stack
    dtype = torch.float64 if base_tensor.dtype == torch.float64 else torch.float32
    for i, s in enumerate(sources):
        if out[i] is None:
            U, S, V = s.factors(key)
            out[i] = (U[:, :k].to(device, dtype), S[:k].to(device, dtype), V[:, :k].to(device, dtype))
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


def whitening(X: Tensor) -> Tensor:
    """``W = (XᵀX)^(-1/2)`` in float64 (c×c), so that ``X W`` is the polar factor of X.

    Costs a c×c Gram matrix and one float64 ``eigh`` instead of an SVD of the tall X.
    float64 matters: X is often ill-conditioned (SPEC.md) and its Gram matrix squares
    the condition number. Directions whose singular value is below ``8·eps`` of X's
    dtype (relative to the largest) are numerically duplicated tasks: there X W is
    set to zero (pseudo-inverse) instead of an arbitrary orthonormal completion, so
    duplicated tasks merge to their common part and the result is always finite.
    """
    G = X.double().mT @ X.double()
    w, Q = torch.linalg.eigh(G)
    rcond = 8 * torch.finfo(X.dtype).eps
    keep = w > (rcond ** 2) * w[..., -1:].clamp(min=torch.finfo(torch.float64).tiny)
    inv_sqrt = torch.where(keep, w.clamp(min=torch.finfo(torch.float64).tiny).rsqrt(), 0.0)
    return (Q * inv_sqrt.unsqueeze(-2)) @ Q.mT


def tsv_merge_factors(factors: Sequence[Factors]) -> Factors:
    """TSV-M steps 2–3: concatenate and whiten both sides; ``Δ = U⊥ diag(S) V⊥ᵀ``.

    ``U⊥ = U W_U`` is formed in float64 and only then rounded: being orthonormal it
    survives rounding, whereas ``U`` times an ill-conditioned ``W_U`` would not.
    """
    U, S, V = concat_factors(factors)
    U_perp = (U.double() @ whitening(U)).to(U.dtype)
    V_perp = (V.double() @ whitening(V)).to(V.dtype)
    return U_perp, S, V_perp


def singular_task_interference(factors: Sequence[Factors]) -> tuple[float, Tensor]:
    """STI of a key: ``‖(UᵀU − I) diag(S) (VᵀV − I)‖₁`` over all tasks, and per task pair.

    The pair value (i, j) is the same quantity for the concatenation of tasks i and j
    only; it reuses the cross-task blocks of the Gram matrices. The diagonal is 0.
    """
    U, S, V = concat_factors(factors)
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

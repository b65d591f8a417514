"""Top-k SVD solvers for batches of same-shape matrices.

Every solver takes ``A`` of shape ``(..., m, n)`` and returns ``U (..., m, k)``,
``S (..., k)`` (descending) and ``V (..., n, k)`` with ``A ≈ U diag(S) Vᵀ``. This is the
seam where faster solvers plug in; ``"exact"`` is the reference everything is judged by.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .errors import TSVInputError

Solver = Callable[[Tensor, int], tuple[Tensor, Tensor, Tensor]]


def exact_topk(A: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD (LAPACK / cuSOLVER through torch), truncated to the k leading triplets."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[..., :k], S[..., :k], Vh[..., :k, :].mT


SOLVERS: dict[str, Solver] = {"exact": exact_topk}


def get_solver(name: str) -> Solver:
    try:
        return SOLVERS[name]
    except KeyError:
        raise TSVInputError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None

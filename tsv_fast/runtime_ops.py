"""Segmented low-rank apply: one base GEMM for a mixed-task batch, one small GEMM pair per task.

A batch whose rows belong to different tasks is sorted by task so that each task owns
one contiguous segment of rows; then ``y = x W0ᵀ`` is one GEMM over the whole batch and
each segment adds its own low-rank term ``((x_seg V_t) ⊙ S_t) U_tᵀ`` (SPEC.md: the SGMV
pattern of Punica / S-LoRA / vLLM's LoRA kernels).

This module is the pure-PyTorch implementation and the seam for a fused C++/CUDA op:
``segmented_lowrank_apply`` has the signature such a kernel would take (row offsets
plus per-segment factors), so a compiled version can replace the loop without touching
the runtime.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from .errors import TSVInputError

__all__ = ["group_rows", "segmented_lowrank_apply"]


def group_rows(row_tasks: Sequence[Hashable]) -> tuple[Tensor, list[int], list[Hashable]]:
    """Stable grouping of rows by task: ``(order, offsets, tasks)``.

    ``x[order]`` puts the rows of each task together (in order of first appearance,
    rows of one task keeping their relative order); segment ``i`` is rows
    ``offsets[i]:offsets[i+1]`` of the sorted batch and belongs to ``tasks[i]``.
    ``torch.argsort(order)`` undoes the permutation.
    """
    first: dict[Hashable, int] = {}
    for t in row_tasks:
        first.setdefault(t, len(first))
    ids = torch.tensor([first[t] for t in row_tasks], dtype=torch.long)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=len(first)).tolist()
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return order, offsets, list(first)


def segmented_lowrank_apply(
    x: Tensor,
    offsets: Sequence[int],
    U: Sequence[Tensor | None],
    S: Sequence[Tensor | None],
    V: Sequence[Tensor | None],
    out: Tensor | None = None,
    alpha: float = 1.0,
) -> Tensor:
    """``out[o_i:o_{i+1}] += α ((x[o_i:o_{i+1}] V_i) ⊙ S_i) U_iᵀ`` for every segment i.

    Args:
        x: (N, n) input rows, grouped by segment.
        offsets: T+1 non-decreasing row offsets (``offsets[0]`` ≥ 0, ``offsets[-1]`` ≤ N);
            rows outside every segment are left alone.
        U, S, V: per segment, factors (m, k_i), (k_i,), (n, k_i) of the segment's
            delta ``U diag(S) Vᵀ`` (m×n, the layout of an ``nn.Linear`` weight); None
            for a segment without a delta. Factors may be in another float dtype than
            ``x`` (e.g. bfloat16 storage); they are cast per call.
        out: (N, m) tensor updated in place (typically ``x W0ᵀ + b`` already); a new
            zero tensor when None.

    Returns ``out``. The delta is never formed: the cost is ``N·k·(m+n)`` per segment,
    not ``m·n``.
    """
    if x.dim() != 2:
        raise TSVInputError(f"segmented_lowrank_apply: x must be 2-D (N, n), got shape {list(x.shape)}")
    T = len(offsets) - 1
    if T < 0 or not (len(U) == len(S) == len(V) == T):
        raise TSVInputError(f"segmented_lowrank_apply: {len(offsets)} offsets define {T} segments but got "
                            f"{len(U)} U, {len(S)} S, {len(V)} V")
    if any(b < a for a, b in zip(offsets, offsets[1:])) or (T >= 0 and (offsets[0] < 0 or offsets[-1] > x.shape[0])):
        raise TSVInputError(f"segmented_lowrank_apply: offsets {list(offsets)} must be non-decreasing within "
                            f"[0, {x.shape[0]}]")
    m = next((u.shape[0] for u in U if u is not None), None)
    if out is None:
        if m is None:
            raise TSVInputError("segmented_lowrank_apply: no segment has factors and no out tensor was given")
        out = x.new_zeros(x.shape[0], m)
    for i in range(T):
        if U[i] is None:
            continue
        Ui, Si, Vi = U[i], S[i], V[i]
        if Vi.shape[0] != x.shape[1] or Ui.shape[0] != out.shape[1] or not (Ui.shape[1] == Si.shape[0] == Vi.shape[1]):
            raise TSVInputError(f"segmented_lowrank_apply: segment {i}: U{tuple(Ui.shape)} S{tuple(Si.shape)} "
                                f"V{tuple(Vi.shape)} do not fit x{tuple(x.shape)} → out{tuple(out.shape)}")
        a, b = offsets[i], offsets[i + 1]
        if b == a or Si.shape[0] == 0:
            continue
        dt = x.dtype
        t = (x[a:b] @ Vi.to(dt)) * Si.to(dt)
        out[a:b].addmm_(t, Ui.to(dt).T, alpha=alpha)
    return out

"""Segmented low-rank apply: one base GEMM for a mixed-task batch, one small GEMM pair per task.

A batch whose rows belong to different tasks is sorted by task so that each task owns
one contiguous segment of rows; then ``y = x W0ᵀ`` is one GEMM over the whole batch and
each segment adds its own low-rank term ``((x_seg V_t) ⊙ S_t) U_tᵀ`` (SPEC.md: the SGMV
pattern of Punica / S-LoRA / vLLM's LoRA kernels).

``segmented_lowrank_apply`` here takes per-segment factor lists, packs them
(:func:`tsv_fast.ops.pack_factors`) and runs the compiled op
(:func:`tsv_fast.ops.segmented_lowrank_apply_packed`: one call for all segments; CPU
GEMMs per segment, a shrink/expand SGMV kernel pair on CUDA), or its pure-PyTorch
fallback. The runtime packs each layer's factors once and calls the packed op itself.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from . import ops
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
            delta ``U diag(S) Vᵀ`` (m×n, the layout of an ``nn.Linear`` weight); all three
            None for a segment without a delta (one or two None is an error). Factors may
            be in another float dtype than ``x`` (e.g. bfloat16 storage); products
            accumulate in float32 (float64 if anything is float64) and ``out`` is rounded once.
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
    present = [i for i in range(T)
               if ops._check_factor_triple(f"segmented_lowrank_apply: segment {i}", U[i], S[i], V[i])]
    if out is None:
        if not present:
            raise TSVInputError("segmented_lowrank_apply: no segment has factors and no out tensor was given")
        out = x.new_zeros(x.shape[0], U[present[0]].shape[0])
    for i in present:
        Ui, Si, Vi = U[i], S[i], V[i]
        if Vi.shape[0] != x.shape[1] or Ui.shape[0] != out.shape[1] or not (Ui.shape[1] == Si.shape[0] == Vi.shape[1]):
            raise TSVInputError(f"segmented_lowrank_apply: segment {i}: U{tuple(Ui.shape)} S{tuple(Si.shape)} "
                                f"V{tuple(Vi.shape)} do not fit x{tuple(x.shape)} → out{tuple(out.shape)}")
    if not present:
        return out
    # The op reads a factor table (P, m, kmax) plus a slot per segment. One segment with
    # factors (the single-task path) is a view of its factors; several are packed, which
    # copies them: callers that reuse factors (the runtime's mixed batches) pack once with
    # ops.pack_factors and call ops.segmented_lowrank_apply_packed directly.
    slot = {i: p for p, i in enumerate(present)}
    slots = [slot.get(i, -1) for i in range(T)]
    if len(present) == 1:
        i = present[0]
        dt = torch.promote_types(torch.promote_types(U[i].dtype, S[i].dtype), V[i].dtype)  # as pack_factors
        table = (U[i].to(x.device, dt)[None], S[i].to(x.device, dt)[None], V[i].to(x.device, dt)[None],
                 torch.tensor([S[i].shape[0]], dtype=torch.long))
    else:
        table = ops.pack_factors([U[i].to(x.device) for i in present], [S[i].to(x.device) for i in present],
                                 [V[i].to(x.device) for i in present], shape=(out.shape[1], x.shape[1]),
                                 device=x.device)
    return ops.segmented_lowrank_apply_packed(x, list(offsets), *table, out=out, alpha=alpha, slots=slots)

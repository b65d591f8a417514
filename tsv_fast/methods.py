"""Merge methods, one function per method, in one registry.

A method merges one key: it gets the base tensor and the task sources and returns the
merged weight. :func:`tsv_fast.merge_layers` does the looping, selection and dtype
handling, so a new method is a function and a registry entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import ops, solvers
from .errors import TSVInputError
from .keys import check_rank, is_matrix_key, resolve_rank
from .solvers import EXACT_SOLVERS
from .tasks import (StateDict, TaskSource, checked_base_tensor, compute_dtype, delta_overflow, nonfinite, stack_deltas,
                    tensor_meta)
from .tsv import POLAR_METHODS, shape_batch_factors, tsv_merge_batch, tsv_merge_factors


@dataclass
class KeyContext:
    """What a method needs besides the key's tensors."""

    alpha: float
    solver: str = "exact"
    device: torch.device | None = None
    options: dict = field(default_factory=dict)
    zero_rank_keys: list[str] = field(default_factory=list)
    residuals: dict[str, list[float]] = field(default_factory=dict)  # approximate solvers' errors
    largest_batch_bytes: int = 0  # stacked deltas of the merge's largest shape batch (0: none)
    polar_counts: dict[str, int] = field(default_factory=dict)  # Newton–Schulz kept / fell back
    out_dtype: torch.dtype | None = None  # the merge's output dtype (None: each base's)
    ties_thresholds: Tensor | None = None  # TIES trim="model": each task's whole-model threshold, (T,)


MergeFn = Callable[[str, Tensor, Sequence[TaskSource], KeyContext], Tensor]


GroupMergeFn = Callable[[Sequence[str], Sequence[Tensor], Sequence[TaskSource], KeyContext], list[Tensor]]


PrepareFn = Callable[[StateDict, Sequence[str], Sequence[TaskSource], KeyContext], None]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    merge_key: MergeFn
    default_alpha: float
    options: dict  # option name -> default
    summary: str
    merge_group: GroupMergeFn | None = None  # several same-shape matrix keys at once (batch="shape")
    merge_elementwise: GroupMergeFn | None = None  # keys merged elementwise (not merge_group's), at once
    check_options: Callable[[dict], None] | None = None  # raises on bad values, before any key is merged
    prepare: PrepareFn | None = None  # a pass over the tasks' deltas of all merged keys, before the first key


def _deltas(key: str, base: Tensor, sources: Sequence[TaskSource], device) -> Tensor:
    return stack_deltas(sources, key, base, device)


def _mean_deltas(keys: Sequence[str], bases: Sequence[Tensor], sources: Sequence[TaskSource],
                 device) -> list[Tensor]:
    """Each key's mean task delta (``bases`` in the compute dtype, on ``device``), as a running
    sum: the sums and one task's deltas (with its weights in the compute dtype) are alive
    whatever the number of tasks, and each step is one multi-tensor op for all the keys (a few
    GPU launches instead of a few per key: a ViT has hundreds of bias and LayerNorm keys).

    The first two deltas are added out of place: a task vector's delta may be the caller's own
    tensor, which must not be modified. NaN/Inf in any delta make the sums non-finite, so one
    check of the sums (one host sync) finds them; only then is each key checked, task by task,
    for the error naming them (a sum that overflowed from finite deltas is left to the output
    check)."""
    per_task = (s.deltas(keys, bases, device) for s in sources)
    totals = next(per_task)
    totals = torch._foreach_add(totals, next(per_task)) if len(sources) > 1 else [t.clone() for t in totals]
    for deltas in per_task:
        torch._foreach_add_(totals, deltas)
    if nonfinite(totals):
        for key, b in zip(keys, bases):  # in key order, as one key at a time would find them
            for s in sources:
                s.delta(key, b, device)  # raises, naming the task, if its weights are not finite
    torch._foreach_div_(totals, len(sources))
    return totals


def _add_mean_deltas(keys: Sequence[str], bases: Sequence[Tensor], sources: Sequence[TaskSource],
                     device, alpha: float) -> list[Tensor]:
    """``base + α · mean τt`` for each key, in the compute dtype. The bases are converted once
    here, not once per task (float16/bfloat16 models)."""
    bases = [b.to(device or b.device, compute_dtype(b)) for b in bases]
    return torch._foreach_add(bases, _mean_deltas(keys, bases, sources, device), alpha=alpha)


def merge_mean_group(keys: Sequence[str], bases: Sequence[Tensor], sources: Sequence[TaskSource],
                     ctx: KeyContext) -> list[Tensor]:
    """Weight averaging of several keys at once (TSV-M's rule for non-matrix keys too)."""
    return _add_mean_deltas(keys, bases, sources, ctx.device, ctx.alpha)


def merge_task_arithmetic_group(keys: Sequence[str], bases: Sequence[Tensor], sources: Sequence[TaskSource],
                                ctx: KeyContext) -> list[Tensor]:
    """Task Arithmetic of several keys at once: ``θ0 + λ Σ τt``."""
    return _add_mean_deltas(keys, bases, sources, ctx.device, ctx.alpha * len(sources))


def merge_tsv(key: str, base: Tensor, sources: Sequence[TaskSource], ctx: KeyContext) -> Tensor:
    """TSV-M: whitened concatenation of every task's top-k factors (k = floor(r/T) unless the
    ``rank`` option says otherwise); mean of the deltas on non-matrix keys."""
    if not is_matrix_key(key, base):
        return merge_mean_group([key], [base], sources, ctx)[0]
    return merge_tsv_group([key], [base], sources, ctx)[0]


# A shape batch's merge may use this many times the stacked deltas of the merge's largest
# shape batch (the bound is 2×); tsv_key_bytes says what one key needs.
PEAK_SHARE = 1.9


def tsv_key_bytes(shape: Sequence[int], k: int, T: int, element_size: int = 4, stacked: int | None = None) -> int:
    """Peak bytes one key adds to a TSV-M shape batch, the larger of its two phases (fitted with
    :func:`tsv_fast.memory.peak_tensor_bytes` on the GPU route): finding the factors (the stacked
    deltas of its ``stacked`` dense tasks, default all T; ``solvers.WORK_SHARE`` of them in
    float64 work, the short-side vectors) and whitening (float64 factors, results in the keys'
    dtype, the polar factors' float64 temporaries: the concatenations and about ten c×c
    matrices, c = T·k). The second dominates for few tasks (c stays about the width while the
    stack shrinks with T) and for square keys."""
    m, n = max(shape), min(shape)
    c = k * T
    stack = element_size * m * n * (T if stacked is None else stacked)
    find = stack * (1 + solvers.WORK_SHARE) + 8 * n * c
    whiten = (12 + element_size) * (m + n) * c + 80 * c * c
    return int(max(find, whiten))


def _sub_batches(keys: Sequence[str], per_key: int, budget: float | None) -> list[slice]:
    """Runs of ``keys`` of one size (the last may be shorter) whose peak (``per_key`` each) stays
    within ``budget`` (one key at least); the whole batch when it fits or no budget is known."""
    fit = len(keys) if budget is None else max(1, min(len(keys), int(budget // max(per_key, 1))))
    parts = -(-len(keys) // fit)
    size = -(-len(keys) // parts)
    return [slice(i, i + size) for i in range(0, len(keys), size)]


def merge_tsv_group(keys: Sequence[str], bases: Sequence[Tensor], sources: Sequence[TaskSource],
                    ctx: KeyContext) -> list[Tensor]:
    """TSV-M of several matrix keys of one shape, their top-k factors found in one solver call
    per sub-batch: as many keys as keep the peak within ``PEAK_SHARE`` of the merge's largest
    shape batch (all of them at the benchmarks' T ≥ 8; fewer for T ≤ 4, where the float64
    whitening of each key outweighs its stacked deltas)."""
    k = resolve_rank(bases[0].shape, ctx.options["rank"], len(sources))
    if k == 0:
        ctx.zero_rank_keys.extend(keys)
        return [b.clone() for b in bases]
    stacked = sum(all(s.factors(key) is None for key in keys) for s in sources)  # compressed: stored factors
    per_key = tsv_key_bytes(bases[0].shape, k, len(sources), compute_dtype(bases[0]).itemsize, stacked)
    merged: list[Tensor] = []
    budget = PEAK_SHARE * ctx.largest_batch_bytes if ctx.largest_batch_bytes else None
    for part in _sub_batches(keys, per_key, budget):
        merged += _merge_tsv_batch(keys[part], bases[part], sources, ctx, k)
    return merged


def _merge_tsv_batch(keys: Sequence[str], bases: Sequence[Tensor], sources: Sequence[TaskSource],
                     ctx: KeyContext, k: int) -> list[Tensor]:
    # The exact solver's float64 factors are orthonormal per task, so the whitening can skip
    # the identity blocks of its Gram matrices; stored (compressed) factors are rounded.
    exact = ctx.solver in EXACT_SOLVERS and all(s.factors(key) is None for s in sources for key in keys)
    with solvers.work_base(ctx.largest_batch_bytes or None):  # chunks sized by the largest batch
        batch = shape_batch_factors(sources, keys, bases, k, ctx.solver, ctx.device, ctx.residuals,
                                    float64_factors=exact)
    ranks = {tuple(f[1].shape[0] for f in factors) for factors in batch}
    if len(ranks) == 1:  # one batched whitening for all keys (stored factors may differ in rank)
        U, S, V = tsv_merge_batch(batch, orthonormal=exact, polar=ctx.options["polar"],
                                  counts=ctx.polar_counts, dtype=compute_dtype(bases[0]))
        return [ops.reconstruct(_widened(b, ctx.out_dtype), U[j], S[j], V[j], ctx.alpha) for j, b in enumerate(bases)]
    merged = []
    for b, factors in zip(bases, batch):
        U, S, V = tsv_merge_factors(factors, orthonormal=exact, polar=ctx.options["polar"],
                                    counts=ctx.polar_counts, dtype=compute_dtype(b))
        merged.append(ops.reconstruct(_widened(b, ctx.out_dtype), U, S, V, ctx.alpha))
    return merged


def _widened(base: Tensor, out_dtype: torch.dtype | None) -> Tensor:
    """The base to reconstruct on (the fused op writes in its dtype): widened when the output
    asks for more precision than the base has (a bfloat16 base merged to float32), so Δ is
    not rounded to the base's dtype on the way."""
    if out_dtype is None or out_dtype == base.dtype:
        return base
    return base.to(torch.promote_types(compute_dtype(base), out_dtype))


def merge_task_arithmetic(key: str, base: Tensor, sources: Sequence[TaskSource], ctx: KeyContext) -> Tensor:
    """``θ0 + λ Σ τt``."""
    return merge_task_arithmetic_group([key], [base], sources, ctx)[0]


def merge_mean(key: str, base: Tensor, sources: Sequence[TaskSource], ctx: KeyContext) -> Tensor:
    """Weight averaging ``mean θt`` (= ``θ0 + mean τt``; α scales the mean delta)."""
    return merge_mean_group([key], [base], sources, ctx)[0]


def ties_delta(taus: Tensor, density: float, thresholds: Tensor | None = None) -> Tensor:
    """TIES on stacked deltas ``(T, ...)``: trim to top-``density`` magnitudes per task (of this
    key; or, given ``thresholds`` ``(T,)``, to the magnitudes at or above each task's whole-model
    threshold), elect a sign per entry from the trimmed sum, average the entries that agree with it.
    """
    T = taus.shape[0]
    flat = taus.reshape(T, -1)
    keep = max(1, int(round(density * flat.shape[1])))
    if thresholds is not None:
        thresholds = thresholds.to(flat.device).view(T, 1)
    elif keep < flat.shape[1]:
        thresholds = flat.abs().kthvalue(flat.shape[1] - keep + 1, dim=1, keepdim=True).values
    if thresholds is not None:
        flat = torch.where(flat.abs() >= thresholds, flat, torch.zeros((), dtype=flat.dtype))
    sign = torch.sign(flat.sum(0))
    agree = (torch.sign(flat) == sign) & (flat != 0)
    merged = (flat * agree).sum(0) / agree.sum(0).clamp(min=1)
    return merged.reshape(taus.shape[1:])


def _add(base: Tensor, delta: Tensor, alpha: float) -> Tensor:
    return base.to(delta.dtype).add_(delta, alpha=alpha) if base.dtype != delta.dtype \
        else torch.add(base, delta, alpha=alpha)


def merge_ties(key: str, base: Tensor, sources: Sequence[TaskSource], ctx: KeyContext) -> Tensor:
    """TIES-merging, trimmed per key (``trim="key"``, as mergekit does) or at each task's
    whole-model threshold (``trim="model"``, the TIES paper's code), then ``θ0 + λ·merged``."""
    thresholds = ctx.ties_thresholds if ctx.options["trim"] == "model" else None
    taus = _deltas(key, base, sources, ctx.device)
    return _add(base, ties_delta(taus, float(ctx.options["density"]), thresholds), ctx.alpha)


def ties_model_thresholds(base: StateDict, keys: Sequence[str], sources: Sequence[TaskSource],
                          ctx: KeyContext) -> None:
    """For ``trim="model"``: each task's ``keep``-th largest ``|τ|`` over all the ``keys`` TIES
    merges, flattened into one vector as the TIES paper's code flattens the state dict (matrix
    and other keys alike; keys a task vector lacks count as zeros), into ``ctx.ties_thresholds``.

    One task at a time: its ``|τ|`` concatenated in the compute dtype (float32; float64 if any
    key is) is the pass's peak, and :func:`kth_smallest` selects exactly what one ``kthvalue``
    over that vector would, with chunk-sized temporaries. Inputs are checked here (NaN/Inf in
    any task's weights, a delta past the dtype's range), before the first key is merged."""
    if ctx.options["trim"] != "model":
        return
    metas = [tensor_meta(base, key, "base") for key in keys]
    sizes = [math.prod(shape) for shape, _ in metas]
    total = sum(sizes)
    keep = max(1, int(round(float(ctx.options["density"]) * total)))
    if keep >= total:  # nothing trimmed: no pass (a lazy input is then read once)
        ctx.ties_thresholds = torch.zeros(len(sources))
        return
    dtype = torch.float64 if any(dtype == torch.float64 for _, dtype in metas) else torch.float32
    device = ctx.device or checked_base_tensor(base, keys[0]).device
    thresholds = []
    for t, source in enumerate(sources):
        flat = torch.empty(total, dtype=dtype, device=device)
        offset = 0
        for key, size in zip(keys, sizes):
            b = checked_base_tensor(base, key) if t == 0 else base[key]  # the base is checked once
            flat[offset:offset + size].copy_(source.delta(key, b, ctx.device).reshape(-1)).abs_()
            offset += size
        if nonfinite([flat]):  # finite weights whose delta overflows (NaN/Inf weights raised above)
            parts = flat.split(sizes)
            key = keys[nonfinite(list(parts))[0]]
            raise delta_overflow(source.name, key, dtype)
        thresholds.append(kth_smallest(flat, total - keep + 1))
        del flat
    ctx.ties_thresholds = torch.stack(thresholds)


def kth_smallest(values: Tensor, k: int, chunk: int = 1 << 22) -> Tensor:
    """The ``k``-th smallest (1-based) of the non-negative floats ``values`` (1-D float32 or
    float64), exactly ``values.kthvalue(k).values``: a radix select on the bit patterns, which
    order like the values for non-negative floats, 16 bits per pass (2 passes for float32), each
    a ``bincount`` per chunk. Extra memory is a few chunks (``kthvalue`` on a CPU copies the
    values and allocates int64 indices, 3× the vector more) and it runs on any device."""
    int_dtype = {torch.float32: torch.int32, torch.float64: torch.int64}[values.dtype]
    bits = values.view(int_dtype)
    width = 8 * values.element_size()
    prefix = 0  # the high bits of the answer found so far
    for shift in range(width - 16, -1, -16):
        hist = torch.zeros(1 << 16, dtype=torch.int64, device=values.device)
        for start in range(0, bits.numel(), chunk):
            part = bits[start:start + chunk]
            if shift + 16 < width:
                part = part[(part >> (shift + 16)) == prefix]
            hist += torch.bincount((part >> shift) & 0xFFFF, minlength=1 << 16)
        counts = hist.cumsum(0)
        digit = int(torch.searchsorted(counts, k))  # the first digit whose count reaches k
        k -= int(counts[digit - 1]) if digit else 0
        prefix = (prefix << 16) | digit
    return torch.tensor(prefix, dtype=int_dtype).view(values.dtype).to(values.device)


def _check_tsv_options(options: dict) -> None:
    if options["polar"] not in POLAR_METHODS:
        raise TSVInputError(f"tsv: polar must be one of {POLAR_METHODS}, got {options['polar']!r}")
    check_rank(options["rank"])


def as_real(value) -> float | None:
    """``value`` as a float if it is a number (Python, NumPy or a one-element tensor), not a bool
    or a string; else None."""
    try:
        return None if isinstance(value, (bool, str)) else float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


TIES_TRIMS = ("key", "model")


def _check_ties_options(options: dict) -> None:
    density = options["density"]
    value = as_real(density)
    if value is None or not 0 < value <= 1:
        raise TSVInputError(f"ties: density must be a number in (0, 1], got {density!r}")
    trim = options["trim"]
    if not isinstance(trim, str) or trim not in TIES_TRIMS:
        raise TSVInputError(f"ties: trim must be one of {TIES_TRIMS} (per key, or over the whole model as in "
                            f"the TIES paper), got {trim!r}")


METHODS: dict[str, MergeMethod] = {
    m.name: m for m in [
        MergeMethod("tsv", merge_tsv, 1.0, {"rank": None, "polar": "auto"}, "TSV-M (Gargiulo et al., CVPR 2025)",
                    merge_group=merge_tsv_group, merge_elementwise=merge_mean_group, check_options=_check_tsv_options),
        MergeMethod("task_arithmetic", merge_task_arithmetic, 0.3, {}, "θ0 + λ Σ τt",
                    merge_elementwise=merge_task_arithmetic_group),
        MergeMethod("ties", merge_ties, 1.0, {"density": 0.2, "trim": "key"},
                    "TIES-merging (trim, elect sign, disjoint mean)", check_options=_check_ties_options,
                    prepare=ties_model_thresholds),
        MergeMethod("mean", merge_mean, 1.0, {}, "weight averaging", merge_elementwise=merge_mean_group),
    ]
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise TSVInputError(f"unknown merge method {name!r}; choose one of {sorted(METHODS)}") from None

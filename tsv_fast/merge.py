"""``merge_layers``: one merged state dict from a base and several tasks, key by key."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .errors import TSVInputError, TSVRankWarning
from .keys import is_matrix_meta, is_mergeable
from .methods import KeyContext, as_real, get_method
from .solvers import get_solver
from .tasks import (
    CompressedTask,
    StateDict,
    Task,
    as_sources,
    check_floating_dtype,
    checked_base_tensor,
    nonfinite,
    select_floating_keys,
    tensor_meta,
)

BATCH_MODES = ("auto", "key", "shape")
DEFAULT_BATCH_BYTES = 2 << 30  # stacked deltas of one shape batch on a CPU (batch="shape")
GPU_BATCH_SHARE = 0.25  # on a GPU: this share of the device's free memory (a merge peaks near twice a batch)


def resolve_batch_bytes(batch_bytes: int | None, device: torch.device) -> int:
    """The size of a shape batch: ``batch_bytes``, or for ``None`` (auto) a quarter of the free
    memory of a CUDA device when the merge starts, counting what PyTorch's allocator holds
    unused (2 GiB on a CPU).

    Larger batches mean fewer, fuller launches: every Rayleigh–Ritz step is one Jacobi launch
    per chunk of a batch, each about one CUDA block's latency (ViT-L/14, T = 20: 56 launches
    with 2 GiB batches, BENCHMARKS.md), and the H200 ran 2.53 s → 2.24 s when chunks doubled.
    A quarter of free memory holds every matrix of a shape in one batch on an H100/H200 at
    ViT-L/14 T = 20 (8 GB of stacked deltas for the largest shape)."""
    if batch_bytes is not None:
        return batch_bytes
    if device.type != "cuda":
        return DEFAULT_BATCH_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # free to this process too
    return max(1, int(GPU_BATCH_SHARE * (free + cached)))


def iter_merge(
    base: StateDict,
    tasks: Sequence[Task],
    method: str = "tsv",
    alpha: float | None = None,
    *,
    names: Sequence[str] | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    solver: str = "exact",
    out_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    stats: dict | None = None,
    batch: str = "auto",
    batch_bytes: int | None = None,
    **options,
) -> Iterator[tuple[str, Tensor]]:
    """Merge ``tasks`` into ``base``, yielding ``(key, merged tensor)`` in the base's key order.

    This is the streaming form of :func:`merge_layers`: with lazily loaded inputs, only
    one key's tensors (of all tasks) are alive at a time (one shape batch with
    ``batch="shape"``), and the caller can write each result out as it comes. Arguments
    as in :func:`merge_layers`; all input checks run before the first key is yielded.
    TIES with ``trim="model"`` first reads every task once more, one task at a time, for its
    whole-model threshold (when the first key is asked for).
    """
    return _iter_merge(base, tasks, method, alpha, names, include, exclude, solver, out_dtype, device, progress,
                       stats, batch, batch_bytes, options, warn_stacklevel=3)


def _iter_merge(base, tasks, method, alpha, names, include, exclude, solver, out_dtype, device, progress, stats,
                batch, batch_bytes, options, warn_stacklevel: int) -> Iterator[tuple[str, Tensor]]:
    """:func:`iter_merge`; ``warn_stacklevel`` points the rank warning at the user's call: it is
    raised in the generator, below torch.no_grad's generator wrapper and whatever calls ``next``
    (the user's loop for iter_merge, merge_layers one frame below the user)."""
    if batch == "key" and batch_bytes is not None:
        raise TSVInputError(f"batch_bytes={batch_bytes} sizes shape batches, and batch='key' forms none "
                            "(use batch='shape' or 'auto')")
    check_floating_dtype(out_dtype, "out_dtype")
    spec, sources, selected, ctx = _prepare(base, tasks, method, alpha, names, include, exclude, solver,
                                            device, options)
    ctx.out_dtype = out_dtype
    stacked = _stacked_tasks(tasks)
    groups, elementwise = _plan(base, spec, selected, stacked, ctx.device, batch, batch_bytes)
    ctx.largest_batch_bytes = max((stacked_bytes(base, g, stacked) for g in _distinct(groups)), default=0)
    return _merge_keys(base, spec, sources, selected, ctx, out_dtype, progress, stats, groups, elementwise,
                       warn_stacklevel)


def _stacked_tasks(tasks: Sequence[Task]) -> int:
    """How many tasks' deltas a shape batch stacks: the dense ones (compressed tasks give their
    stored factors), or all of them when every task is compressed."""
    return sum(not isinstance(t, CompressedTask) for t in tasks) or len(tasks)


def _plan(base, spec, selected, T: int, device, batch: str, batch_bytes: int | None) -> tuple[dict, dict]:
    """(shape batches, elementwise runs), each a map key → its run of keys; none unless
    ``batch`` is ``"shape"``, or ``"auto"`` on a GPU, where batching is the lever (on a CPU
    the solvers loop per matrix anyway: BENCHMARKS.md). ``T``: the tasks whose deltas are stacked."""
    if batch not in BATCH_MODES:
        raise TSVInputError(f"batch must be one of {BATCH_MODES}, got {batch!r}")
    device = torch.device(device) if device is not None else None
    where = device if device is not None else next(  # in base order: the first key's device decides
        (base[k].device for k in base if k in selected and isinstance(base, dict)), torch.device("cpu"))
    if batch == "key" or batch == "auto" and where.type != "cuda":
        return {}, {}
    batch_bytes = resolve_batch_bytes(batch_bytes, where)
    metas = {k: tensor_meta(base, k, "base") for k in base if k in selected}

    def home(key: str):  # keys on different devices never share a run
        return device if device is not None or not isinstance(base, dict) else base[key].device

    matrices = {k for k, (shape, dtype) in metas.items() if spec.merge_group is not None
                and is_matrix_meta(k, shape, dtype)}
    shape_keys = [k for k in metas if k in matrices]
    elementwise_keys = [k for k, (_, dtype) in metas.items() if spec.merge_elementwise is not None
                        and dtype.is_floating_point and k not in matrices]
    shapes = _runs(shape_keys, batch_bytes, lambda k: (metas[k], home(k)), lambda k: stacked_bytes(base, [k], T))
    runs = _runs(elementwise_keys, min(batch_bytes, ELEMENTWISE_RUN_BYTES), lambda k: (metas[k][1], home(k)),
                 lambda k: ELEMENTWISE_SETS * stacked_bytes(base, [k], 1))
    return shapes, runs


# Elementwise runs (a running sum over tasks) hold about this many copies of their keys at once
# (the sums, one task's deltas, its weights in the compute dtype, the outputs), whatever T, and at
# most ELEMENTWISE_RUN_BYTES in all: multi-tensor ops pay where keys are many and small.
ELEMENTWISE_SETS = 4
ELEMENTWISE_RUN_BYTES = 256 << 20


def _runs(keys: Sequence[str], budget: int, label_of, bytes_of) -> dict[str, list[str]]:
    """key → its run: ``keys`` (in order) with the same ``label_of(key)``, grouped so that each
    run's ``bytes_of`` sum stays within ``budget`` (runs of one key are left out)."""
    groups: dict[str, list[str]] = {}
    open_runs: dict = {}  # label -> (keys, [bytes]) of the run being filled
    for key in keys:
        label, item_bytes = label_of(key), bytes_of(key)
        run, size = open_runs.setdefault(label, ([], [0]))
        if run and size[0] + item_bytes > budget:
            run, size = open_runs[label] = ([], [0])
        run.append(key)
        size[0] += item_bytes
        groups[key] = run
    return {k: g for k, g in groups.items() if len(g) > 1}


def _distinct(groups: dict[str, list[str]]) -> list[list[str]]:
    """The runs of a key → run map, each once, in order."""
    return list({id(g): g for g in groups.values()}.values())


def plan_shape_batches(base: StateDict, tasks: Sequence[Task] | int, selected: set[str] | None = None,
                       method: str = "tsv", device: str | torch.device | None = None, batch: str = "auto",
                       batch_bytes: int | None = None) -> list[tuple[list[str], int]]:
    """The shape batches a merge of ``tasks`` (or of that many dense tasks) with these settings
    forms, from the keys' shapes alone: each batch's keys, in order, and its stacked deltas in
    bytes. For ``tsv-fast merge --dry-run`` and the benchmarks: the merge's peak beyond inputs
    and output is ≤ 2× the largest batch's bytes (merged keys wait for their turn besides)."""
    T = tasks if isinstance(tasks, int) else _stacked_tasks(tasks)
    selected = set(base) if selected is None else selected
    runs = _distinct(_plan(base, get_method(method), selected, T, device, batch, batch_bytes)[0])
    return [(run, stacked_bytes(base, run, T)) for run in runs]


def stacked_bytes(base, keys: Sequence[str], T: int) -> int:
    """Bytes of the ``keys``' deltas stacked for ``T`` tasks (float32; float64 for float64 keys)."""
    total = 0
    for key in keys:
        shape, dtype = tensor_meta(base, key, "base")
        total += T * math.prod(shape) * (8 if dtype == torch.float64 else 4)
    return total


def _prepare(base, tasks, method, alpha, names, include, exclude, solver, device, options):
    spec = get_method(method)
    unknown = set(options) - set(spec.options)
    if unknown:
        raise TSVInputError(f"method {method!r} has no option(s) {sorted(unknown)}; "
                            f"its options are {sorted(spec.options) or 'none'}")
    options = {**spec.options, **options}
    if spec.check_options is not None:
        spec.check_options(options)
    get_solver(solver)
    sources = as_sources(base, tasks, names)
    selected = select_floating_keys(base, include, exclude, "merge")
    ctx = KeyContext(
        alpha=spec.default_alpha if alpha is None else _checked_alpha(alpha),
        solver=solver,
        device=torch.device(device) if device is not None else None,
        options=options,
    )
    return spec, sources, selected, ctx


def _checked_alpha(alpha) -> float:
    """α as a float; NaN or Inf would make every merged weight non-finite, which the output check
    would then blame on the tasks' deltas."""
    value = as_real(alpha)
    if value is None or not math.isfinite(value):
        raise TSVInputError(f"alpha must be a finite number, got {alpha!r}")
    return value


@torch.no_grad()  # merging is not differentiable work: parameters that require grad are read as values
def _merge_keys(base, spec, sources, selected, ctx, out_dtype, progress, stats, groups, elementwise,
                warn_stacklevel: int):
    if spec.prepare is not None:  # e.g. TIES trim="model": a first pass over every task, at the first key
        merged_keys = [k for k in base if k in selected and tensor_meta(base, k, "base")[1].is_floating_point]
        spec.prepare(base, merged_keys, sources, ctx)
    ready: dict[str, Tensor] = {}  # merged keys of the current batch, not yet yielded
    for key in tqdm(list(base), desc=f"merge ({spec.name})", disable=not progress, unit="key"):
        if (key in groups or key in elementwise) and key not in ready:
            group, merge = (groups[key], spec.merge_group) if key in groups else \
                (elementwise[key], spec.merge_elementwise)
            bases = [base[k] for k in group]
            if bad := nonfinite(bases):  # one host sync for the group's base tensors
                checked_base_tensor(base, group[bad[0]])  # raises, naming the key
            bases = [_on(b, ctx.device) for b in bases]
            merged = [m.to(out_dtype or b.dtype) for m, b in zip(merge(group, bases, sources, ctx), bases)]
            ready.update(zip(group, _finite_outputs(group, merged)))
        if key in ready:
            yield key, ready.pop(key)
            continue
        b = _on(checked_base_tensor(base, key), ctx.device)
        if key in selected and is_mergeable(b):
            yield key, _finite_outputs([key], [spec.merge_key(key, b, sources, ctx).to(out_dtype or b.dtype)])[0]
        else:
            yield key, b.to(out_dtype) if out_dtype is not None and is_mergeable(b) else b
    if stats is not None:
        stats.update(solver=ctx.solver, shape_batches=len(_distinct(groups)),
                     largest_batch_bytes=ctx.largest_batch_bytes, zero_rank_keys=ctx.zero_rank_keys,
                     residuals=ctx.residuals, polar=dict(ctx.polar_counts))
    if ctx.zero_rank_keys:
        rank = ctx.options.get("rank")
        why = (f"floor(r/T) = 0 when min(m, n) < T = {len(sources)}" if rank is None
               else f"rank={rank!r} gives 0 for them")
        warnings.warn(
            f"{len(ctx.zero_rank_keys)} matrix key(s) get per-task rank 0 ({why}), so they keep the base "
            f"weights (delta 0): {ctx.zero_rank_keys[:5]}", TSVRankWarning, stacklevel=warn_stacklevel)


def _finite_outputs(keys: Sequence[str], merged: Sequence[Tensor]) -> Sequence[Tensor]:
    """Finite inputs can still sum or round past the output dtype's range: refuse, never write
    Inf. One host sync for a shape batch's keys."""
    if bad := nonfinite(merged):
        raise TSVInputError(f"key {keys[bad[0]]!r}: the merged weights are not finite (NaN or Inf): the tasks' "
                            f"deltas overflow {merged[bad[0]].dtype}")
    return merged


def _on(t: Tensor, device) -> Tensor:
    return t.to(device) if device is not None else t


def merge_layers(
    base: StateDict,
    tasks: Sequence[Task],
    method: str = "tsv",
    alpha: float | None = None,
    *,
    names: Sequence[str] | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    solver: str = "exact",
    out_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    stats: dict | None = None,
    batch: str = "auto",
    batch_bytes: int | None = None,
    **options,
) -> dict[str, Tensor]:
    """Merge ``tasks`` into ``base`` and return the merged state dict.

    Args:
        base: the pretrained state dict ``θ0``.
        tasks: fine-tuned state dicts, :class:`TaskVector` s or :class:`CompressedTask` s
            (mixing them is fine).
        method: ``"tsv"`` (TSV-M), ``"task_arithmetic"``, ``"ties"`` or ``"mean"``.
        alpha: scale of the merged delta (finite); ``None`` takes the method's default
            (1.0 for TSV-M, TIES and mean, 0.3 for Task Arithmetic).
        include, exclude: fnmatch globs choosing the keys to merge; the other keys,
            and integer buffers, keep the base's tensor (the same object, not a copy,
            unless ``out_dtype`` asks for a cast).
        solver: top-k SVD solver for TSV-M: ``"exact"`` (default), ``"svd"`` (the
            authors' thin SVD) or ``"randomized"`` (approximate; see :mod:`tsv_fast.solvers`).
        out_dtype: floating dtype of merged tensors (default: each base tensor's dtype).
        device: where to compute (default: where the base tensors are); the result
            stays there.
        progress: show a progress bar over keys.
        batch: ``"key"`` factorises one key's tasks per solver call; ``"shape"`` batches
            consecutive same-shape matrix keys (all layers of a ViT) into one call, up to
            ``batch_bytes`` of stacked deltas (``None``: a quarter of a GPU's free memory, 2 GiB
            on a CPU); ``"auto"`` (default) is ``"shape"`` on a GPU and ``"key"`` on a CPU.
            The result is the same either way.
        stats: if a dict is given, it is filled with ``solver``, ``shape_batches`` (how many),
            ``largest_batch_bytes`` (the largest one's stacked deltas), ``zero_rank_keys``,
            ``residuals`` (key → per-task relative error ‖τ − τ_k‖_F/‖τ‖_F of an
            approximate solver's top-k, measured at run time) and ``polar`` (how many
            polar factors Newton–Schulz gave and how many fell back to eigh).
        options: method options: ``rank`` for TSV-M (per-task k: an int, a fraction of
            r, or None for the paper's floor(r/T)) and ``polar`` (``"auto"``, the default:
            Newton–Schulz on a GPU, eigh on a CPU; ``"eigh"``, exact; or ``"newton-schulz"``,
            checked per factor with an exact fallback);
            ``density`` for TIES (0.2) and ``trim``: ``"key"`` (default) keeps each task's top
            ``density`` of every key, ``"model"`` its top ``density`` over all the merged keys at
            once (the TIES paper's code; one more read of every task, one task's ``|τ|`` alive).
    """
    return dict(_iter_merge(base, tasks, method, alpha, names, include, exclude, solver, out_dtype, device,
                            progress, stats, batch, batch_bytes, options, warn_stacklevel=4))

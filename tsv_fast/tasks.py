"""The three ways a task reaches tsv-fast, and the checks that make bad input fail early.

* a fine-tuned state dict (any ``Mapping[str, Tensor]``),
* a :class:`TaskVector` (``τ = θ_ft − θ0``, from :func:`task_vectors`),
* a :class:`CompressedTask` (TSV-C factors, from :func:`tsv_fast.compress`).

Merging code never looks at which one it got: it asks a :class:`TaskSource` for a key's
dense delta or, when the task is compressed, for its stored factors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import ops
from .errors import TSVInputError
from .keys import is_matrix_meta, is_mergeable, select_keys

StateDict = Mapping[str, Tensor]
Factors = tuple[Tensor, Tensor, Tensor]  # U (m, k), S (k,), V (n, k)


class TaskVector(dict):
    """Per-key deltas ``θ_ft − θ0`` of one task; a plain ``dict`` with a ``name``.

    Keys absent from a task vector are zero (a frozen tower need not be stored).
    """

    def __init__(self, deltas: Mapping[str, Tensor] = (), name: str = "task"):
        super().__init__(deltas)
        self.name = name


@dataclass
class CompressedTask:
    """TSV-C of one task: top-k factors per matrix key, whole deltas elsewhere.

    The task's weights are ``θ0 + U diag(S) Vᵀ`` on matrix keys and ``θ0 + delta`` on
    the others; keys in neither dict have a zero delta.
    """

    name: str
    factors: dict[str, Factors] = field(default_factory=dict)
    deltas: dict[str, Tensor] = field(default_factory=dict)

    def rank(self, key: str) -> int:
        return self.factors[key][1].shape[0]

    def delta(self, key: str) -> Tensor | None:
        """The dense delta of ``key`` (None when it is zero)."""
        if key in self.factors:
            U, S, V = (t.to(compute_dtype(t)) for t in self.factors[key])
            return (U * S) @ V.T
        return self.deltas.get(key)

    def apply(self, base: StateDict, alpha: float = 1.0) -> dict[str, Tensor]:
        """Rebuild the task's weights on ``base``: ``θ0 + α·delta`` for every key."""
        out = {}
        for key, b in base.items():
            if key in self.factors:
                out[key] = ops.reconstruct(b, *self.factors[key], alpha)
            elif key in self.deltas and is_mergeable(b):
                out[key] = (b.to(compute_dtype(b)) + alpha * self.deltas[key].to(b.device)).to(b.dtype)
            else:
                out[key] = b.clone()
        return out

    def nbytes(self) -> int:
        """Bytes held by the factors and deltas (what storing this task costs)."""
        tensors = [t for f in self.factors.values() for t in f] + list(self.deltas.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def to_state_dict(self) -> dict[str, Tensor]:
        """Flat ``name → tensor`` view for safetensors: ``key::U``, ``key::S``, ``key::V``, ``key::delta``."""
        flat = {f"{k}::delta": t for k, t in self.deltas.items()}
        for k, (U, S, V) in self.factors.items():
            flat.update({f"{k}::U": U, f"{k}::S": S, f"{k}::V": V})
        return {k: t.contiguous() for k, t in flat.items()}

    @classmethod
    def from_state_dict(cls, flat: StateDict, name: str = "task") -> CompressedTask:
        task = cls(name)
        for flat_key, t in flat.items():
            key, _, part = flat_key.rpartition("::")
            if part == "delta":
                task.deltas[key] = t
            elif part in ("U", "S", "V"):
                task.factors.setdefault(key, {})[part] = t
            else:
                raise TSVInputError(f"task {name!r}: unexpected key {flat_key!r} in a compressed task")
        for key, parts in task.factors.items():
            if set(parts) != {"U", "S", "V"}:
                raise TSVInputError(f"task {name!r}: key {key!r} lacks factor(s) {sorted({'U', 'S', 'V'} - set(parts))}")
            task.factors[key] = (parts["U"], parts["S"], parts["V"])
        return task


Task = StateDict | TaskVector | CompressedTask


def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_floating_dtype(dtype: torch.dtype | None, name: str) -> None:
    """``dtype`` (an argument called ``name``) is None or a floating torch.dtype: an integer or
    bool one would round or wrap every weight without a word (int32 factors all 0, uint8
    merged weights modulo 256)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TSVInputError(f"{name} must be a floating torch.dtype, got {dtype!r}")


@torch.no_grad()
def task_vectors(
    base: StateDict, finetuned: Sequence[StateDict], names: Sequence[str] | None = None
) -> list[TaskVector]:
    """``τ_t = θ_t − θ0`` for each fine-tuned state dict, after checking it against ``base``.

    Deltas are in the compute dtype, float32 (float64 for float64 base keys): exactly the
    deltas a merge computes from the fine-tuned weights, so merging the task vectors gives
    the same result. Rounded back to bfloat16/float16 they were not (a difference of two
    bfloat16 weights needs more bits than bfloat16 has once a weight crosses zero or moves
    by more than 2×); the price is 2 bytes more per weight of a 16-bit checkpoint. Integer
    buffers are skipped (merges copy them from the base).
    """
    sources = as_sources(base, finetuned if isinstance(finetuned, Mapping) else list(finetuned), names)
    for src in sources:
        if src.compressed is not None:
            raise TSVInputError(f"task {src.name!r}: task_vectors takes fine-tuned state dicts, not a CompressedTask "
                                f"(merge_layers, compress and interference take it as it is)")
    out = []
    for src in sources:
        tv = TaskVector(name=src.name)
        for key, b in base.items():
            if is_mergeable(b) and key in src.state:  # a TaskVector's absent keys stay absent (zero)
                tv[key] = src.delta(key, b)
        if bad := nonfinite(list(tv.values())):  # finite weights, but a delta past float32's range
            key = list(tv)[bad[0]]
            raise delta_overflow(src.name, key, tv[key].dtype)
        out.append(tv)
    return out


class TaskSource:
    """One task as seen by the merge code: a dense delta per key, or stored factors."""

    def __init__(self, name: str, state: Mapping[str, Tensor] | None, base: StateDict | None,
                 compressed: CompressedTask | None = None):
        self.name, self.state, self.base, self.compressed = name, state, base, compressed

    def delta(self, key: str, base_tensor: Tensor, device: torch.device | None = None, check: bool = True,
              out: Tensor | None = None) -> Tensor:
        """Dense ``τ`` of ``key`` in the compute dtype, on ``device`` (default: base's), or
        written into ``out`` (fine-tuned weights: subtracted straight into it, one pass).
        ``check=False`` skips the NaN/Inf check (a host sync on a GPU): for callers that check
        on the device themselves and call again with the check where that fails."""
        device = device or base_tensor.device
        dtype = compute_dtype(base_tensor)
        finite = _finite if check else (lambda t, owner, key: t)
        if self.compressed is not None:
            d = self.compressed.delta(key)
        elif self.base is not None:  # fine-tuned weights; the base tensor was checked by the caller
            weights = finite(self.state[key], f"task {self.name!r}", key).to(device, dtype)
            if out is not None:
                with torch.no_grad():  # out= takes no autograd inputs (e.g. a model's named_parameters())
                    return torch.sub(weights, base_tensor.to(device, dtype), out=out)
            d = weights - base_tensor.to(device, dtype)
        else:  # task vector
            d = finite(self.state[key], f"task {self.name!r}", key) if key in self.state else None
        if out is not None:
            return out.zero_() if d is None else out.copy_(d)
        if d is None:
            return torch.zeros(base_tensor.shape, dtype=dtype, device=device)
        return d.to(device, dtype)

    def deltas(self, keys: Sequence[str], base_tensors: Sequence[Tensor],
               device: torch.device | None = None) -> list[Tensor]:
        """:meth:`delta` of several keys, unchecked (``check=False``); fine-tuned weights are
        subtracted by one multi-tensor op, a few GPU launches for all the keys."""
        if self.base is None or self.compressed is not None or not keys:
            return [self.delta(key, b, device, check=False) for key, b in zip(keys, base_tensors)]
        bases = [b.to(device or b.device, compute_dtype(b)) for b in base_tensors]
        return torch._foreach_sub([self.state[key].to(b.device, b.dtype) for key, b in zip(keys, bases)], bases)

    def factors(self, key: str) -> Factors | None:
        """Stored TSV-C factors for ``key``, if this task is compressed and has them."""
        return None if self.compressed is None else self.compressed.factors.get(key)


def stack_deltas(sources: Sequence[TaskSource], key: str, base_tensor: Tensor,
                 device: torch.device | None = None, out: Tensor | None = None, check: bool = True) -> Tensor:
    """``(T, *shape)`` deltas of ``key``, filled task by task into one preallocated buffer (or
    ``out``), so the peak is the batch plus one task's tensor (not twice the batch, as
    ``torch.stack`` of a list), and checked for NaN/Inf (one host sync) unless ``check=False``:
    for callers that stack several keys and check them at once with :func:`check_stacked`."""
    device = device or base_tensor.device
    if out is None:
        out = torch.empty(len(sources), *base_tensor.shape, dtype=compute_dtype(base_tensor), device=device)
    for i, s in enumerate(sources):
        s.delta(key, base_tensor, device, check=False, out=out[i])
    if check:
        check_stacked(sources, [key], [base_tensor], out)
    return out


def check_stacked(sources: Sequence[TaskSource], keys: Sequence[str], base_tensors: Sequence[Tensor],
                  stack: Tensor) -> None:
    """Refuse NaN/Inf in a stack of deltas (key-major: ``stack[j·T + t]`` is task t's delta of
    key j), with one host sync however many keys; the error names the first bad task and key
    (its weights, or a delta that overflows the stack's dtype)."""
    T = len(sources)
    if bad := nonfinite(list(stack)):
        j, t = divmod(bad[0], T)
        sources[t].delta(keys[j], base_tensors[j], stack.device)  # raises if the task's weights are not finite
        raise delta_overflow(sources[t].name, keys[j], stack.dtype)


def delta_overflow(task: str, key: str, dtype: torch.dtype) -> TSVInputError:
    """The error for finite weights whose delta from the base is past ``dtype``'s range."""
    return TSVInputError(f"task {task!r}: key {key!r}: its delta from the base overflows {dtype} (NaN or Inf)")


def nonfinite(tensors: Sequence[Tensor]) -> list[int]:
    """Indices of the floating tensors holding NaN or Inf, with one host sync per device.

    A NaN or Inf element makes a tensor's 2-norm non-finite, and the multi-tensor norm finds
    those of all the tensors of one dtype in a few GPU launches, without temporaries the size
    of the tensors (on a CPU 7–21× faster than ``isfinite().all()`` by dtype, BENCHMARKS.md).
    A finite tensor's 2-norm can overflow too (values of ~1e19 in float32, the accumulation
    dtype of 16-bit ones), so the tensors it flags are decided by their largest magnitude (the
    ∞-norm: it cannot overflow, but is as slow as ``isfinite``), a second sync only where some
    norm was not finite."""
    flagged = _nonfinite_norms(tensors, range(len(tensors)), 2)
    return _nonfinite_norms(tensors, flagged, math.inf) if flagged else []


def _nonfinite_norms(tensors: Sequence[Tensor], indices, ord: float) -> list[int]:
    """Those of ``indices`` whose ``ord``-norm is not finite (one host sync per device)."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i in indices:
        t = tensors[i]
        if t.is_floating_point() and t.numel():
            groups.setdefault((t.device, t.dtype), []).append(i)
    by_device: dict[torch.device, list[tuple[list[int], Tensor]]] = {}
    for (device, dtype), idx in groups.items():
        wide = torch.float32 if ord == 2 and dtype.itemsize < 4 else None
        norms = torch.stack(torch._foreach_norm([tensors[i] for i in idx], ord=ord, dtype=wide))
        by_device.setdefault(device, []).append((idx, norms.double()))
    bad = []
    for parts in by_device.values():
        finite = torch.isfinite(torch.cat([norms for _, norms in parts]))
        if not bool(finite.all()):
            bad += [i for i, ok in zip((i for idx, _ in parts for i in idx), finite.tolist()) if not ok]
    return sorted(bad)


def _finite(t: Tensor, owner: str, key: str) -> Tensor:
    """NaN/Inf are checked when a tensor is read, so lazily loaded checkpoints are read once."""
    _check_data(t, owner, key)
    if nonfinite([t]):
        raise TSVInputError(f"{owner}: key {key!r} contains NaN or Inf")
    return t


def checked_base_tensor(base: StateDict, key: str) -> Tensor:
    """``base[key]``, refusing NaN/Inf in floating tensors (named by the base's file when it
    has one: a checkpoint opened from disk has a ``label``)."""
    t = base[key]
    return _finite(t, getattr(base, "label", None) or "base", key) if t.is_floating_point() else t


def as_sources(base: StateDict, tasks: Sequence[Task], names: Sequence[str] | None = None) -> list[TaskSource]:
    """Validate every task against ``base`` and wrap it as a :class:`TaskSource`.

    Keys, shapes and dtypes are checked here, before any work; values (NaN/Inf) when
    each tensor is read. Raises :class:`TSVInputError` naming the task, the key and the problem.
    """
    if isinstance(tasks, Mapping):
        raise TSVInputError("tasks must be a sequence of state dicts / task vectors / compressed tasks, "
                            "not a single mapping (wrap it in a list)")
    if len(tasks) == 0:
        raise TSVInputError("no tasks given: need at least one fine-tuned model or task vector")
    if names is not None and len(names) != len(tasks):
        raise TSVInputError(f"got {len(names)} names for {len(tasks)} tasks")
    _check_base(base)
    sources = []
    for i, task in enumerate(tasks):
        default = getattr(task, "name", None) or f"task{i}"
        name = names[i] if names is not None else default
        if isinstance(task, CompressedTask):
            _check_compressed(base, task, name)
            sources.append(TaskSource(name, None, None, compressed=task))
        elif isinstance(task, TaskVector):
            _check_state(base, task, name, is_delta=True)
            sources.append(TaskSource(name, task, None))
        elif isinstance(task, Mapping):
            _check_state(base, task, name, is_delta=False)
            sources.append(TaskSource(name, task, base))
        else:
            raise TSVInputError(f"task {name!r}: expected a state dict, TaskVector or CompressedTask, "
                                f"got {type(task).__name__}")
    return sources


def _first(items: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


def select_floating_keys(base: StateDict, include: str | Sequence[str] | None,
                         exclude: str | Sequence[str] | None, what: str) -> set[str]:
    """:func:`keys.select_keys`, refusing a selection without a floating key: a mistyped glob
    would otherwise give an empty result without a word. ``what`` names the job (``"merge"``)."""
    selected = select_keys(base, include, exclude)
    if not any(tensor_meta(base, k, "base")[1].is_floating_point for k in selected):
        raise TSVInputError(f"include={include!r} / exclude={exclude!r} select no floating key to {what}")
    return selected


def tensor_meta(state: StateDict, key: str, owner: str, data: bool = False) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of ``state[key]`` without reading its values when the mapping can tell
    (a lazy checkpoint mapping may define ``meta(key) -> (shape, dtype)``). ``data=True`` (the
    input checks; plans from shapes alone take meta tensors) refuses a tensor on the meta
    device: it has a shape but no values to merge (it failed later as a bare RuntimeError)."""
    if hasattr(state, "meta"):
        shape, dtype = state.meta(key)
        return tuple(shape), dtype
    t = state[key]
    if not isinstance(t, Tensor):
        raise TSVInputError(f"{owner}: key {key!r} is a {type(t).__name__}, not a tensor")
    if data:
        _check_data(t, owner, key)
    return tuple(t.shape), t.dtype


def _check_data(t: Tensor, owner: str, key: str) -> None:
    if t.is_meta:
        raise TSVInputError(f"{owner}: key {key!r} is on the meta device: meta tensors have no data "
                            f"(load the weights first)")


def _check_base(base: StateDict) -> None:
    if not isinstance(base, Mapping) or len(base) == 0:
        raise TSVInputError("base must be a non-empty state dict (name → tensor)")
    for key in base:
        tensor_meta(base, key, "base", data=True)


def _check_state(base: StateDict, state: StateDict, name: str, is_delta: bool) -> None:
    owner = f"task {name!r}"
    floating = [k for k in base if tensor_meta(base, k, "base")[1].is_floating_point]
    missing = [k for k in floating if k not in state]
    if missing and not is_delta:  # task vectors may omit zero deltas
        raise TSVInputError(f"{owner}: {len(missing)} key(s) of the base are missing: {_first(missing)}")
    extra = [k for k in state if k not in base]
    if extra:
        raise TSVInputError(f"{owner}: {len(extra)} key(s) are not in the base: {_first(extra)}")
    for key in floating:
        if key not in state:
            continue
        shape, dtype = tensor_meta(state, key, owner, data=True)
        base_shape, base_dtype = tensor_meta(base, key, "base")
        if shape != base_shape:
            raise TSVInputError(f"{owner}: key {key!r} has shape {shape}, base has {base_shape}")
        if not dtype.is_floating_point:
            raise TSVInputError(f"{owner}: key {key!r} has dtype {dtype}, expected a floating dtype "
                                f"like the base ({base_dtype})")


def _check_compressed(base: StateDict, task: CompressedTask, name: str) -> None:
    extra = [k for k in (*task.factors, *task.deltas) if k not in base]
    if extra:
        raise TSVInputError(f"task {name!r}: {len(extra)} key(s) are not in the base: {_first(extra)}")
    for key, (U, S, V) in task.factors.items():
        shape, dtype = tensor_meta(base, key, "base")
        m, n = shape if len(shape) == 2 else (None, None)
        if not is_matrix_meta(key, shape, dtype) or U.ndim != 2 or V.ndim != 2 or S.ndim != 1 \
                or U.shape[0] != m or V.shape[0] != n or not (U.shape[1] == S.shape[0] == V.shape[1]):
            raise TSVInputError(f"task {name!r}: key {key!r}: factors U{tuple(U.shape)} S{tuple(S.shape)} "
                                f"V{tuple(V.shape)} do not fit base shape {shape}")
        for part, t in zip("USV", (U, S, V)):
            _finite(t, f"task {name!r}", f"{key}::{part}")
    for key, t in task.deltas.items():
        shape, _ = tensor_meta(base, key, "base")
        if tuple(t.shape) != shape:
            raise TSVInputError(f"task {name!r}: key {key!r} has shape {tuple(t.shape)}, base has {shape}")
        _finite(t, f"task {name!r}", key)

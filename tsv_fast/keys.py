"""Which parameters TSV treats as matrices, and which keys a user asked to merge."""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Iterable, Sequence

import torch

from .errors import TSVInputError

Rank = int | float | None


def is_mergeable(tensor: torch.Tensor) -> bool:
    """Floating tensors are merged; integer buffers (position ids...) are copied from the base."""
    return tensor.is_floating_point()


def is_matrix_key(name: str, tensor: torch.Tensor) -> bool:
    """A 2-D floating parameter other than ``text_projection`` (SPEC: TSV acts on these).

    Everything else (biases, LayerNorm, ``class_embedding``, the 4-D ``conv1``,
    ``logit_scale``, ``text_projection``) is merged by averaging task vectors.
    """
    return is_matrix_meta(name, tensor.shape, tensor.dtype)


def is_matrix_meta(name: str, shape: Sequence[int], dtype: torch.dtype) -> bool:
    """:func:`is_matrix_key` from a shape and dtype, for checkpoints not read yet."""
    return len(shape) == 2 and dtype.is_floating_point and "text_projection" not in name


def check_num_tasks(num_tasks) -> int | None:
    """T of the default floor(r/T), when given: an integer ≥ 1 (NumPy's too, not a bool), as an int."""
    if num_tasks is None:
        return None
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, numbers.Integral) or num_tasks < 1:
        raise TSVInputError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
    return int(num_tasks)


def rank_per_task(shape: Sequence[int], num_tasks: int) -> int:
    """The paper's per-task rank for a matrix key: ``floor(min(m, n) / T)``."""
    return min(shape) // num_tasks


def check_rank(rank: Rank) -> Rank:
    """A rank option, validated and as a plain ``int`` (NumPy's integers too), ``float`` or None:
    an int k ≥ 0, a float f in (0, 1], or None."""
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, (numbers.Integral, float)):
        raise TSVInputError(f"rank must be an int, a float in (0, 1] or None, got {rank!r}")
    if isinstance(rank, numbers.Integral):
        if rank < 0:
            raise TSVInputError(f"rank must be >= 0, got {rank}")
        return int(rank)
    if not 0 < rank <= 1:
        raise TSVInputError(f"a fractional rank must be in (0, 1], got {rank}")
    return float(rank)


def resolve_rank(shape: Sequence[int], rank: Rank, num_tasks: int) -> int:
    """Per-task rank for a matrix of ``shape``: an int k (clamped to r), a float f in
    (0, 1] meaning floor(f·r), or None for the paper's floor(r / T)."""
    r = min(shape)
    rank = check_rank(rank)
    if rank is None:
        return r // num_tasks
    # round first: 0.29 · 100 is 28.999999999999996 in binary floating point, and floor(f·r) means 29
    return min(rank, r) if isinstance(rank, int) else math.floor(round(rank * r, 9))


def select_keys(
    keys: Iterable[str],
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> set[str]:
    """Keys matching any ``include`` glob (all when None) and no ``exclude`` glob.

    Globs use :mod:`fnmatch` syntax, e.g. ``"visual.*"`` or ``"*.attn.*"``.
    """
    include = [include] if isinstance(include, str) else include
    exclude = [exclude] if isinstance(exclude, str) else exclude or []
    selected = set()
    for key in keys:
        if include is not None and not any(fnmatch.fnmatchcase(key, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(key, p) for p in exclude):
            continue
        selected.add(key)
    return selected

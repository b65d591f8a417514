"""TSV-C: keep each task's top-k singular triplets per matrix key (SPEC.md)."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .errors import TSVInputError, TSVRankWarning
from .keys import Rank, check_num_tasks, check_rank, is_matrix_key, is_mergeable, resolve_rank
from .solvers import get_solver
from .tasks import (CompressedTask, StateDict, Task, as_sources, check_floating_dtype, checked_base_tensor, nonfinite,
                    select_floating_keys, stack_deltas)

def energy_rank(S: Tensor, energy: float) -> int:
    """Smallest k whose leading singular values hold ``energy`` of ``Σ s²`` (0 for a zero matrix)."""
    power = S.double() ** 2
    total = power.sum()
    if total == 0:
        return 0
    cumulative = torch.cumsum(power, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1


def check_energy(energy: float | None, name: str = "energy") -> None:
    """``energy`` is None or a real share in (0, 1] (not a bool or a string); ``name`` is how the
    caller calls it (``--energy`` in the CLI, whose dry run must refuse what the run refuses)."""
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, numbers.Real) or not 0 < energy <= 1):
        raise TSVInputError(f"{name}: expected a share in (0, 1], got {energy!r}")


def check_stored(out: list[CompressedTask], key: str, stored: dict, what: str) -> None:
    """Refuse stored tensors that overflow their dtype (finite inputs, but a float16 singular
    value above 65504, say), naming the task and key, rather than store Inf."""
    tensors = [t for i in stored for t in (stored[i] if isinstance(stored[i], tuple) else (stored[i],))]
    if bad := nonfinite(tensors):
        i = list(stored)[bad[0] // (3 if what == "factors" else 1)]
        raise TSVInputError(f"task {out[i].name!r}: key {key!r}: its {what} overflow {tensors[bad[0]].dtype} "
                            f"(Inf); pass a wider factor_dtype (torch.float32)")


@torch.no_grad()
def compress(
    base: StateDict,
    tasks: Sequence[Task],
    rank: Rank = None,
    *,
    energy: float | None = None,
    num_tasks: int | None = None,
    names: Sequence[str] | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    solver: str = "exact",
    factor_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    stats: dict | None = None,
) -> list[CompressedTask]:
    """TSV-C of every task: per matrix key ``U[:, :k]``, ``S[:k]``, ``V[:, :k]``.

    Args:
        rank: per-task rank: an int k, a float fraction of r = min(m, n), or None for
            floor(r / T) with T = ``num_tasks`` (default: ``len(tasks)``), which is
            what TSV-M keeps.
        energy: instead of ``rank``, the smallest k keeping this fraction of each
            task's squared singular values (so k differs between tasks).
        include, exclude: fnmatch globs; unselected keys are not stored (zero delta).
        factor_dtype: dtype of the stored factors and deltas (default: the base's).
        solver: ``"exact"``, ``"svd"`` or ``"randomized"`` (see :mod:`tsv_fast.solvers`).
        stats: if a dict is given, ``stats["residuals"][key]`` gets each task's relative
            error ‖τ − τ_k‖_F/‖τ‖_F (every solver, measured at run time).

    Keys whose delta is exactly zero (a frozen tower) are not stored. Returns one
    :class:`CompressedTask` per task, able to rebuild the task with ``.apply(base)``.
    """
    if rank is not None and energy is not None:
        raise TSVInputError("give either rank or energy, not both")
    check_energy(energy)
    rank = check_rank(rank)  # before any work, whether or not a matrix key comes
    num_tasks = check_num_tasks(num_tasks)
    check_floating_dtype(factor_dtype, "factor_dtype")
    solve = get_solver(solver)
    sources = as_sources(base, tasks, names)
    T = len(sources) if num_tasks is None else num_tasks
    selected = select_floating_keys(base, include, exclude, "compress")
    dev = torch.device(device) if device is not None else None
    out = [CompressedTask(s.name) for s in sources]
    zero_rank: list[str] = []
    for key in tqdm(list(base), desc="compress", disable=not progress, unit="key"):
        b = checked_base_tensor(base, key) if dev is None else checked_base_tensor(base, key).to(dev)
        if key not in selected or not is_mergeable(b):
            continue
        dtype = factor_dtype or b.dtype
        deltas = stack_deltas(sources, key, b, dev)
        nonzero = deltas.reshape(len(sources), -1).any(1).tolist()  # reshape: 0-d keys (logit_scale) too
        if not is_matrix_key(key, b):
            stored = {i: d.to(dtype).clone() for i, (d, keep) in enumerate(zip(deltas, nonzero)) if keep}
            check_stored(out, key, stored, "delta")  # own storage: tasks must not pin each other
            for i, d in stored.items():
                out[i].deltas[key] = d
            continue
        if not any(nonzero):  # a frozen (or empty) matrix: nothing to factor
            continue
        if energy is None:
            k = resolve_rank(b.shape, rank, T)
            if k == 0:  # the rank-0 approximation is the zero delta: nothing to store
                zero_rank.append(key)
                continue
            U, S, V, _ = solve(deltas, k)
            ks = [k] * len(sources)
            if stats is not None:
                kept = (U * S.unsqueeze(-2)) @ V.mT
                err = (deltas - kept).flatten(1).norm(dim=1) / deltas.flatten(1).norm(dim=1).clamp(min=1e-30)
                stats.setdefault("residuals", {})[key] = err.tolist()
        else:
            U, S, V, _ = solve(deltas, min(b.shape))
            ks = [energy_rank(s, energy) for s in S]
        stored = {i: tuple(t.to(dtype).clone(memory_format=torch.contiguous_format)
                           for t in (U[i, :, :ks[i]], S[i, :ks[i]], V[i, :, :ks[i]]))
                  for i, keep in enumerate(nonzero) if keep}
        check_stored(out, key, stored, "factors")
        for i, factors in stored.items():
            out[i].factors[key] = factors
    if zero_rank:
        warnings.warn(f"{len(zero_rank)} matrix key(s) get rank 0 (rank={rank!r}, T = {T}), so no factors are "
                      f"stored for them (delta 0): {zero_rank[:5]}", TSVRankWarning, stacklevel=3)
    return out

"""Singular Task Interference (STI) per matrix key and per task pair (SPEC.md)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .errors import TSVInputError, TSVRankWarning
from .keys import is_matrix_key, is_matrix_meta, rank_per_task
from .solvers import get_solver
from .tasks import StateDict, Task, as_sources, checked_base_tensor, compute_dtype, select_floating_keys, tensor_meta
from .tsv import singular_task_interference, task_factors

_BLOCK = re.compile(r"^(.*?(?:resblocks|layers?|blocks?|h)\.\d+)\.")


def block_of(key: str) -> str | None:
    """The transformer block a key belongs to (``visual.transformer.resblocks.3``), or None."""
    m = _BLOCK.match(key)
    return m.group(1) if m else None


@dataclass
class Interference:
    """STI of each matrix key (``per_key``) and of each task pair (``per_pair``, T×T)."""

    tasks: list[str]
    per_key: dict[str, float]
    per_pair: dict[str, Tensor]

    def by_block(self) -> dict[str, float]:
        """STI summed over the matrix keys of each transformer block (``visual.…resblocks.3``);
        keys outside blocks are reported under their own name."""
        out: dict[str, float] = {}
        for key, value in self.per_key.items():
            group = block_of(key) or key
            out[group] = out.get(group, 0.0) + value
        return out


@torch.no_grad()
def interference(
    base: StateDict,
    tasks: Sequence[Task],
    *,
    names: Sequence[str] | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    solver: str = "exact",
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Interference:
    """STI of every selected matrix key, with the per-task rank floor(r/T) TSV-M uses.

    STI is 0 when the tasks' singular vectors are mutually orthogonal and grows with
    their overlap. Keys with r < T (k = 0) are skipped, with a :class:`TSVRankWarning`.
    """
    get_solver(solver)
    sources = as_sources(base, tasks, names)
    selected = select_floating_keys(base, include, exclude, "measure")
    if not any(is_matrix_meta(k, *tensor_meta(base, k, "base")) for k in selected):
        raise TSVInputError(f"include={include!r} / exclude={exclude!r} select no matrix key: STI measures "
                            f"only matrix keys (2-D floating, not text_projection)")
    dev = torch.device(device) if device is not None else None
    per_key, per_pair, zero_rank = {}, {}, []
    for key in tqdm(list(base), desc="interference", disable=not progress, unit="key"):
        b = checked_base_tensor(base, key) if dev is None else checked_base_tensor(base, key).to(dev)
        if key not in selected or not is_matrix_key(key, b):
            continue
        k = rank_per_task(b.shape, len(sources))
        if k == 0:
            zero_rank.append(key)
            continue
        per_key[key], per_pair[key] = singular_task_interference(task_factors(sources, key, b, k, solver, dev),
                                                                 compute_dtype(b))
    if zero_rank:  # stacklevel 3: past torch.no_grad's wrapper, to the caller (as compress warns)
        warnings.warn(f"{len(zero_rank)} matrix key(s) have min(m, n) < T = {len(sources)} (per-task rank "
                      f"floor(r/T) = 0), so their STI is not measured: {zero_rank[:5]}", TSVRankWarning, stacklevel=3)
    return Interference([s.name for s in sources], per_key, per_pair)

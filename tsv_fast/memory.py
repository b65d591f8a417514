"""Exact peak of the tensor memory a computation allocates, on any device.

``torch.cuda.max_memory_allocated`` answers this on a GPU only; the resident-set size of a
CPU process is blurred by the allocator and the page cache. :func:`peak_tensor_bytes` counts
the storages of the tensors that torch ops create while ``fn`` runs, from creation until
they are freed, so a merge's memory can be checked on a CPU, run the way it runs on a GPU
(on an H200 it gave the same ratios as ``max_memory_allocated``: 1.88× / 1.76× of a shape
batch, BENCHMARKS.md). Not counted: scratch memory that libraries allocate outside torch
(LAPACK, and on a GPU cuBLAS/cuSOLVER workspaces and the Jacobi kernel's global workspace).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["peak_tensor_bytes"]

R = TypeVar("R")


class _LiveStorages(TorchDispatchMode):
    """Bytes of the storages created under the mode and still alive (weak references to the
    storages, whose callbacks run when torch frees them)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.refs: dict[int, weakref.ref] = {}
        self.current = self.peak = 0

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        self.refs.pop(key, None)

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:  # a view or an in-place result: already counted
            return
        self.live[key] = storage.nbytes()
        self.current += self.live[key]
        self.peak = max(self.peak, self.current)
        self.refs[key] = weakref.ref(storage, lambda _, key=key: self._freed(key))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out


def peak_tensor_bytes(fn: Callable[[], R]) -> tuple[int, R]:
    """``(peak, fn())``: the most bytes of tensor storage created by ``fn`` alive at once
    (what it returns included, inputs that existed before excluded)."""
    mode = _LiveStorages()
    with mode:
        result = fn()
    return mode.peak, result

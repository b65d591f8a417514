"""Exact peak of the tensor memory a computation allocates, on any device.

``torch.cuda.max_memory_allocated`` answers this on a GPU only; the resident-set size of a
CPU process is blurred by the allocator and the page cache. :func:`peak_tensor_bytes` counts
the storages of the tensors that dispatched torch ops return while ``fn`` runs, from creation
until they are freed, so a merge's memory can be checked on a CPU, run the way it runs on a
GPU (on an H200 it gave the same ratios as ``max_memory_allocated``: 1.88× / 1.76× of a shape
batch, BENCHMARKS.md). Not counted: temporaries inside one op's kernel (LAPACK or cuSOLVER
workspaces, the Jacobi kernel's global workspace, the copy a reduction with ``dtype=`` makes
of its input) and non-strided (sparse) tensors.
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
        self.current = self.peak = 0

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, size = storage._cdata, storage.nbytes()
        if key not in self.live:
            self.live[key] = 0
            weakref.finalize(storage, self._freed, key)
        self.current += size - self.live[key]  # a storage grows under resize_ or out=
        self.live[key] = size
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        out = func(*args, **(kwargs or {}))
        # outputs that are views of (or were written into) tensors from before fn are not fn's
        before = {s._cdata for s in _storages((args, kwargs))} - self.live.keys()
        for storage in _storages(out):
            if storage._cdata not in before:
                self._track(storage)
        return out


def _storages(tree) -> list[torch.UntypedStorage]:
    return [t.untyped_storage() for t in tree_flatten(tree)[0]
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta"]


def peak_tensor_bytes(fn: Callable[[], R]) -> tuple[int, R]:
    """``(peak, fn())``: the most bytes of tensor storage created by ``fn`` alive at once
    (what it returns included, inputs that existed before excluded)."""
    mode = _LiveStorages()
    with mode:
        result = fn()
    return mode.peak, result

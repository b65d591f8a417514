"""Which implementation is running, and why, so nobody is silently slow."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops


@dataclass(frozen=True)
class Backend:
    extension: bool  # the compiled ``tsv_fast._C`` ops are loaded
    cuda_kernels: bool  # it was built with the CUDA kernels
    cuda_available: bool  # a CUDA GPU is visible to torch
    detail: str

    def __str__(self) -> str:
        gpu = "a CUDA GPU is visible" if self.cuda_available else "no CUDA GPU visible"
        return f"{self.detail}; {gpu}; torch {torch.__version__}"


def backend() -> Backend:
    """Report the active path: compiled ops (CPU, and CUDA if built) or the pure-PyTorch fallback."""
    loaded, detail = ops.load_extension()
    return Backend(loaded, loaded and ops.has_cuda_kernels(), torch.cuda.is_available(), detail)

"""Helpers shared by the benchmark scripts: which CPU, best-of-N wall times, and the GPU
route's settings on a CPU (for what is counted rather than timed)."""

import contextlib
import os
import platform
import time

import torch

from tsv_fast import solvers


def cpu_model() -> str:
    """The CPU's model name (what BENCHMARKS.md records as the machine)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best_of(fn, repeat: int, sync) -> float:
    """Fastest of ``repeat`` timed calls after one warm-up; ``sync`` waits for the device."""
    fn()  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def device_clock(device: torch.device):
    """(``sync``: waits for the device, ``where``: what BENCHMARKS.md records as the machine)."""
    if device.type == "cuda":
        return torch.cuda.synchronize, torch.cuda.get_device_name(device)
    return (lambda: None), cpu_model()


def run_line(where: str, *details: str) -> str:
    """The header a benchmark prints: machine, torch, OpenMP wait policy, then ``details``."""
    return "; ".join([f"# {where}", f"torch {torch.__version__}",
                      f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}", *details])


@contextlib.contextmanager
def gpu_route_on_cpu(cap: int | None):
    """``exact`` on the CPU takes the GPU's route (``EXACT_ROUTE``, ``ROUTE_SHARE``) with the block
    cap ``cap`` (the GPU's Jacobi shared-memory order), so its work and memory can be counted here."""
    saved = solvers.EXACT_ROUTE["cpu"], solvers.ROUTE_SHARE["cpu"], solvers.MAX_BLOCK
    solvers.EXACT_ROUTE["cpu"], solvers.ROUTE_SHARE["cpu"] = solvers.EXACT_ROUTE["cuda"], solvers.ROUTE_SHARE["cuda"]
    solvers.MAX_BLOCK = cap
    try:
        yield
    finally:
        solvers.EXACT_ROUTE["cpu"], solvers.ROUTE_SHARE["cpu"], solvers.MAX_BLOCK = saved

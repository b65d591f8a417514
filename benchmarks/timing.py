"""Helpers shared by the benchmark scripts: which CPU, and best-of-N wall times."""

import os
import platform
import time

import torch


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

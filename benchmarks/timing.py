"""Helpers shared by the benchmark scripts: which CPU, and best-of-N wall times."""

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

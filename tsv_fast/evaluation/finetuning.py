"""Fine-tuning every task of a benchmark, in worker processes, with a cache (both benchmarks)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from ..writer import atomic_write_file


def save_state(state: Mapping[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically (a unique temporary name, then a rename): an interrupted
    write, or two runs filling the same cache entry, never leave half a file under ``path``."""
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_file(Path(path), lambda tmp: save_file(dict(state), tmp, metadata=metadata))


def finetune_all(bench: Any, jobs: int, log: Callable[[str], None], worker: Callable,
                 worker_args: Callable[[str], tuple]) -> dict[str, dict[str, Tensor]]:
    """Every task's fine-tuned state dict from ``bench`` (``tasks``, ``settings``, ``cache_path``,
    ``finetune``, ``cached``, ``finetune_seconds``). With ``jobs > 1`` the tasks missing from the
    cache are trained first in that many worker processes (``worker(worker_args(name))`` returns
    ``(name, seconds)``), one torch thread each: on a small CPU that beats one process with several
    threads and spares the busy-waiting of idle OpenMP threads. Then each is read from the cache."""
    todo = [n for n in bench.tasks if not bench.cache_path(n).is_file()]
    s = bench.settings
    trained = {}
    # minutes of work with one log line per finished task: a bar with the ETA, on a terminal only
    bar = tqdm(total=len(todo), desc="fine-tune", unit="task", disable=None if todo else True)

    def done(message: str) -> None:
        bar.update()
        with bar.external_write_mode():
            log(message)

    with bar:
        if jobs > 1 and len(todo) > 1:
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(min(jobs, len(todo))) as pool:
                for name, seconds in pool.imap_unordered(worker, [worker_args(n) for n in todo]):
                    trained[name] = seconds
                    done(f"fine-tuned {name} (seed {s.seed}, {s.steps} steps): {seconds:.1f} s in a worker")
        out = {}
        for name in bench.tasks:
            out[name] = bench.finetune(name)
            if name in trained:
                bench.cached[name], bench.finetune_seconds[name] = False, trained[name]
            elif bench.cached[name]:
                log(f"fine-tuned {name} (seed {s.seed}, {s.steps} steps): cached")
            else:
                done(f"fine-tuned {name} (seed {s.seed}, {s.steps} steps): {bench.finetune_seconds[name]:.1f} s")
    return out

"""Peak memory of a merge from disk: the streaming `tsv-fast merge` vs loading every checkpoint first.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_memory.py --tasks 8 --methods mean,tsv

Writes T+1 synthetic CLIP ViT-B/32 visual-tower checkpoints (open_clip names and shapes,
float32, ~350 MB each) into a temporary folder, then runs in fresh subprocesses:

(0) runtime: ``import tsv_fast`` only (the Python/torch floor every run pays),
(1) stream:  ``python -m tsv_fast merge BASE TASK... -o OUT`` (lazy reads, streamed writes),
(2) load-all: ``safetensors.torch.load_file`` of every checkpoint, ``merge_layers``, ``save_file``,

and reports each child's peak RSS (``ru_maxrss`` from ``os.wait4``) against the size of one
checkpoint, both in total and above the runtime floor. The two outputs are compared tensor
by tensor. The tasks are the base plus Gaussian noise: memory does not depend on spectra.

This parent process imports neither torch nor tsv_fast until the measurements are done:
Linux carries a process's peak RSS across fork and exec, so a large parent would inflate
every child's ru_maxrss.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child_make(folder: Path, model: str, tasks: int, width: int | None, layers: int | None, full: bool) -> None:
    import torch
    from safetensors.torch import save_file

    from tsv_fast.synthetic import CLIP_VITS, clip_vit_base

    if full:  # image and text towers, random weights (no model hub here)
        import open_clip

        torch.manual_seed(0)
        base = {k: v.detach().contiguous() for k, v in open_clip.create_model(model).state_dict().items()}
    else:
        w, n, patch, image = CLIP_VITS[model]
        base = clip_vit_base(width or w, layers or n, patch, image, seed=0)
    save_file(base, folder / "base.safetensors")
    gen = torch.Generator().manual_seed(1)
    for t in range(tasks):  # one task in memory at a time
        ft = {k: v + 0.01 * v.float().pow(2).mean().sqrt().clamp(min=1e-3) * torch.randn(v.shape, generator=gen)
              if v.is_floating_point() else v for k, v in base.items()}
        save_file(ft, folder / f"task{t}.safetensors")
        del ft


def _measure(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in bytes, seconds) of one child process; fails loudly if the child fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(cmd)}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def _child_load_all(folder: Path, method: str, tasks: int, out: Path) -> None:
    """The non-streaming way: every checkpoint in memory, merge, save."""
    from safetensors.torch import load_file, save_file

    import tsv_fast

    base = load_file(folder / "base.safetensors")
    fts = [load_file(folder / f"task{t}.safetensors") for t in range(tasks)]
    merged = tsv_fast.merge_layers(base, fts, method=method)
    save_file(merged, out)


def _compare(a: Path, b: Path) -> float:
    from tsv_fast.checkpoints import open_checkpoint

    x, y = open_checkpoint(a), open_checkpoint(b)
    assert list(x) == list(y) or set(x) == set(y), "different keys"
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="ViT-B-32, ViT-B-16 or ViT-L-14")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--methods", default="mean", help="comma-separated, e.g. mean,tsv")
    parser.add_argument("--width", type=int, default=None, help="smaller tower for a quick check")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--full", action="store_true", help="the whole CLIP model (both towers), not the visual one")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the checkpoints (default: a temp dir)")
    parser.add_argument("--child", choices=["make", "load-all"], help=argparse.SUPPRESS)
    parser.add_argument("--method", default="mean", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "load-all":
        _child_load_all(args.dir, args.method, args.tasks, args.out)
        return
    if args.child == "make":
        _child_make(args.dir, args.model, args.tasks, args.width, args.layers, args.full)
        return

    folder = Path(tempfile.mkdtemp(prefix="tsv-fast-mem-", dir=args.dir))
    py = sys.executable
    try:
        start = time.perf_counter()
        subprocess.run([py, __file__, "--child", "make", "--dir", str(folder), "--model", args.model, "--tasks",
                        str(args.tasks)] + (["--width", str(args.width)] if args.width else [])
                       + (["--layers", str(args.layers)] if args.layers else [])
                       + (["--full"] if args.full else []), check=True)
        base = folder / "base.safetensors"
        ckpt = base.stat().st_size
        tasks = [str(folder / f"task{t}.safetensors") for t in range(args.tasks)]
        print(f"{args.tasks + 1} checkpoints of {ckpt / 2**20:.0f} MiB written in {time.perf_counter() - start:.0f} s")
        floor, _ = _measure([py, "-c", "import tsv_fast, tsv_fast.cli"])
        rows = [("runtime (import tsv_fast)", "-", floor, None)]
        for method in args.methods.split(","):
            stream_out, all_out = folder / f"stream-{method}.safetensors", folder / f"all-{method}.safetensors"
            rss, secs = _measure([py, "-m", "tsv_fast", "merge", str(base), *tasks, "-o", str(stream_out),
                                  "--method", method, "-q"])
            rows.append(("stream: tsv-fast merge", method, rss, secs))
            rss, secs = _measure([py, __file__, "--child", "load-all", "--dir", str(folder), "--tasks",
                                  str(args.tasks), "--method", method, "--out", str(all_out)])
            rows.append(("load all, merge_layers, save_file", method, rss, secs))
        for method in args.methods.split(","):  # after the measurements: this imports torch here
            diff = _compare(folder / f"stream-{method}.safetensors", folder / f"all-{method}.safetensors")
            print(f"{method}: max |stream − load-all| = {diff:.2e}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    import torch

    print(f"\n{datetime.date.today()}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"Python {platform.python_version()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print(f"{args.model} {'CLIP (both towers)' if args.full else 'visual tower'}, T = {args.tasks}, "
          f"one checkpoint = {ckpt / 2**20:.0f} MiB\n")
    print("| run | method | peak RSS | ÷ checkpoint | above runtime ÷ checkpoint | wall |")
    print("|---|---|---|---|---|---|")
    for name, method, rss, secs in rows:
        wall = "-" if secs is None else f"{secs:.1f} s"
        print(f"| {name} | {method} | {rss / 2**20:.0f} MiB | {rss / ckpt:.2f}× | {(rss - floor) / ckpt:.2f}× "
              f"| {wall} |")


if __name__ == "__main__":
    main()

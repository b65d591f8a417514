"""Serving many tasks over one CLIP ViT: store sizes, resident memory, mixed-batch throughput,
task-switch latency. Everything is compared within the same run (ratios).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_runtime.py [--model ViT-B-32] [--json out.json]

The model is ``open_clip.create_model(MODEL)`` with random weights (nothing is
downloaded). Tasks tune the image tower only (the text tower is frozen, as in the TSV
paper); their factors have the store's ranks floor(r/T) but random values: sizes,
memory and speed depend on the ranks, not on the values (accuracy is checked in
tests/test_runtime.py). Memory is measured in fresh subprocesses (VmHWM, the peak RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from tsv_fast import CompressedTask
from tsv_fast.keys import is_matrix_key, resolve_rank
from tsv_fast.store import TaskStore, expected_nbytes

MIB = 2**20


def build_model(name: str):
    import open_clip

    torch.manual_seed(0)  # same random base in every process (the store checks the fingerprint)
    return open_clip.create_model(name, pretrained=None).eval()


def random_task(base: dict, T: int, seed: int, prefix: str = "visual.") -> CompressedTask:
    """A task with the store's default ranks floor(r/T) on every image-tower matrix key."""
    gen = torch.Generator().manual_seed(seed)
    task = CompressedTask(f"task{seed}")
    for key, b in base.items():
        if not key.startswith(prefix) or not b.is_floating_point():
            continue
        if is_matrix_key(key, b):
            k = resolve_rank(b.shape, None, T)
            m, n = b.shape
            scale = 0.05 * b.norm() / max(k, 1) ** 0.5
            task.factors[key] = (torch.randn(m, k, generator=gen) / m ** 0.5, torch.full((k,), float(scale)),
                                 torch.randn(n, k, generator=gen) / n ** 0.5)
        else:
            task.deltas[key] = 0.01 * torch.randn(b.shape, generator=gen)
    return task


def make_store(path: str, model_name: str, T: int, dtype=None) -> TaskStore:
    base = build_model(model_name).state_dict()
    store = TaskStore(path, base=base, num_tasks=T, dtype=dtype)
    for t in range(T):
        store.add(f"task{t}", random_task(base, T, t))
    return store


def bytes_of(state: dict, prefix: str = "") -> int:
    return sum(t.numel() * t.element_size() for k, t in state.items() if k.startswith(prefix))


# ------------------------------------------------------------------------------------ sizes
def sizes(model_name: str) -> dict:
    base = build_model(model_name).state_dict()
    full, visual = bytes_of(base), bytes_of(base, "visual.")
    out = {"model_bytes": full, "image_tower_bytes": visual, "per_task": {}}
    for T in (8, 14, 20):
        task = random_task(base, T, 0)
        ranks = {k: f[1].shape[0] for k, f in task.factors.items()}
        for dtype in (torch.float32, torch.bfloat16):
            n = expected_nbytes(base, ranks, task.deltas, dtype)
            out["per_task"][f"T={T} {str(dtype)[6:]}"] = {
                "bytes": n, "vs_image_tower": n / visual, "vs_full_clip": n / full,
                "conv1_delta_bytes": base["visual.conv1.weight"].numel() * dtype.itemsize}
    return out


# ------------------------------------------------------------------------------------ memory (child)
def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def child(mode: str, model_name: str, T: int, store_path: str) -> dict:
    """Peak RSS of one serving setup, with one forward of a T-row batch (one row per task)."""
    torch.set_num_threads(2)
    model = build_model(model_name)
    x = torch.randn(T, 3, *model.visual.image_size)
    with torch.no_grad():
        if mode == "base":
            model.encode_image(x)
        elif mode == "full":  # T full models in memory, each used once
            import copy

            models = [model] + [copy.deepcopy(model) for _ in range(T - 1)]
            for m in models:
                m.encode_image(x[:1])
        elif mode == "compressed":
            from tsv_fast.runtime import MultiTaskModel

            mt = MultiTaskModel(model, TaskStore(store_path), strategy="lowrank")
            mt(x, task_ids=mt.names()[:T])
            mt.strategy = "materialise"  # one rebuilt matrix in flight at a time
            mt.select(mt.names()[0])(x[:1])
        else:
            raise ValueError(mode)
    return {"peak_rss": _peak_rss()}


def run_child(mode: str, model_name: str, T: int, store_path: str = "") -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--model", model_name, "--tasks", str(T), "--store", store_path]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(model_name: str, tmp: str, full_T: int) -> dict:
    res = {"base": run_child("base", model_name, 8)["peak_rss"]}
    res["largest matrix bytes"] = max(t.numel() * t.element_size()  # of the image tower: what is rebuilt
                                      for k, t in build_model(model_name).state_dict().items()
                                      if t.ndim == 2 and k.startswith("visual."))
    for T in (8, 20):
        path = os.path.join(tmp, f"store{T}")
        store = make_store(path, model_name, T)
        res[f"compressed T={T}"] = run_child("compressed", model_name, T, path)["peak_rss"]
        res[f"stored bytes T={T}"] = sum(store.nbytes(n) for n in store.names())
    res[f"full T={full_T}"] = run_child("full", model_name, full_T)["peak_rss"]
    return res


# ------------------------------------------------------------------------------------ speed
def timed(fns: dict, reps: int) -> dict:
    """Median seconds of each function, measured round-robin (one warm-up each) so that load
    from other processes on a shared machine hits every variant alike."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def speed(model_name: str, tmp: str, reps: int, batch: int = 64, T: int = 8) -> dict:
    from tsv_fast.runtime import MultiTaskModel

    torch.set_num_threads(2)
    path = os.path.join(tmp, "store8")
    if not os.path.exists(path):
        make_store(path, model_name, T)
    model = build_model(model_name)
    mt = MultiTaskModel(model, TaskStore(path))
    names = mt.names()[:T]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, *model.visual.image_size, generator=gen)
    ids = [names[i] for i in torch.randperm(batch, generator=gen).remainder(T).tolist()]  # shuffled rows
    by_task = {n: x[[i for i, t in enumerate(ids) if t == n]] for n in names}

    def per_task_loop():
        for n in names:
            mt.select(n)(by_task[n])

    out = {}
    with torch.no_grad():
        mt.select(names[0])(x[:1])  # calibrates once (one block, both strategies, b = 1, 8, 64)
        out.update(timed({
            "base encode_image (open_clip)": lambda: model.encode_image(x),
            "base through the runtime": lambda: mt.select(None)(x),
            "mixed batch, 8 tasks, one pass": lambda: mt(x, task_ids=ids),
            "per-task loop (select + forward of its rows, auto)": per_task_loop,
        }, reps))
        single = {}
        for b in (1, 8, 64):
            def run(s, b=b):
                mt.strategy = s
                mt.select(names[0])(x[:b])
            single.update({f"b={b} {k}": v for k, v in timed({s: (lambda s=s: run(s)) for s in
                                                             ("lowrank", "materialise", "auto")}, reps).items()})
        mt.strategy = "auto"
        out["single task"] = single
        out["calibration (one block, s)"] = {str(k): v for k, v in mt.calibration.items()}
        out["crossover batch"] = mt.crossover(names[0])
        # switching: select is O(1); the next forward pays nothing extra
        t0 = time.perf_counter()
        for i in range(1000):
            mt.select(names[i % T])
        out["select() latency (s)"] = (time.perf_counter() - t0) / 1000
        counter = iter(range(10**9))
        other = mt.task(names[1])
        sw = timed({
            "batch-1 forward, same task (s)": lambda: mt.select(names[0])(x[:1]),
            "batch-1 forward right after a switch (s)": lambda: mt.select(names[next(counter) % T])(x[:1]),
            "alternative: rebuild the full task state dict (s)": lambda: other.apply(mt._base),
        }, reps)
        out.update(sw)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--full-tasks", type=int, default=8, help="T for the 'T full models' memory baseline")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--only", choices=["sizes", "memory", "speed"], action="append",
                    help="run only these parts (repeatable)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--tasks", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--store", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.tasks, args.store)))
        return
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    result = {"model": args.model, "cpu": cpu, "threads": 2, "torch": torch.__version__}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        parts = args.only or ["sizes", "memory", "speed"]
        if "sizes" in parts:
            result["sizes"] = sizes(args.model)
        if "memory" in parts:
            result["memory"] = memory(args.model, tmp, args.full_tasks)
        if "speed" in parts:
            result["speed"] = speed(args.model, tmp, args.reps)
    result["bench_seconds"] = time.perf_counter() - start
    report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def report(r: dict) -> None:
    print(f"{r['model']} on {r['cpu']} (2 threads), torch {r['torch']}")
    if "sizes" in r:
        report_sizes(r["sizes"])
    if "memory" in r:
        report_memory(r["memory"])
    if "speed" in r:
        report_speed(r["speed"])
    print(f"\nbenchmark took {r['bench_seconds']:.0f} s")


def report_sizes(s: dict) -> None:
    print(f"\nper-task bytes (image tower {s['image_tower_bytes'] / MIB:.1f} MiB, full CLIP {s['model_bytes'] / MIB:.1f} MiB)")
    for k, v in s["per_task"].items():
        print(f"  {k:16s} {v['bytes'] / MIB:7.2f} MiB  {100 * v['vs_image_tower']:5.1f}% of the image tower  "
              f"{100 * v['vs_full_clip']:5.1f}% of the full CLIP  (conv1 delta {v['conv1_delta_bytes'] / MIB:.1f} MiB)")


def report_memory(m: dict) -> None:
    print("\npeak resident memory (VmHWM, fresh process each)")
    for k, v in m.items():
        print(f"  {k:24s} {v / MIB:8.1f} MiB")
    for T in (8, 20):
        extra = m[f"compressed T={T}"] - m["base"]
        print(f"  T={T}: compressed adds {extra / MIB:.1f} MiB over the base process; stored factors "
              f"{m[f'stored bytes T={T}'] / MIB:.1f} MiB (+ at most one rebuilt matrix {m['largest matrix bytes'] / MIB:.1f} MiB)")
    full_T = next(int(k.split('=')[1]) for k in m if k.startswith("full T="))
    full = m[f"full T={full_T}"]
    per_model = (full - m["base"]) / (full_T - 1)
    for T in (8, 20):
        est_full = m["base"] + (T - 1) * per_model
        print(f"  T={T}: compressed / {T} full models = {m[f'compressed T={T}'] / est_full:.3f}"
              + ("" if T == full_T else f" (full models extrapolated from the measured T={full_T})"))


def report_speed(sp: dict) -> None:
    print("\nthroughput (64 images; median seconds)")
    base = sp["base encode_image (open_clip)"]
    for k in ("base encode_image (open_clip)", "base through the runtime", "mixed batch, 8 tasks, one pass",
              "per-task loop (select + forward of its rows, auto)"):
        print(f"  {k:52s} {sp[k]:7.3f} s   throughput {base / sp[k]:.2f}× the base forward")
    print(f"  mixed batch vs per-task loop: {sp['per-task loop (select + forward of its rows, auto)'] / sp['mixed batch, 8 tasks, one pass']:.2f}× faster")
    print("  single task:", ", ".join(f"{k} {v:.3f}s" for k, v in sp["single task"].items()))
    print(f"  measured crossover (materialise wins from batch): {sp['crossover batch']}")
    print(f"\nswitching: select() {1e6 * sp['select() latency (s)']:.1f} µs; batch-1 forward same task "
          f"{sp['batch-1 forward, same task (s)']:.3f} s, right after a switch {sp['batch-1 forward right after a switch (s)']:.3f} s; "
          f"rebuilding a full task state dict instead {sp['alternative: rebuild the full task state dict (s)']:.3f} s")


if __name__ == "__main__":
    main()

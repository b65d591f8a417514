"""Where a TSV-M merge spends its time, stage by stage, and what each stage's candidates cost.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_stages.py --model ViT-L-14 --tasks 20 --device cuda

Part 1 runs ``merge_layers`` once with timers around its stages (each timer synchronises
the device, so the stages add up to a little more than an untimed merge): stacking the
deltas, the top-k solver and its pieces (float64 Gram, eigensolvers by matrix size,
orthonormalisation, long-side vectors), the whitening (polar factors) and the
reconstruction. Part 2 times the unit operations the candidates for the slow stages are
made of, on the sizes this model and T produce: one ``c×c`` float64 eigh (c = T·k) alone
and batched, float32 eigh, Cholesky, GEMM rates, and one full SVD of the reference.

``--profile N`` instead runs one untimed merge under ``torch.profiler`` and prints the N
operators (or CUDA kernels) with the most self time on the device, and how busy the device
was: the sum of kernel times over the merge's wall time (the rest is launch and host-sync
gaps, which stage timers cannot show).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool

import torch

import tsv_fast
from timing import best_of, cpu_model
from tsv_fast import methods, ops, solvers, tsv
from tsv_fast.keys import resolve_rank
from tsv_fast.synthetic import CLIP_VITS, clip_vit_base, synthetic_task_vectors

TOTALS: dict[str, float] = collections.defaultdict(float)
COUNTS: dict[str, int] = collections.defaultdict(int)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def _patched(owner, name: str, label, device: torch.device):
    """Replace ``owner.name`` by a timed wrapper; ``label(args)`` names the timer."""
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _sync(device)
            key = label(args)
            TOTALS[key] += time.perf_counter() - start
            COUNTS[key] += 1

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _shape(args) -> str:
    """The per-matrix shape of a batched call (batch sizes vary as matrices converge)."""
    return "(…)×" + "×".join(str(d) for d in args[0].shape[-2:]) + " " + str(args[0].dtype)[6:]


NS_STEPS: list[int] = []


def _counting_steps(fn):
    def wrapped(*args, **kwargs):
        info = {}
        out = fn(*args, **kwargs, info=info)
        NS_STEPS.append(info["steps"])
        return out
    return wrapped


def stage_breakdown(blocks, tvs, device, options) -> float:
    tsv.newton_schulz_whitening = _counting_steps(tsv.newton_schulz_whitening)
    hooks = [
        (methods, "_add_mean_deltas", lambda a: "0 elementwise keys (means of deltas)"),
        (tsv, "stack_deltas", lambda a: "1 stack deltas"),
        (tsv, "check_stacked", lambda a: "1 stack deltas: NaN/Inf check"),
        (methods, "shape_batch_factors", lambda a: "2 top-k factors (solver, all of it)"),
        (solvers, "gram64", lambda a: "2a float64 Gram " + _shape(a)),
        (torch.linalg, "eigh", lambda a: "2b/3b torch.linalg.eigh " + _shape(a)),
        (ops, "batched_eigh", lambda a: "2b batched_eigh (Jacobi op) " + _shape(a)),
        (solvers, "orthonormalize", lambda a: "2c orthonormalize " + _shape(a)),
        (solvers._Batch, "rayleigh_ritz", lambda a: "2f Rayleigh–Ritz (all of it) " + _shape(a[1:])),
        (solvers, "chebyshev_filter", lambda a: f"2e Chebyshev filter, degree {a[4]} " + _shape(a)),
        (solvers, "_spectrum_bounds", lambda a: "2g first filter's interval, estimated " + _shape(a)),
        (solvers, "long_side", lambda a: "2d long-side vectors " + _shape(a)),
        (tsv, "polar_from_blocks", lambda a: "3 polar factors (whitening, all of it)"),
        (tsv, "block_gram", lambda a: "3a block Gram " + _shape(a)),
        (tsv, "newton_schulz_whitening", lambda a: "3c Newton–Schulz " + _shape(a)),
        (tsv, "cholesky_inverse_factor", lambda a: "3c1 Newton–Schulz: Cholesky and L⁻¹ " + _shape(a)),
        (tsv, "smallest_eigenvalue_estimate", lambda a: "3c2 Newton–Schulz: λmin estimate " + _shape(a)),
        (tsv, "symmetric_gram", lambda a: "3c3 Newton–Schulz: XᵀX (upper blocks) " + _shape(a)),
        (ops, "reconstruct", lambda a: "4 reconstruct"),
    ]
    with contextlib.ExitStack() as stack:
        for owner, name, label in hooks:
            stack.enter_context(_patched(owner, name, label, device))
        _sync(device)
        start = time.perf_counter()
        tsv_fast.merge_layers(blocks, tvs, **options)
        _sync(device)
        return time.perf_counter() - start


def unit_costs(device, width: int, T: int) -> list[tuple[str, float]]:
    k = resolve_rank((width, width), None, T)
    c = T * k
    g = torch.Generator(device=device).manual_seed(0)
    sync = lambda: _sync(device)  # noqa: E731

    def spd(batch: int, n: int, dtype=torch.float64):
        X = torch.randn(batch, 3 * n, n, generator=g, device=device, dtype=dtype)
        return X.mT @ X / (3 * n)

    rows = []
    A1, A8 = spd(1, c), spd(8, c)
    rows.append((f"eigh float64 {c}×{c}, one matrix", best_of(lambda: torch.linalg.eigh(A1), 3, sync)))
    rows.append((f"eigh float64 {c}×{c}, batch of 8 (per matrix)",
                 best_of(lambda: torch.linalg.eigh(A8), 3, sync) / 8))
    A1f = A1.float()
    rows.append((f"eigh float32 {c}×{c}, one matrix", best_of(lambda: torch.linalg.eigh(A1f), 3, sync)))
    rows.append((f"cholesky float64 {c}×{c}, batch of 8 (per matrix)",
                 best_of(lambda: torch.linalg.cholesky(A8), 3, sync) / 8))
    G1 = spd(1, width)
    rows.append((f"eigh float64 {width}×{width} (top-k Gram), one matrix",
                 best_of(lambda: torch.linalg.eigh(G1), 3, sync)))
    ell = solvers._block_size(k, width, cap=solvers._block_cap(torch.device(device)))  # the merge's ℓ
    H = spd(64, ell)
    rows.append((f"eigh float64 {ell}×{ell} (Rayleigh–Ritz), torch, batch of 64 (per matrix)",
                 best_of(lambda: torch.linalg.eigh(H), 3, sync) / 64))
    if ops.load_extension()[0]:
        rows.append((f"batched_eigh float64 {ell}×{ell} (Jacobi op), batch of 64 (per matrix)",
                     best_of(lambda: ops.batched_eigh(H), 3, sync) / 64))
    batch = 4 * T  # a shape batch of 4 blocks' keys (the merge's are 24·T on ViT-L/14)
    Hb = spd(batch, ell)
    rows.append((f"batched_eigh float64 {ell}×{ell}, batch of {batch} (whole call)",
                 best_of(lambda: ops.batched_eigh(Hb), 3, sync) if ops.load_extension()[0] else float("nan")))
    w, Qh = torch.linalg.eigh(Hb)
    Hd = Qh.mT @ Hb @ Qh + 1e-3 * Hb  # nearly diagonal: what later Rayleigh–Ritz steps see
    rows.append((f"batched_eigh float64 {ell}×{ell}, nearly diagonal, batch of {batch} (whole call)",
                 best_of(lambda: ops.batched_eigh(Hd), 3, sync) if ops.load_extension()[0] else float("nan")))
    rows.append((f"cholesky_ex float64 {ell}×{ell}, batch of {batch} (whole call)",
                 best_of(lambda: torch.linalg.cholesky_ex(Hb), 3, sync)))
    Gq = spd(batch, width)
    Q0 = torch.randn(batch, width, ell, generator=g, device=device, dtype=torch.float64)
    R = torch.linalg.cholesky(Hb, upper=True)
    rows.append((f"solve_triangular float64 ({batch}, {width}, {ell}) (whole call)",
                 best_of(lambda: torch.linalg.solve_triangular(R, Q0, upper=True, left=False), 3, sync)))
    rows.append((f"orthonormalize float64 ({batch}, {width}, {ell}) (whole call)",
                 best_of(lambda: solvers.orthonormalize(Q0), 3, sync)))
    rows.append((f"G @ Q float64 ({batch}, {width}, {width}) × ({width}, {ell}) (whole call)",
                 best_of(lambda: Gq @ Q0, 3, sync)))
    rows.append(("host sync after a tiny kernel", best_of(lambda: bool((Q0[:, 0, 0] > 0).any()), 10, sync)))
    C = spd(24, c)
    rows.append((f"GEMM float64 (24, {c}, {c})², one Newton–Schulz product (whole call)", best_of(lambda: C @ C, 3, sync)))
    rows.append((f"cholesky_ex float64 (24, {c}, {c}) (whole call)", best_of(lambda: torch.linalg.cholesky_ex(C), 3, sync)))
    X = torch.randn(4 * width, width, generator=g, device=device)
    rows.append((f"reference unit: torch.linalg.svd float32 {4 * width}×{width}",
                 best_of(lambda: torch.linalg.svd(X, full_matrices=False), 3, sync)))
    for dtype in (torch.float64, torch.float32):
        M = torch.randn(4096, 4096, generator=g, device=device, dtype=dtype)
        t = best_of(lambda: M @ M, 3, sync)
        rows.append((f"GEMM 4096³ {str(dtype)[6:]}: {2 * 4096 ** 3 / t / 1e12:.1f} TFLOP/s", t))
    return rows


def profile_table(blocks, tvs, device: torch.device, options: dict, top: int) -> None:
    """The ``top`` operators by self time on the device (the CPU's on a CPU) in one merge."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        start = time.perf_counter()
        tsv_fast.merge_layers(blocks, tvs, **options)
        _sync(device)
        wall = time.perf_counter() - start
    events = prof.key_averages()

    def self_time(e) -> float:  # µs; torch ≥ 2.4 names the device column self_device_time_total
        if not cuda:
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    busy = sum(self_time(e) for e in events) / 1e6
    print(f"\nprofiled merge: {wall:.3f} s wall (with the profiler); {'device' if cuda else 'CPU'} self time "
          f"{busy:.3f} s ({busy / wall:.0%} of the wall time)\n")
    print("| operator / kernel | calls | self time (s) | share of self time |")
    print("|---|---|---|---|")
    for e in sorted(events, key=self_time, reverse=True)[:top]:
        print(f"| {e.key[:90]} | {e.count} | {self_time(e) / 1e6:.3f} | {self_time(e) / 1e6 / busy:.0%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-B-32", choices=sorted(CLIP_VITS))
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--blocks", type=int, default=None, help="default: all of the model's blocks")
    p.add_argument("--device", default="cpu")
    p.add_argument("--solver", default="exact")
    p.add_argument("--polar", default="auto")
    p.add_argument("--batch", default="auto")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile one merge instead and print its N operators with the most device time")
    args = p.parse_args()
    device = torch.device(args.device)
    width, layers, patch, image = CLIP_VITS[args.model]
    blocks_n = args.blocks or layers
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(f"# {where}; torch {torch.__version__}; {tsv_fast.backend()}; {args.model} ×{blocks_n} blocks, "
          f"T={args.tasks}, solver={args.solver}, polar={args.polar}, batch={args.batch}")
    base = clip_vit_base(width, blocks_n, patch, image)
    blocks = {k: v.to(device) for k, v in base.items() if ".resblocks." in k}
    tvs = [tsv_fast.TaskVector(t) for t in synthetic_task_vectors(blocks, args.tasks, seed=1, device=device)]
    options = {"solver": args.solver, "polar": args.polar, "batch": args.batch}
    tsv_fast.merge_layers(blocks, tvs, include=list(blocks)[:4], **options)  # warm-up: handles, kernels
    _sync(device)
    start = time.perf_counter()
    stats = {}
    tsv_fast.merge_layers(blocks, tvs, stats=stats, **options)
    _sync(device)
    untimed = time.perf_counter() - start
    if args.profile:
        print(f"\nmerge_layers: {untimed:.3f} s untimed; {stats['shape_batches']} shape batches")
        profile_table(blocks, tvs, device, options, args.profile)
        return
    timed_total = stage_breakdown(blocks, tvs, device, options)
    print(f"\nmerge_layers: {untimed:.3f} s untimed; {timed_total:.3f} s with stage timers; "
          f"{stats['shape_batches']} shape batches; polar factors: {stats['polar'] or 'eigh'}; "
          f"Newton–Schulz steps per call: {NS_STEPS}\n")
    print("| stage | calls | total (s) | share |")
    print("|---|---|---|---|")
    for key in sorted(TOTALS):
        print(f"| {key} | {COUNTS[key]} | {TOTALS[key]:.3f} | {TOTALS[key] / timed_total:.0%} |")
    print("\n| unit operation | time (ms) |")
    print("|---|---|")
    for label, t in unit_costs(device, width, args.tasks):
        print(f"| {label} | {1e3 * t:.2f} |", flush=True)


if __name__ == "__main__":
    main()

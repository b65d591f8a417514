"""TSV-M: the authors' algorithm vs tsv-fast, side by side in one run, with the ratio.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_merge.py --model ViT-B-32 --tasks 8

(a) reference: one full ``torch.linalg.svd`` per task and key, plus one per side for the
    polar factors (what the authors' scripts do), float32.
(b) a loop of ``torch.svd_lowrank``, (c) ``cupy.linalg.svd`` (GPU, when CuPy is installed),
(d) tsv-fast ``merge_layers(method="tsv", solver="exact")``, (e) ``solver="randomized"``,
and with ``--variants`` the routes behind them (full eigh vs subspace iteration, per-key vs
shape batches, Newton–Schulz polar).
Also the fused reconstruction op vs plain PyTorch. Absolute times on a shared 2-core
machine are noise; the ratio measured in the same run is the signal.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tsv_fast
from timing import cpu_model
from bench_polar import coupled_newton_schulz, xtx_one_gemm
from tsv_fast import ops, solvers, tsv
from tsv_fast.keys import is_matrix_key
from tsv_fast.synthetic import CLIP_VITS, clip_vit_base, synthetic_task_vectors


def full_svd_topk(tau, k):
    U, S, Vh = torch.linalg.svd(tau, full_matrices=False)
    return U[:, :k], S[:k], Vh[:k].T


def lowrank_topk(tau, k):
    U, S, V = torch.svd_lowrank(tau, q=min(k + 10, min(tau.shape)), niter=2)
    return U[:, :k], S[:k], V[:, :k]


def cupy_topk(tau, k):
    """(c): cupy.linalg.svd per matrix (GPU only), results handed back to torch without copies."""
    import cupy

    U, S, Vh = cupy.linalg.svd(cupy.asarray(tau), full_matrices=False)
    return (torch.as_tensor(U[:, :k], device=tau.device), torch.as_tensor(S[:k], device=tau.device),
            torch.as_tensor(Vh[:k].T, device=tau.device))


def cupy_available(device: str) -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return device == "cuda"


def reference_tsv_m(base: dict, taus: list[dict], topk=full_svd_topk) -> dict:
    """The authors' algorithm, written plainly: per-task SVDs, concatenate, SVD-polar both sides."""
    T = len(taus)
    out = {}
    for key, b in base.items():
        if not is_matrix_key(key, b):
            out[key] = b + sum(t[key] for t in taus) / T
            continue
        k = min(b.shape) // T
        Us, Ss, Vs = [], [], []
        for t in taus:
            U, S, V = topk(t[key], k)
            Us.append(U), Ss.append(S), Vs.append(V)
        U, S, V = torch.cat(Us, 1), torch.cat(Ss), torch.cat(Vs, 1)
        P, _, Qh = torch.linalg.svd(U, full_matrices=False)
        Pv, _, Qhv = torch.linalg.svd(V, full_matrices=False)
        out[key] = b + (P @ Qh * S) @ (Pv @ Qhv).T
    return out


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


def peak_extra_bytes(fn) -> tuple[int, object]:
    """Peak resident memory of ``fn()`` above what was resident before it (Linux VmHWM,
    reset through /proc/self/clear_refs); includes the output it returns."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_kib("VmRSS:")
    result = fn()
    return (_rss_kib("VmHWM:") - before) * 1024, result


_PEAK_SCRIPT = """
import json, sys, torch, tsv_fast
sys.path.insert(0, {here!r})
from bench_merge import peak_extra_bytes
from tsv_fast.synthetic import synthetic_task_vectors
key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
one = {{key: torch.randn(4 * {width}, {width}) * 0.02}}
tvs = [tsv_fast.TaskVector(t) for t in synthetic_task_vectors(one, {T}, seed=2)]
extra, _ = peak_extra_bytes(lambda: tsv_fast.merge_layers(one, tvs))
print(json.dumps([{T} * one[key].numel() * 4, one[key].numel() * 4, extra]))
"""


def _peak_extra_in_fresh_process(width: int, T: int) -> tuple[int, int, int]:
    """One key's merge in a new interpreter, so nothing freed earlier hides or inflates the peak."""
    import json
    import os
    import subprocess
    import sys

    code = _PEAK_SCRIPT.format(here=os.path.dirname(os.path.abspath(__file__)), width=width, T=T)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))


def best_of(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), result


def best_of_interleaved(runs: dict, repeat: int) -> dict:
    """``best_of`` for several columns in rounds (each column once per round), so a drift of
    the machine (clocks, temperature, other load) spreads over all of them, not the last ones;
    a column's previous output is dropped before it runs again."""
    best, outs = {}, {}
    for _ in range(repeat):
        for name, fn in runs.items():
            outs.pop(name, None)
            t, outs[name] = best_of(fn, 1)
            best[name] = min(t, best.get(name, t))
    return {name: (best[name], outs[name]) for name in runs}


def _merge_variant(name: str, blocks: dict, tvs: list, stats: dict | None = None) -> dict:
    """merge_layers with the variant's options and knobs (``KNOBS``), set for this run only."""
    knobs = KNOBS.get(name, [])
    previous = [getattr(owner, attr) for owner, attr, _ in knobs]
    for owner, attr, value in knobs:
        setattr(owner, attr, value)
    try:
        return tsv_fast.merge_layers(blocks, tvs, stats=stats, **VARIANTS[name][1])
    finally:
        for (owner, attr, _), value in zip(knobs, previous):
            setattr(owner, attr, value)


def _rel(out, want, base) -> float:
    return ((out - want).norm() / (want - base).norm()).item()


def _with_peak(fn, peaks: dict, name: str):
    """Run ``fn`` and record in ``peaks[name]`` the CUDA memory it allocated at its peak
    beyond what was allocated before it and the output it returns (0 on a CPU)."""
    if not torch.cuda.is_available():
        return fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    out_bytes = sum(t.numel() * t.element_size() for t in out.values())
    peaks[name] = torch.cuda.max_memory_allocated() - before - out_bytes
    return out


VARIANTS = {  # column -> (label, merge_layers options); (a)-(c) are the baselines
    "d": ("(d) tsv-fast exact", {"solver": "exact"}),
    "e": ("(e) tsv-fast randomized", {"solver": "randomized"}),
    "eigh": ("exact via full eigh", {"solver": "eigh", "batch": "key"}),
    "subspace": ("exact via subspace iteration", {"solver": "subspace"}),
    "shape": ("exact, shape batches", {"solver": "exact", "batch": "shape"}),
    "key": ("exact, per key", {"solver": "exact", "batch": "key"}),
    "ns": ("exact, Newton–Schulz polar", {"solver": "exact", "polar": "newton-schulz"}),
    "eigh-polar": ("exact, eigh polar", {"solver": "exact", "polar": "eigh"}),
    "subspace-power": ("exact via subspace iteration, power steps", {"solver": "subspace"}),
    "e-shape": ("randomized, shape batches", {"solver": "randomized", "batch": "shape"}),
    "work-half": ("exact, float64 work of half the batch's bytes at a time", {"solver": "exact"}),
    "work-quarter": ("exact, float64 work of a quarter of the batch's bytes at a time", {"solver": "exact"}),
    "ell-2k": ("exact, block ℓ = 2k (no shared-memory cap)", {"solver": "exact"}),
    "ell138": ("exact, block ℓ ≤ 138 (k + 10 at ViT-L/14, T = 8)", {"solver": "exact"}),
    "ell-k10": ("exact, block ℓ = k + 10", {"solver": "exact"}),
    "ell-k25": ("exact, block ℓ = k + 25", {"solver": "exact"}),
    "minp4": ("exact, ≥ 4 products between Rayleigh–Ritz steps", {"solver": "exact"}),
    "minp12": ("exact, ≥ 12 products between Rayleigh–Ritz steps", {"solver": "exact"}),
    "route-subspace": ("exact, subspace iteration at every size (session 6's GPU route)", {"solver": "exact"}),
    "rcond-old": ("exact, whitening cut 9.5e-7 (before session 7; now 1e-7)", {"solver": "exact"}),
    "minp16": ("exact, ≥ 16 products between Rayleigh–Ritz steps", {"solver": "exact"}),
    "jacobi512": ("exact, Jacobi kernel with 512 threads per matrix", {"solver": "exact"}),
    "jacobi1024": ("exact, Jacobi kernel with 1024 threads per matrix", {"solver": "exact"}),
    "torch-eigh": ("exact, torch.linalg.eigh on the CPU (before session 11; now SciPy's LAPACK)", {"solver": "exact"}),
    "scipy-threads": ("exact, SciPy's eigh on OpenBLAS's own threads (before session 17)", {"solver": "exact"}),
    "scipy-eigh": ("exact, SciPy's eigh whatever OMP_WAIT_POLICY says", {"solver": "exact"}),
    "e-os10": ("randomized, oversampling 10 (before session 17; now max(10, k/2))", {"solver": "randomized"}),
    "e-torch-eigh": ("randomized, torch.linalg.eigh on the CPU (before session 11)", {"solver": "randomized"}),
    "jacobi256": ("exact, Jacobi kernel with 256 threads per matrix (before session 11; now 512 above ℓ = 80)",
                  {"solver": "exact"}),
    "route-share6": ("exact, eigh per matrix while 6ℓ > q (before session 11; now 4ℓ > q)", {"solver": "exact"}),
    "cubic-ns": ("exact, Newton–Schulz polar without the Newton start (before session 12)", {"solver": "exact"}),
    "gram8": ("exact, Gram matrices from 8×8 column blocks (36/64 of a GEMM; now 4×4, 10/16)", {"solver": "exact"}),
    "ortho2": ("exact, two CholeskyQR passes between the filters of a round (before session 13; now one)",
               {"solver": "exact"}),
    "trsm-inverse": ("exact, Newton–Schulz's L⁻¹ by one batched triangular solve (before session 13; now GEMMs on a GPU)",
                     {"solver": "exact"}),
    "cholqr-library": ("exact, CholeskyQR's R⁻¹ by a batched Cholesky and triangular solve (before session 16; "
                       "now one fused op on a GPU)", {"solver": "exact"}),
    "ns-cubic": ("exact, Newton–Schulz polar (on any device) without the Newton start (before session 12)",
                 {"solver": "exact", "polar": "newton-schulz"}),
    "rr-tol0": ("exact, Jacobi to machine precision in Rayleigh–Ritz (before session 8; now 1e-12)",
                {"solver": "exact"}),
    "start-rr": ("exact, first Chebyshev filter after a Rayleigh–Ritz step (before session 8; now estimated bounds)",
                 {"solver": "exact"}),
    "ns-gemm": ("exact, Newton–Schulz's XᵀX as one GEMM (before session 8; now upper blocks)", {"solver": "exact"}),
    "batch8g": ("exact, shape batches of 8 GiB", {"solver": "exact", "batch_bytes": 8 << 30}),
    "batch2g": ("exact, shape batches of 2 GiB (before session 9; now a quarter of free memory)",
                {"solver": "exact", "batch_bytes": 2 << 30}),
    # session 6's two float64 changes undone (not its sync reductions), with the GPU's polar route
    # on any device (compare with "ns" on a CPU)
    "ns-coupled": ("exact, coupled Gram-side Newton–Schulz (session 5's)", {"solver": "exact", "polar": "newton-schulz"}),
    "gram-full": ("exact, NS polar, Gram matrices as one full GEMM (session 5's)",
                  {"solver": "exact", "polar": "newton-schulz"}),
    "session5": ("exact, session 5's Newton–Schulz and Gram matrices", {"solver": "exact", "polar": "newton-schulz"}),
}
_COUPLED_NS = (tsv, "newton_schulz_whitening", coupled_newton_schulz)
_FULL_GRAM = (solvers, "GRAM_BLOCKS", 1)
KNOBS = {  # variant -> [(module, attribute, value)] set for its run only
    "subspace-power": [(solvers, "SUBSPACE_FILTER", "power")],
    "work-half": [(solvers, "WORK_SHARE", 0.5)],
    "work-quarter": [(solvers, "WORK_SHARE", 0.25)],
    "ell-2k": [(solvers, "MAX_BLOCK", None)],
    "ell138": [(solvers, "MAX_BLOCK", 138)],
    "ell-k10": [(solvers, "SUBSPACE_OVERSAMPLE", 10)],
    "ell-k25": [(solvers, "SUBSPACE_OVERSAMPLE", 25)],
    "minp4": [(solvers, "CHEBYSHEV_MIN_PRODUCTS", 4)],
    "minp12": [(solvers, "CHEBYSHEV_MIN_PRODUCTS", 12)],
    "route-subspace": [(solvers, "EXACT_ROUTE", {"cpu": "subspace", "cuda": "subspace"})],
    "rcond-old": [(tsv, "WHITENING_RCOND", 8 * torch.finfo(torch.float32).eps)],
    "minp16": [(solvers, "CHEBYSHEV_MIN_PRODUCTS", 16)],
    "jacobi512": [(solvers, "JACOBI_THREADS", 512)],
    "jacobi1024": [(solvers, "JACOBI_THREADS", 1024)],
    "jacobi256": [(solvers, "JACOBI_THREADS", 256)],
    "torch-eigh": [(solvers, "USE_SCIPY_EIGH", False)],
    "e-torch-eigh": [(solvers, "USE_SCIPY_EIGH", False)],
    "scipy-threads": [(solvers, "SCIPY_ONE_BLAS_THREAD", False)],
    "scipy-eigh": [(solvers, "USE_SCIPY_EIGH", True)],
    "e-os10": [(solvers, "RANDOMIZED_OVERSAMPLE", 10)],
    "route-share6": [(solvers, "ROUTE_SHARE", {"cpu": 6, "cuda": 6})],
    "cubic-ns": [(tsv, "NEWTON_START", False)],
    "gram8": [(solvers, "GRAM_BLOCKS", 8)],
    "ortho2": [(solvers, "FILTER_QR_PASSES", 2)],
    "trsm-inverse": [(solvers, "TRIANGULAR_INVERSE_BY_GEMMS", ())],
    "cholqr-library": [(solvers, "FUSED_CHOLESKY_INVERSE", ())],
    "ns-cubic": [(tsv, "NEWTON_START", False)],
    "rr-tol0": [(solvers, "RAYLEIGH_RITZ_TOL", 0.0)],
    "ns-gemm": [(tsv, "symmetric_gram", xtx_one_gemm)],
    "start-rr": [(solvers, "CHEBYSHEV_START", "rayleigh-ritz")],
    "ns-coupled": [_COUPLED_NS],
    "gram-full": [_FULL_GRAM],
    "session5": [_COUPLED_NS, _FULL_GRAM],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-B-32", choices=sorted(CLIP_VITS))
    p.add_argument("--tasks", type=int, nargs="+", default=[8])
    p.add_argument("--blocks", type=int, default=1, help="transformer blocks to merge (default 1)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (task weights already on the device)")
    p.add_argument("--variants", default="d,e", help=f"tsv-fast columns, from {','.join(VARIANTS)}")
    p.add_argument("--no-baselines", action="store_true", help="skip (b) and (c); (a) always runs")
    p.add_argument("--ref-blocks", type=int, default=None,
                   help="time (a)-(c) on the first N blocks only and scale their time by blocks/N "
                        "(every block has the same shapes, so the cost is linear in blocks); "
                        "errors are then measured on those blocks")
    p.add_argument("--truth-blocks", type=int, default=0,
                   help="also measure every column's error against the float64 algorithm (LAPACK, on "
                        "the CPU) on the first N blocks: the ground truth, where (a) itself is float32")
    args = p.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    width, _, patch, image = CLIP_VITS[args.model]
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu_model()}, {torch.get_num_threads()} threads"
    print(f"# {gpu}, torch {torch.__version__}; {tsv_fast.backend()}")
    base = clip_vit_base(width, args.blocks, patch, image)
    blocks = {k: v.to(args.device) for k, v in base.items() if ".resblocks." in k}
    ref_blocks = min(args.ref_blocks or args.blocks, args.blocks)
    ref_keys = [k for k in blocks if int(k.split(".resblocks.")[1].split(".")[0]) < ref_blocks]
    ref_scale = args.blocks / ref_blocks
    if ref_blocks < args.blocks:
        print(f"(a)-(c) run on {ref_blocks} of {args.blocks} blocks; their times are scaled by {ref_scale:g}.")
    print("Speed-up = time of (a) / time of the row; err = max over keys of ‖Δ − Δ_(a)‖/‖Δ_(a)‖"
          + (f"; f64 = the same against the float64 algorithm on {args.truth_blocks} block(s)" if args.truth_blocks
             else "") + ("; peak = the device memory a merge allocates beyond its inputs and output, "
                         "÷ its largest shape batch of stacked deltas" if args.device == "cuda" else "") + ".\n")
    cupy = cupy_available(args.device) and not args.no_baselines
    labels = ["(a) reference"] + ([] if args.no_baselines else ["(b) svd_lowrank loop"]) \
        + (["(c) cupy svd"] if cupy else []) + [VARIANTS[v][0] for v in variants]
    print("| model | T | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for T in args.tasks:
        taus = synthetic_task_vectors(blocks, T, seed=1, device=args.device)  # drawn where they are used
        tvs = [tsv_fast.TaskVector(t) for t in taus]
        ref_base = {k: blocks[k] for k in ref_keys}
        runs = {"a": lambda: reference_tsv_m(ref_base, taus)}
        if not args.no_baselines:
            runs["b"] = lambda: reference_tsv_m(ref_base, taus, lowrank_topk)
        if cupy:
            runs["c"] = lambda: reference_tsv_m(ref_base, taus, cupy_topk)
        peaks, stats = {}, {}  # variant -> CUDA peak bytes, merge_layers stats
        for v in variants:
            runs[v] = lambda v=v: _with_peak(lambda: _merge_variant(v, blocks, tvs, stats.setdefault(v, {})), peaks, v)
        k0 = ref_keys[0]
        reference_tsv_m({k0: blocks[k0]}, taus)  # warm-up: library handles and kernels load outside the timing
        results = {name: best_of(fn, 1 if ref_scale > 1 else args.repeat) for name, fn in runs.items() if name in "abc"}
        results.update(best_of_interleaved({n: fn for n, fn in runs.items() if n not in "abc"}, args.repeat))
        for name in "abc":
            if name in results:
                results[name] = (results[name][0] * ref_scale, results[name][1])
        t_ref, ref = results["a"]
        truth_keys = [k for k in ref_keys if int(k.split(".resblocks.")[1].split(".")[0]) < args.truth_blocks]
        truth = reference_tsv_m({k: blocks[k].double().cpu() for k in truth_keys},
                                [{k: t[k].double().cpu() for k in truth_keys} for t in taus]) if truth_keys else {}

        def errors(out) -> str:
            cell = ", err " + f"{max(_rel(out[k], ref[k], blocks[k]) for k in ref_keys):.1e}"
            if truth:
                cell += f", f64 {max(_rel(out[k].double().cpu(), truth[k], blocks[k].double().cpu()) for k in truth):.1e}"
            return cell

        cells = [f"{t_ref:.2f} s" + (f", f64 {max(_rel(ref[k].double().cpu(), truth[k], blocks[k].double().cpu()) for k in truth):.1e}" if truth else "")]
        for name in [n for n in runs if n != "a"]:
            t, out = results[name]
            largest = stats.get(name, {}).get("largest_batch_bytes")  # ÷ this run's largest shape batch
            peak = f", peak {peaks[name] / largest:.2f}×" if name in peaks and largest else ""
            cells.append(f"{t:.2f} s, **{t_ref / t:.2f}×**{errors(out)}{peak}")
        print(f"| {args.model} ×{args.blocks} blocks | {T} | " + " | ".join(cells) + " |")

    print("\n| peak extra memory of one key's TSV-M (3072×768, CPU) | T | one key of all tasks (MiB) | "
          "output (MiB) | peak above inputs, incl. output (MiB) | extra ÷ input batch |")
    print("|---|---|---|---|---|---|")
    for T in args.tasks if args.device == "cpu" else []:
        batch, out_bytes, extra = _peak_extra_in_fresh_process(width, T)
        print(f"| exact | {T} | {batch / 2**20:.0f} | {out_bytes / 2**20:.0f} | {extra / 2**20:.0f} "
              f"| {(extra - out_bytes) / batch:.2f}× |")

    print("\n| reconstruct W0 + U diag(S) Vᵀ | shape | k | PyTorch (ms) | tsv_fast op (ms) | ratio |")
    print("|---|---|---|---|---|---|")
    for m, n, k in [(3072, 768, 768), (768, 768, 96)]:
        W0, U, S, V = (t.to(args.device) for t in (torch.randn(m, n), torch.randn(m, k), torch.rand(k), torch.randn(n, k)))
        t_torch = statistics.median(best_of(lambda: torch.addmm(W0, U * S, V.T), 1)[0] for _ in range(5))
        t_op = statistics.median(best_of(lambda: ops.reconstruct(W0, U, S, V, 1.0), 1)[0] for _ in range(5))
        print(f"| {args.device} float32 | {m}×{n} | {k} | {1e3 * t_torch:.1f} | {1e3 * t_op:.1f} | {t_torch / t_op:.2f}× |")


if __name__ == "__main__":
    main()

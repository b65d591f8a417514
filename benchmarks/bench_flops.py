"""What a TSV-M merge's GPU route costs in arithmetic, counted exactly, and the time floor it implies.

    .venv/bin/python benchmarks/bench_flops.py --model ViT-L-14 --tasks 20 --blocks 2

Runs ``merge_layers`` with the ``exact`` solver's GPU route (by size: subspace iteration with ℓ
capped at the Jacobi kernel's shared-memory order or k + 10, else eigh; Newton–Schulz polar
factors, shape batches; where it takes eigh, at ViT-L/14 T ≤ 6, that eigh's arithmetic is not
counted) on the
CPU under a dispatch mode that counts, per stage, the floating-point operations of every
matrix product (``mm``, ``addmm``, ``bmm``, ``baddbmm``) by dtype, the dispatched operators
(on a GPU each is at least one kernel launch), host synchronisations (``item``/``bool``) and
the small-eigenproblem calls. Counts, not timings: the machine's load does not matter, and
the GPU runs the same operators (the Jacobi kernel where this runs LAPACK's ``eigh``).
Counted on ``--blocks`` blocks and scaled to the model's: arithmetic by the number of blocks;
the operators and syncs of the per-key stages (stacking, reconstruction, the rest) from a
second count with one block more, as the count on ``--blocks`` plus the per-block increment
for each further block (exact: runs of keys merged at once, such as the biases and LayerNorm,
cost the same whatever their length); the batched stages' operators and syncs as counted,
since their chunks are a share of the shape batch. Checked at ViT-B/32, T = 8: 2 blocks
extrapolated vs all 12 counted (``--blocks 12``), operators within 5%, syncs and Jacobi
launches equal. The chunk table after it plans the whole model's subspace-iteration chunks
from the shapes alone, by the merge's own functions.

The floor is the float64 GEMM work at ``--peak-f64`` TFLOP/s (67: the H100/H200 datasheet's
float64 tensor-core rate) plus the float32 work at ``--peak-f32``: no merge running these
products can be faster on that card, whatever its kernels.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tsv_fast
from timing import cpu_model, gpu_route_on_cpu
from tsv_fast import methods, solvers, tsv
from tsv_fast.keys import resolve_rank
from tsv_fast.merge import DEFAULT_BATCH_BYTES, plan_shape_batches
from tsv_fast.synthetic import CLIP_VITS, clip_vit_base, synthetic_task_vectors
from tsv_fast.writer import parse_size

aten = torch.ops.aten
_GEMMS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.addmm_.default,
          aten.baddbmm_.default, aten.mm.out, aten.bmm.out, aten.addmm.out, aten.baddbmm.out}
_ADD_GEMMS = {aten.addmm.default, aten.baddbmm.default, aten.addmm_.default, aten.baddbmm_.default,
              aten.addmm.out, aten.baddbmm.out}
_SYNCS = {aten._local_scalar_dense.default, aten.is_nonzero.default}
# factorisations and solves, counted with the arithmetic (GPUs run them well below the GEMM rate)
_CHOLESKY = {aten.linalg_cholesky_ex.default}
_TRIANGULAR = {aten.linalg_solve_triangular.default}
_EIGH = {aten._linalg_eigh.default, aten.linalg_eigh.default}


def gemm_flops(func, args) -> int:
    """2·(batch)·m·n·k of a matrix product, from its operands' shapes."""
    a, b = (args[1], args[2]) if func in _ADD_GEMMS else (args[0], args[1])
    batch = a.shape[0] if a.dim() == 3 else 1
    return 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


class StageCounter(TorchDispatchMode):
    """Tallies per stage (the innermost label pushed by :func:`_labelled` wrappers)."""

    def __init__(self):
        super().__init__()
        self.stack = ["0 other"]
        self.flops = collections.defaultdict(lambda: collections.defaultdict(int))  # stage → dtype → flops
        self.ops = collections.Counter()
        self.syncs = collections.Counter()
        self.eigh = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        stage = self.stack[-1]
        if not (func.is_view or func is aten._unsafe_view.default):  # views and reshapes launch nothing
            self.ops[stage] += 1
        if func in _GEMMS:
            self.flops[stage][args[0].dtype] += gemm_flops(func, args)
        elif func.namespace == "tsv_fast" and "reconstruct" in func.name():  # base + α U diag(S) Vᵀ
            U, V = args[1], args[3]
            batch = U.shape[0] if U.dim() == 3 else 1
            self.flops[stage][U.dtype] += 2 * batch * U.shape[-2] * V.shape[-2] * U.shape[-1]
        elif func in _CHOLESKY:  # n³/3 per matrix
            A = args[0]
            self.flops[stage][A.dtype] += A.numel() * A.shape[-1] // 3
        elif func in _TRIANGULAR:  # n² per right-hand side
            A, B = args[0], args[1]
            self.flops[stage][A.dtype] += B.numel() * A.shape[-1]
        elif func in _SYNCS:
            self.syncs[stage] += 1
        elif func in _EIGH:
            self.eigh[stage] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _labelled(counter: StageCounter, owner, name: str, label: str):
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        counter.stack.append(label)
        try:
            return original(*args, **kwargs)
        finally:
            counter.stack.pop()

    setattr(owner, name, wrapped)
    try:
        yield
    finally:
        setattr(owner, name, original)


STAGES = [
    (methods, "_add_mean_deltas", "0 elementwise keys"),
    (tsv, "stack_deltas", "1 stack deltas"),
    (tsv, "check_stacked", "1 stack deltas"),
    (solvers, "gram64", "2a float64 Gram"),
    (solvers, "_chebyshev_iteration", "2c G Q products outside the filters"),
    (solvers, "_power_iteration", "2c G Q products outside the filters"),
    (solvers._Batch, "rayleigh_ritz", "2b Rayleigh–Ritz"),
    (solvers, "chebyshev_filter", "2c Chebyshev filters"),
    (solvers, "orthonormalize", "2d orthonormalize"),
    (solvers, "long_side", "2e long-side vectors"),
    (tsv, "block_gram", "3a block Gram"),
    (tsv, "smallest_eigenvalue_estimate", "3b λmin estimate"),
    (tsv, "newton_schulz_whitening", "3c Newton–Schulz"),
    (tsv, "polar_from_blocks", "3d polar, rest (X W)"),
    (tsv_fast.ops, "reconstruct", "4 reconstruct"),
]


# operators per key (or per run of keys); the others per chunk
PER_KEY = {"0 other", "0 elementwise keys", "1 stack deltas", "4 reconstruct"}


def count_merge(blocks: dict, T: int, cap: int | None, batch_bytes: int) -> StageCounter:
    tvs = [tsv_fast.TaskVector(t) for t in synthetic_task_vectors(blocks, T, seed=1)]
    counter = StageCounter()
    host_checked, tsv.HOST_CHECKED_DEVICES = tsv.HOST_CHECKED_DEVICES, set()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(gpu_route_on_cpu(cap))
            for owner, name, label in STAGES:
                stack.enter_context(_labelled(counter, owner, name, label))
            stack.enter_context(_labelled(counter, methods, "shape_batch_factors", "2f top-k, rest"))
            with counter:
                tsv_fast.merge_layers(blocks, tvs, polar="newton-schulz", batch="shape", batch_bytes=batch_bytes)
    finally:
        tsv.HOST_CHECKED_DEVICES = host_checked
    return counter


def solver_chunks(width: int, layers: int, patch: int, image: int, T: int, cap: int | None,
                  batch_bytes: int) -> list[tuple[tuple[int, int], int, int]]:
    """(shape, matrices, matrices per chunk) of every subspace-iteration call a TSV-M merge with
    shape batches makes on ``layers`` blocks: from shapes alone (meta tensors), by the same
    functions the merge uses, so it covers a whole model where counting arithmetic would take long."""
    one = {k: v for k, v in clip_vit_base(width, 1, patch, image).items() if ".resblocks.0." in k}
    base = {k.replace(".resblocks.0.", f".resblocks.{i}."): torch.empty(v.shape, dtype=v.dtype, device="meta")
            for i in range(layers) for k, v in one.items()}
    batches = plan_shape_batches(base, T, batch="shape", batch_bytes=batch_bytes)
    largest = max(nbytes for _, nbytes in batches)
    calls = []
    for group, _ in batches:
        shape = tuple(base[group[0]].shape)
        k = resolve_rank(shape, None, T)
        p, q = max(shape), min(shape)
        ell = solvers._block_size(k, q, cap=cap)
        for part in methods._sub_batches(group, methods.tsv_key_bytes(shape, k, T), methods.PEAK_SHARE * largest):
            B = len(group[part]) * T
            with solvers.work_base(largest):
                calls.append((shape, B, min(B, solvers.subspace_chunk(B, p, q, ell, 4))))
    return calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-L-14", choices=sorted(CLIP_VITS))
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--blocks", type=int, default=2, help="blocks counted (≥ 2: keys form shape batches)")
    p.add_argument("--cap", type=int, default=118, help="ℓ cap of the GPU route (0: none, ℓ = 2k)")
    p.add_argument("--batch-bytes", type=parse_size, default=DEFAULT_BATCH_BYTES,
                   help="shape batch size (e.g. 8G; default %(default)s bytes)")
    p.add_argument("--peak-f64", type=float, default=67.0, help="float64 TFLOP/s of the card")
    p.add_argument("--peak-f32", type=float, default=67.0, help="float32 (non-TF32) TFLOP/s of the card")
    args = p.parse_args()
    width, layers, patch, image = CLIP_VITS[args.model]
    base = clip_vit_base(width, min(args.blocks + 1, layers), patch, image)
    blocks = {k: v for k, v in base.items() if ".resblocks." in k}
    first = {k: v for k, v in blocks.items() if f".resblocks.{args.blocks}." not in k}
    counter = count_merge(first, args.tasks, args.cap or None, args.batch_bytes)
    # one block more: the per-block increment (none needed when every block is counted)
    more = count_merge(blocks, args.tasks, args.cap or None, args.batch_bytes) if args.blocks < layers else counter
    scale = layers / args.blocks

    def count(stage: str, what: str) -> int:
        """``what`` (ops, syncs, eigh) of ``stage`` for the whole model."""
        now, plus_one = getattr(counter, what)[stage], getattr(more, what)[stage]
        return now + (plus_one - now) * (layers - args.blocks) if stage in PER_KEY else now

    print(f"# counted on {cpu_model()}, torch {torch.__version__}; {args.model}, T = {args.tasks}, GPU route of "
          f"exact TSV-M (ℓ cap {args.cap or 'none'}, WORK_SHARE {solvers.WORK_SHARE}); {args.blocks} blocks "
          f"counted{f' (and {args.blocks + 1} for the per-key stages increment)' if args.blocks < layers else ''}, "
          f"arithmetic ×{scale:g} for {layers}; "
          f"shape batches of {args.batch_bytes / 2**30:g} GiB\n")
    print("| stage | float64 TFLOP | float32 TFLOP | floor (ms) | operators | host syncs | eigh calls |")
    print("|---|---|---|---|---|---|---|")
    stages = sorted(set(counter.ops) | set(counter.flops))
    total = collections.Counter()
    for stage in stages:
        f64 = counter.flops[stage][torch.float64] * scale
        f32 = counter.flops[stage][torch.float32] * scale
        floor = f64 / (args.peak_f64 * 1e12) + f32 / (args.peak_f32 * 1e12)
        row = {"f64": f64, "f32": f32, "floor": floor, "ops": count(stage, "ops"), "syncs": count(stage, "syncs"),
               "eigh": count(stage, "eigh")}
        total.update(row)
        print(f"| {stage} | {f64 / 1e12:.2f} | {f32 / 1e12:.2f} | {1e3 * floor:.0f} | {row['ops']:.0f} | "
              f"{row['syncs']:.0f} | {row['eigh']:.0f} |")
    print(f"| **total** | **{total['f64'] / 1e12:.2f}** | **{total['f32'] / 1e12:.2f}** | "
          f"**{1e3 * total['floor']:.0f}** | {total['ops']:.0f} | {total['syncs']:.0f} | {total['eigh']:.0f} |")
    print(f"\nGEMM floor at {args.peak_f64:g} TFLOP/s float64, {args.peak_f32:g} float32: "
          f"{total['floor']:.3f} s; a 1 s merge needs {math.ceil(100 * total['floor']):.0f}% of that rate end to end.")
    counted = solver_chunks(width, args.blocks, patch, image, args.tasks, args.cap or None, args.batch_bytes)
    whole = solver_chunks(width, layers, patch, image, args.tasks, args.cap or None, args.batch_bytes)
    n_counted = sum(-(-B // c) for _, B, c in counted)
    steps = count("2b Rayleigh–Ritz", "eigh") / n_counted  # (the polar factors' eigh fallbacks aside)
    print(f"\nChunks of subspace iteration (each takes its Rayleigh–Ritz steps as one Jacobi launch per step; "
          f"{steps:.2f} steps per chunk as counted on {args.blocks} blocks):\n")
    print("| blocks | shape | matrices per call | matrices per chunk | chunks |")
    print("|---|---|---|---|---|")
    for label, calls in ((args.blocks, counted), (layers, whole))[args.blocks >= layers:]:
        for shape, B, chunk in calls:
            print(f"| {label} | {shape[0]}×{shape[1]} | {B} | {chunk} | {-(-B // chunk)} |")
    n_whole = sum(-(-B // c) for _, B, c in whole)
    print(f"\n{layers} blocks: {n_whole} chunks, about {steps * n_whole:.0f} Jacobi launches.")


if __name__ == "__main__":
    main()

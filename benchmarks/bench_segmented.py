"""Segmented low-rank apply (SGMV) for a mixed-task batch: the compiled op vs the
pure-PyTorch per-segment loop vs dense per-task weights, side by side in one run.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_segmented.py [--rows 64 3200] [--device cuda]

The layer is a ViT-B/32 MLP ``c_fc`` (768 -> 3072) with T = 8 tasks of rank k = 96 and
the batch rows split evenly between the tasks (64 rows: 64 pooled features; 3200 rows:
64 images x 50 tokens, what the runtime feeds the layer). Timed per layer call:

* ``op``:     ``y = x W0ᵀ`` (one GEMM for the whole batch) + one
  ``segmented_lowrank_apply_`` call for all segments (factors packed once beforehand);
* ``loop``:   the same base GEMM + the former pure-PyTorch loop (per segment: cast the
  factors, ``(x V) ⊙ S``, ``addmm`` with ``Uᵀ``);
* ``dense``:  one GEMM per segment with that task's full weight ``W0 + U diag(S) Vᵀ``
  (precomputed: T full matrices resident, the memory the low-rank runtime avoids).

Also the low-rank part alone (op vs loop). Absolute times on a shared machine are noisy;
the ratios measured in the same run are the signal.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool

import torch
import torch.nn.functional as F

from timing import best_of, cpu_model
from tsv_fast import ops


def loop_apply(x, offsets, Us, Ss, Vs, out):
    """The pure-PyTorch loop tsv_fast.runtime_ops used before the compiled op."""
    dt = x.dtype
    for i in range(len(Us)):
        a, b = offsets[i], offsets[i + 1]
        t = (x[a:b] @ Vs[i].to(dt)) * Ss[i].to(dt)
        out[a:b].addmm_(t, Us[i].to(dt).T)
    return out


def bench_rows(N, W0, b0, lists, table, dense, repeat, sync, g):
    """Times (s) of op / loop / dense layer and op / loop low-rank part for N rows."""
    Us, Ss, Vs = lists
    U, S, V, ranks = table
    T, (m, n), dev = len(Us), W0.shape, W0.device
    x = torch.randn(N, n, generator=g).to(dev)
    offsets = [i * N // T for i in range(T + 1)]
    offs, slots = torch.tensor(offsets), torch.arange(T)
    y = torch.empty(N, m, device=dev)

    def op_delta():
        torch.ops.tsv_fast.segmented_lowrank_apply_(y, x, offs, slots, U, S, V, ranks, 1.0)

    def loop_delta():
        loop_apply(x, offsets, Us, Ss, Vs, y)

    def op_layer():
        yy = F.linear(x, W0, b0)
        torch.ops.tsv_fast.segmented_lowrank_apply_(yy, x, offs, slots, U, S, V, ranks, 1.0)

    def loop_layer():
        loop_apply(x, offsets, Us, Ss, Vs, F.linear(x, W0, b0))

    def dense_layer():
        yy = torch.empty(N, m, device=dev)
        for i in range(T):
            torch.addmm(b0, x[offsets[i]:offsets[i + 1]], dense[i].T, out=yy[offsets[i]:offsets[i + 1]])

    # same result both ways (sanity)
    a, b = F.linear(x, W0, b0), F.linear(x, W0, b0)
    torch.ops.tsv_fast.segmented_lowrank_apply_(a, x, offs, slots, U, S, V, ranks, 1.0)
    loop_apply(x, offsets, Us, Ss, Vs, b)
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-3 if U.dtype == torch.float32 else 3e-2)
    return tuple(best_of(f, repeat, sync) for f in (op_layer, loop_layer, dense_layer, op_delta, loop_delta))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[64, 3200])
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--rank", type=int, default=96)
    p.add_argument("--n", type=int, default=768, help="layer input width")
    p.add_argument("--m", type=int, default=3072, help="layer output width")
    p.add_argument("--factor-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    ok, why = ops.load_extension()
    if not ok:
        raise SystemExit(why)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    fdt = getattr(torch, args.factor_dtype)
    T, k, n, m = args.tasks, args.rank, args.n, args.m
    g = torch.Generator().manual_seed(0)
    W0 = (torch.randn(m, n, generator=g) / n**0.5).to(dev)
    b0 = torch.zeros(m, device=dev)
    Us = [(torch.randn(m, k, generator=g) / m**0.5).to(dev, fdt) for _ in range(T)]
    Ss = [torch.rand(k, generator=g).to(dev, fdt) for _ in range(T)]
    Vs = [(torch.randn(n, k, generator=g) / n**0.5).to(dev, fdt) for _ in range(T)]
    U, S, V, ranks = ops.pack_factors(Us, Ss, Vs)  # once, at load time
    dense = [ops.reconstruct(W0, u, s, v, 1.0) for u, s, v in zip(Us, Ss, Vs)]

    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model()
    print(f"{where}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; {ops.load_extension()[1]}")
    print(f"layer {n} -> {m}, T = {T} tasks, rank {k}, factors {args.factor_dtype}, best of {args.repeat}")
    print(f"{'rows':>6} {'op ms':>8} {'loop ms':>8} {'dense ms':>9} {'loop/op':>8} {'dense/op':>9}"
          f" | {'Δ op ms':>8} {'Δ loop ms':>9} {'loop/op':>8}")
    for N in args.rows:
        t_op, t_loop, t_dense, d_op, d_loop = bench_rows(N, W0, b0, (Us, Ss, Vs), (U, S, V, ranks), dense,
                                                         args.repeat, sync, g)
        print(f"{N:>6} {t_op * 1e3:>8.3f} {t_loop * 1e3:>8.3f} {t_dense * 1e3:>9.3f} {t_loop / t_op:>8.2f}"
              f" {t_dense / t_op:>9.2f} | {d_op * 1e3:>8.3f} {d_loop * 1e3:>9.3f} {d_loop / d_op:>8.2f}")

if __name__ == "__main__":
    main()

"""pytest-benchmark suite: one ViT-B/32 MLP key (3072×768), T tasks, each TSV-M route.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m pytest benchmarks/test_merge_speed.py --benchmark-only

Not part of `make test` (timings are not tests); `benchmarks/bench_merge.py` prints the
same comparison as a table with ratios. Compare rows only within one run.
"""

import pytest
import torch

import tsv_fast
from bench_merge import lowrank_topk, reference_tsv_m
from tsv_fast.synthetic import synthetic_task_vectors

KEY = "visual.transformer.resblocks.0.mlp.c_fc.weight"


@pytest.fixture(scope="module", params=[8, 20], ids=lambda T: f"T{T}")
def key_tasks(request):
    base = {KEY: torch.randn(3072, 768, generator=torch.Generator().manual_seed(0)) * 0.02}
    taus = synthetic_task_vectors(base, request.param, seed=1)
    return base, taus


def test_reference_authors_algorithm(benchmark, key_tasks):
    base, taus = key_tasks
    benchmark.pedantic(reference_tsv_m, args=(base, taus), rounds=2, iterations=1)


def test_svd_lowrank_loop(benchmark, key_tasks):
    base, taus = key_tasks
    benchmark.pedantic(reference_tsv_m, args=(base, taus, lowrank_topk), rounds=2, iterations=1)


@pytest.mark.parametrize("solver", ["exact", "eigh", "subspace", "svd", "randomized"])
def test_tsv_fast(benchmark, key_tasks, solver):
    base, taus = key_tasks
    tasks = [tsv_fast.TaskVector(t) for t in taus]
    benchmark.pedantic(tsv_fast.merge_layers, args=(base, tasks), kwargs={"solver": solver}, rounds=2, iterations=1)


def test_tsv_fast_newton_schulz_polar(benchmark, key_tasks):
    base, taus = key_tasks
    tasks = [tsv_fast.TaskVector(t) for t in taus]
    benchmark.pedantic(tsv_fast.merge_layers, args=(base, tasks), kwargs={"polar": "newton-schulz"}, rounds=2,
                       iterations=1)


def test_reconstruct_op(benchmark):
    g = torch.Generator().manual_seed(0)
    W0, U, S, V = torch.randn(3072, 768, generator=g), torch.randn(3072, 768, generator=g), torch.rand(768), torch.randn(768, 768)
    benchmark(tsv_fast.reconstruct, W0, U, S, V, 1.0)

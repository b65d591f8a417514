"""tsv_fast.memory.peak_tensor_bytes, and a merge's peak memory against the issue's bound
(≤ 2× one shape batch of stacked deltas), counted exactly on the CPU for the GPU route."""

import pytest
import torch

import tsv_fast
from tsv_fast import solvers
from tsv_fast.memory import peak_tensor_bytes
from tsv_fast.synthetic import clip_vit_base, synthetic_task_vectors
from tsv_fast.tsv import shape_batch_factors

MB = 1 << 20


def test_peak_counts_live_storages_exactly():
    before = torch.ones(MB)  # existed before: never counted

    def work():
        a = torch.empty(MB, dtype=torch.uint8)       # 1 MiB
        b = torch.empty(2 * MB, dtype=torch.uint8)   # 3 MiB alive
        del a                                        # 2
        c = torch.empty(4 * MB, dtype=torch.uint8)   # 6: the peak
        view = c[:10]                                # a view adds nothing
        c.add_(1)                                    # nor does an in-place op
        del b, c                                     # the view keeps c's storage: 4
        d = before * 2                               # 4 + 4 MiB of float32 = 8: the new peak
        return view, d

    peak, (view, d) = peak_tensor_bytes(work)
    assert peak == 8 * MB and view.numel() == 10 and d.shape == before.shape


def test_views_and_in_place_writes_of_earlier_tensors_are_not_counted_growth_is():
    big = torch.ones(MB)  # 4 MiB from before
    assert peak_tensor_bytes(lambda: big[:10].clone())[0] == 40  # the view is big's; the clone is new
    assert peak_tensor_bytes(lambda: big.add_(1))[0] == 0
    assert peak_tensor_bytes(lambda: torch.add(big, 1, out=torch.empty(0)))[0] == 4 * MB  # out= grows it

    def grow():
        x = torch.empty(0)
        x.resize_(MB)
        return x

    assert peak_tensor_bytes(grow)[0] == 4 * MB


def test_peak_of_freed_temporaries_in_a_loop_does_not_grow():
    def loop():
        for _ in range(50):
            x = torch.randn(256, 256, dtype=torch.float64)  # 0.5 MiB, freed next iteration
            y = x @ x
        return y

    peak, _ = peak_tensor_bytes(loop)
    assert 2 * 0.5 * MB <= peak <= 3 * 0.5 * MB  # x and y, plus the next x while y is alive


def _gpu_route_peak(monkeypatch, T: int, work_share: float = solvers.WORK_SHARE, cap: int | None = 48) -> float:
    """Peak beyond inputs and output ÷ the largest shape batch, for the exact solver's GPU route
    (subspace iteration with the ℓ cap, Newton–Schulz polar, shape batches) run on the CPU."""
    monkeypatch.setitem(solvers.EXACT_ROUTE, "cpu", "subspace")
    monkeypatch.setattr(solvers, "MAX_BLOCK", cap)
    monkeypatch.setattr(solvers, "WORK_SHARE", work_share)
    blocks = {k: v for k, v in clip_vit_base(256, 3, 32, 64).items() if ".resblocks." in k}
    tvs = [tsv_fast.TaskVector(t) for t in synthetic_task_vectors(blocks, T, seed=1)]
    peak, out = peak_tensor_bytes(lambda: tsv_fast.merge_layers(blocks, tvs, polar="newton-schulz", batch="shape"))
    largest = 3 * T * 4 * 1024 * 256  # three c_fc (or c_proj) keys of 1024×256 float32 per task
    return (peak - sum(t.numel() * t.element_size() for t in out.values())) / largest


@pytest.mark.parametrize("T,cap", [(2, 48), (3, 48), (4, 48), (8, None), (8, 48), (20, None)])
def test_merge_peak_within_two_shape_batches(monkeypatch, T, cap):
    """The issue's target, at its benchmark T (on an H200 the same count gave 1.76–1.88×) and at
    few tasks, where each key's float64 whitening outweighs its T stacked deltas and the keys go
    through in sub-batches (one batch at once: 4.4× at T = 2, 2.2× at T = 4)."""
    assert _gpu_route_peak(monkeypatch, T, cap=cap) <= 2.0


def test_sub_batches_split_evenly_within_the_budget():
    from tsv_fast.methods import _sub_batches
    keys = [f"k{i}" for i in range(12)]
    assert _sub_batches(keys, 10, None) == [slice(0, 12)]  # no budget known: all at once
    assert _sub_batches(keys, 10, 120) == [slice(0, 12)]
    assert _sub_batches(keys, 10, 119) == [slice(0, 6), slice(6, 12)]  # 11 fit: two runs of 6
    assert _sub_batches(keys, 10, 45) == [slice(0, 4), slice(4, 8), slice(8, 12)]
    assert _sub_batches(keys, 10, 5) == [slice(i, i + 1) for i in range(12)]  # one key at least
    assert [k for s in _sub_batches(keys[:7], 10, 25) for k in keys[:7][s]] == keys[:7]


def test_sub_batches_give_the_same_merge(monkeypatch):
    """Keys merged in sub-batches of one and all at once: the same weights."""
    import tsv_fast.methods as methods
    blocks = {k: v for k, v in clip_vit_base(128, 3, 32, 64).items() if ".resblocks." in k}
    tvs = [tsv_fast.TaskVector(t) for t in synthetic_task_vectors(blocks, 3, seed=2)]
    calls = []
    monkeypatch.setattr(methods, "shape_batch_factors",
                        lambda sources, keys, *a, **kw: calls.append(len(keys)) or shape_batch_factors(sources, keys, *a, **kw))
    monkeypatch.setattr(methods, "PEAK_SHARE", 1e9)  # every shape batch at once
    whole = tsv_fast.merge_layers(blocks, tvs, batch="shape")
    assert calls == [3, 3, 3, 3]
    calls.clear()
    monkeypatch.setattr(methods, "PEAK_SHARE", 1e-9)  # one key at a time
    split = tsv_fast.merge_layers(blocks, tvs, batch="shape")
    assert calls == [1] * 12
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=1e-5, atol=1e-6)


def test_work_share_bounds_the_solver_memory(monkeypatch):
    """Chunks sized by the working-set model: a smaller share, a lower peak (the result stays the
    same: tests/test_solvers.py)."""
    assert _gpu_route_peak(monkeypatch, 8, work_share=0.05) < _gpu_route_peak(monkeypatch, 8, work_share=0.75) - 0.05

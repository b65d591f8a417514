"""STI against the float64 reference, zero for orthogonal tasks, positive with overlap."""

import numpy as np
import torch

import reference as ref
import tsv_fast
from test_merge import orthogonal_tasks


def test_sti_matches_reference(small_base, small_tasks):
    report = tsv_fast.interference(small_base, small_tasks)
    T = len(small_tasks)
    assert report.tasks == ["task0", "task1", "task2", "task3"]
    for key, value in report.per_key.items():
        b = ref.np64(small_base[key])
        taus = [ref.np64(t[key]) - b for t in small_tasks]
        k = min(b.shape) // T
        assert np.isclose(value, ref.sti(taus, k), rtol=1e-3)
        pairs = report.per_pair[key]
        assert pairs.shape == (T, T) and torch.equal(pairs, pairs.T) and (pairs.diagonal() == 0).all()
        assert np.isclose(pairs[0, 2].item(), ref.sti([taus[0], taus[2]], k), rtol=1e-3)


def test_orthogonal_tasks_have_zero_sti_and_overlap_does_not():
    base, tasks = orthogonal_tasks(block=16)  # each task's rank = k = 64 // 4
    assert tsv_fast.interference(base, tasks).per_key["w"] < 1e-5
    overlapping = [{"w": tasks[0]["w"] + 0.5 * t["w"].roll(3, 0)} for t in tasks]
    assert tsv_fast.interference(base, overlapping).per_key["w"] > 1e-2


def test_by_block_groups_keys(small_base, small_tasks):
    report = tsv_fast.interference(small_base, small_tasks, names=list("abcd"))
    blocks = report.by_block()
    assert set(blocks) == {"visual.transformer.resblocks.0", "visual.transformer.resblocks.1",
                           "visual.positional_embedding", "visual.proj"}
    assert np.isclose(sum(blocks.values()), sum(report.per_key.values()))
    assert report.tasks == list("abcd")

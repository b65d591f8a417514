"""STI against the float64 reference, zero for orthogonal tasks, positive with overlap."""

import numpy as np
import pytest
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


def _sti_of_nonzero_directions(taus, k, dtype=torch.float32):
    """STI over each task's top-k triplets whose s is not zero to the inputs' precision (as TSV-M:
    s > max(1e-7, 4·eps·√max(m, n))·s1); the others' singular vectors are any null-space basis."""
    U, S, V = ref.nonzero_top_k(taus, k, torch.finfo(dtype).eps)
    eye = np.eye(U.shape[1])
    return float(np.abs((U.T @ U - eye) @ np.diag(S) @ (V.T @ V - eye)).sum())


@pytest.mark.parametrize("solver", ["exact", "subspace", "eigh", "svd"])
def test_rank_deficient_and_zero_tasks_add_no_interference_of_their_null_space(solver):
    """A task that left the key unchanged and a LoRA-style one of rank 2 < k: STI must not count
    the null-space vectors a solver returns for s = 0 (it did: 656 instead of 317 with a zero task,
    and another value per solver)."""
    gen = torch.Generator().manual_seed(5)
    m, n, T = 64, 48, 4
    base = {"w": torch.randn(m, n, generator=gen), "v": torch.randn(n, m, generator=gen)}
    taus = [torch.randn(m, n, generator=gen), torch.randn(m, n, generator=gen),
            torch.randn(m, 2, generator=gen) @ torch.randn(2, n, generator=gen), torch.zeros(m, n)]
    tasks = [{"w": base["w"] + t, "v": base["v"] + t.T} for t in taus]
    report = tsv_fast.interference(base, tasks, solver=solver)
    k = n // T
    deltas = [ref.np64(tk["w"] - base["w"]) for tk in tasks]
    want = _sti_of_nonzero_directions(deltas, k)
    assert np.isclose(report.per_key["w"], want, rtol=1e-4)
    assert np.isclose(report.per_key["v"], want, rtol=1e-4)  # the transposed key agrees
    assert np.isclose(report.per_pair["w"][0, 3].item(), 0, atol=1e-6)  # task 0 with the zero task
    assert np.isclose(report.per_pair["w"][0, 1].item(), ref.sti(deltas[:2], k), rtol=1e-4)
    assert np.isclose(report.per_pair["w"][1, 2].item(), _sti_of_nonzero_directions(deltas[1:3], k), rtol=1e-4)


def test_keys_with_fewer_dimensions_than_tasks_are_skipped_with_a_rank_warning():
    """A 3×40 key with T = 4 tasks has floor(3/4) = 0 directions per task: no STI for it, and
    a TSVRankWarning naming it (as compress and merge_layers warn), while the 40×40 key is measured.
    The warning points at the caller's line, not into torch.no_grad's wrapper (which the
    default warning filter would then show once per process, whoever calls)."""
    gen = torch.Generator().manual_seed(5)
    base = {"thin": torch.randn(3, 40, generator=gen), "w": torch.randn(40, 40, generator=gen)}
    tasks = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(4)]
    with pytest.warns(tsv_fast.TSVRankWarning, match=r"1 matrix key.*T = 4.*'thin'") as record:
        report = tsv_fast.interference(base, tasks)
    assert set(report.per_key) == {"w"}
    assert [w.filename for w in record if w.category is tsv_fast.TSVRankWarning] == [__file__]

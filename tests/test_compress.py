"""TSV-C: optimal rank-k factors, rank choices, rebuilding tasks, exact storage sizes."""

import math

import numpy as np
import pytest
import torch

import reference as ref
import tsv_fast
from tsv_fast.keys import is_matrix_key


def test_factors_are_the_optimal_rank_k_approximation(small_base, small_tasks):
    compressed = tsv_fast.compress(small_base, small_tasks)
    T = len(small_tasks)
    for task, ft in zip(compressed, small_tasks):
        for key, b in small_base.items():
            tau = ref.np64(ft[key]) - ref.np64(b)
            if is_matrix_key(key, b):
                U, S, V = task.factors[key]
                k = min(b.shape) // T
                assert U.shape == (b.shape[0], k) and S.shape == (k,) and V.shape == (b.shape[1], k)
                err = np.linalg.norm(tau - ref.np64((U * S) @ V.T))
                s = np.linalg.svd(tau, compute_uv=False)
                optimal = np.sqrt((s[k:] ** 2).sum())  # Eckart–Young
                assert err <= optimal * 1.001 + 1e-7
            else:
                np.testing.assert_allclose(ref.np64(task.deltas[key]), tau, atol=1e-6)


def test_apply_rebuilds_the_task(small_base, small_tasks):
    full = tsv_fast.compress(small_base, small_tasks, rank=1.0)  # full rank: lossless up to rounding
    rebuilt = full[1].apply(small_base)
    for key in small_base:
        torch.testing.assert_close(rebuilt[key], small_tasks[1][key], rtol=1e-4, atol=1e-5)
    default = tsv_fast.compress(small_base, small_tasks)[0].apply(small_base, alpha=0.5)
    key = "visual.transformer.resblocks.1.mlp.c_fc.weight"
    U, S, V = tsv_fast.compress(small_base, small_tasks)[0].factors[key]
    torch.testing.assert_close(default[key], small_base[key] + 0.5 * (U * S) @ V.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank,shape,expected", [
    (None, (192, 64), 16), (5, (192, 64), 5), (500, (192, 64), 64), (0.25, (192, 64), 16), (0.1, (17, 64), 1),
    (1.0, (64, 32), 32), (0.29, (100, 300), 29), (0.57, (200, 100), 57), (0.999, (100, 100), 99),
])
def test_rank_choices(rank, shape, expected):
    assert tsv_fast.resolve_rank(shape, rank, num_tasks=4) == expected


@pytest.mark.parametrize("bad", [-1, 0.0, 1.5, "8", True])
def test_bad_rank_is_refused(bad):
    with pytest.raises(tsv_fast.TSVInputError, match="rank"):
        tsv_fast.resolve_rank((10, 10), bad, 2)


def test_energy_rank_keeps_the_requested_energy(small_base, small_tasks):
    compressed = tsv_fast.compress(small_base, small_tasks, energy=0.9)
    key = "visual.transformer.resblocks.0.attn.in_proj_weight"
    for task, ft in zip(compressed, small_tasks):
        s = np.linalg.svd(ref.np64(ft[key]) - ref.np64(small_base[key]), compute_uv=False)
        cumulative = np.cumsum(s ** 2) / (s ** 2).sum()
        k = int(np.argmax(cumulative >= 0.9 - 1e-9)) + 1
        assert task.rank(key) == k


def test_nbytes_is_what_the_ranks_imply(small_base, small_tasks):
    task = tsv_fast.compress(small_base, small_tasks, factor_dtype=torch.bfloat16)[0]
    expected = 0
    for key, b in small_base.items():
        if is_matrix_key(key, b):
            k = min(b.shape) // len(small_tasks)
            expected += (sum(b.shape) + 1) * k * 2
        else:
            expected += b.numel() * 2
    assert task.nbytes() == expected
    assert all(t.dtype == torch.bfloat16 for f in task.factors.values() for t in f)


def test_zero_deltas_and_unselected_keys_are_not_stored(small_base, small_tasks):
    frozen = [{k: (small_base[k].clone() if "resblocks.1" in k else v) for k, v in t.items()} for t in small_tasks]
    compressed = tsv_fast.compress(small_base, frozen, exclude="*.proj")
    keys = set(compressed[0].factors) | set(compressed[0].deltas)
    assert not any("resblocks.1" in k for k in keys)
    assert "visual.proj" not in keys and "visual.transformer.resblocks.0.attn.in_proj_weight" in keys


def test_state_dict_round_trip(small_base, small_tasks, tmp_path):
    from safetensors.torch import load_file, save_file

    task = tsv_fast.compress(small_base, small_tasks)[2]
    save_file(task.to_state_dict(), tmp_path / "t.safetensors")
    back = tsv_fast.CompressedTask.from_state_dict(load_file(tmp_path / "t.safetensors"), name="t")
    assert back.nbytes() == task.nbytes()
    for key in small_base:
        a, b = task.apply(small_base)[key], back.apply(small_base)[key]
        assert torch.equal(a, b)


def test_rank_and_energy_together_are_refused(small_base, small_tasks):
    with pytest.raises(tsv_fast.TSVInputError, match="either rank or energy"):
        tsv_fast.compress(small_base, small_tasks, rank=3, energy=0.9)


def test_default_rank_uses_num_tasks(small_base, small_tasks):
    task = tsv_fast.compress(small_base, small_tasks[:1], num_tasks=8)[0]
    assert task.rank("visual.transformer.resblocks.0.mlp.c_fc.weight") == math.floor(64 / 8)


def test_scalar_keys_and_independent_storage(small_base, small_tasks):
    """0-d keys (open_clip's logit_scale) compress, and no task's tensors pin another task's memory."""
    base = {**small_base, "logit_scale": torch.tensor(2.5)}
    tasks = [{**t, "logit_scale": torch.tensor(2.5 + i)} for i, t in enumerate(small_tasks)]
    compressed = tsv_fast.compress(base, tasks)
    assert "logit_scale" not in compressed[0].deltas  # a zero delta is not stored
    assert [float(c.deltas["logit_scale"]) for c in compressed[1:]] == [1.0, 2.0, 3.0]
    for c in compressed:
        for t in [x for f in c.factors.values() for x in f] + list(c.deltas.values()):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


@pytest.mark.parametrize("shape", [(64, 64), (32, 48)])  # 64×64: the exact solver's subspace route
@pytest.mark.parametrize("kw", [dict(rank=0), dict(rank=0.01), dict(num_tasks=100)])
def test_rank_zero_keys_warn_and_store_nothing(shape, kw):
    gen = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(*shape, generator=gen), "b": torch.randn(shape[0], generator=gen)}
    tasks = [{k: v + 1e-2 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(2)]
    with pytest.warns(tsv_fast.TSVRankWarning, match="'w'"):
        stored = tsv_fast.compress(base, tasks, **kw)
    for task, ft in zip(stored, tasks):
        assert "w" not in task.factors and "b" in task.deltas  # the bias is still stored
        rebuilt = task.apply(base)
        torch.testing.assert_close(rebuilt["w"], base["w"], rtol=0, atol=0)  # rank 0: the base
        torch.testing.assert_close(rebuilt["b"], ft["b"])


@pytest.mark.parametrize("key", ["w", "b"])
def test_factors_or_deltas_that_overflow_the_factor_dtype_are_refused(key):
    """Finite float16 inputs whose singular value (4·30000) or delta (2·60000) passes 65504: an
    error naming the task and key, never Inf stored (the README's "never written as Inf")."""
    base = {"w": torch.zeros(4, 4, dtype=torch.float16), "b": torch.full((3,), -60000.0, dtype=torch.float16)}
    small = {"w": torch.full((4, 4), 0.5, dtype=torch.float16), "b": torch.zeros(3, dtype=torch.float16)}
    big = {"w": torch.full((4, 4), 30000.0, dtype=torch.float16), "b": torch.full((3,), 60000.0, dtype=torch.float16)}
    tasks = [small, {**small, key: big[key]}]
    with pytest.raises(tsv_fast.TSVInputError, match=rf"task 'task1': key '{key}': its (factors|delta) overflow"):
        tsv_fast.compress(base, tasks, rank=1)
    wide = tsv_fast.compress(base, tasks, rank=1, factor_dtype=torch.float32)[1]
    assert all(torch.isfinite(t).all() for t in (*wide.factors["w"], *wide.deltas.values()))


@pytest.mark.parametrize("option", [{"rank": -1}, {"rank": "8"}, {"energy": "0.9"}, {"energy": True}])
def test_bad_rank_or_energy_is_refused_before_any_work(option):
    """Checked up front, not only when a matrix key is reached (a bias-only selection took rank=-1
    silently), and as a TSVInputError (energy="0.9" was a TypeError, energy=True meant 1.0)."""
    base = {"w": torch.randn(6, 4), "b": torch.randn(6)}
    tasks = [{k: v + 0.1 for k, v in base.items()} for _ in range(2)]
    with pytest.raises(tsv_fast.TSVInputError, match="rank|energy"):
        tsv_fast.compress(base, tasks, include="b", **option)

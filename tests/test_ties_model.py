"""TIES with the paper's whole-model trimming (``trim="model"``) against a float64 reference
written from the definition: each task's deltas flattened over every merged key, one magnitude
threshold per task, sign elected by mass, disjoint mean of the agreeing entries, scaled by λ."""

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import tsv_fast
from tsv_fast import cli
from tsv_fast.keys import select_keys
from tsv_fast.methods import KeyContext, get_method, kth_smallest, ties_model_thresholds
from tsv_fast.tasks import CompressedTask, TaskVector, as_sources

# Varied sizes and kinds: matrices, a 4-D conv, vectors, a scalar; deltas of each key at its own scale
# (heavy-tailed, Student-t with 3 degrees of freedom), so one threshold over the model trims the keys
# very differently from a threshold per key.
SHAPES = {"embed.weight": (96, 40), "blocks.0.attn.weight": (48, 48), "blocks.0.attn.bias": (48,),
          "blocks.0.ln.weight": (48,), "conv.weight": (8, 3, 4, 4), "logit_scale": (),
          "blocks.1.mlp.weight": (160, 48), "blocks.1.mlp.bias": (160,)}
SCALES = {"embed.weight": 1e-3, "blocks.0.attn.weight": 2e-2, "blocks.0.attn.bias": 5e-2, "blocks.0.ln.weight": 1e-2,
          "conv.weight": 3e-3, "logit_scale": 1e-1, "blocks.1.mlp.weight": 8e-2, "blocks.1.mlp.bias": 4e-3}
BUFFER = "position_ids"


def make_inputs(T: int, seed: int, dtype=torch.float32):
    """(base, task vectors): a base with an integer buffer, T task vectors in ``dtype``."""
    rng = np.random.default_rng(seed)
    base = {k: torch.as_tensor(rng.standard_normal(s)).to(dtype) for k, s in SHAPES.items()}
    base[BUFFER] = torch.arange(17)[None]
    taus = [TaskVector({k: torch.as_tensor(SCALES[k] * rng.standard_t(3, size=s)).to(dtype) for k, s in SHAPES.items()},
                       name=f"t{i}") for i in range(T)]
    return base, taus


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def reference(base, taus, density: float, alpha: float, keys=None, per_key: bool = False,
              counted=None) -> dict[str, np.ndarray]:
    """Float64 TIES of task vectors on ``keys`` (default: every floating key; absent deltas are 0).
    The threshold of each task is its keep-th largest |τ| over the ``counted`` keys (default: ``keys``)
    flattened together, or over each key alone with ``per_key``."""
    keys = [k for k in base if base[k].is_floating_point()] if keys is None else keys
    counted = keys if counted is None else counted
    deltas = [{k: np64(tau[k]) if k in tau else np.zeros(base[k].shape) for k in {*keys, *counted}} for tau in taus]

    def cut(values: np.ndarray) -> float:
        keep = max(1, int(round(density * values.size)))
        return np.sort(np.abs(values))[::-1][keep - 1]

    out = {}
    for key in keys:
        trimmed = []
        for d in deltas:
            whole = np.concatenate([d[k].ravel() for k in counted])
            threshold = cut(d[key].ravel()) if per_key else cut(whole)
            trimmed.append(np.where(np.abs(d[key]) >= threshold, d[key], 0.0))
        stack = np.stack(trimmed)
        elected = np.sign(stack.sum(0))
        agree = (np.sign(stack) == elected) & (stack != 0)
        merged = (stack * agree).sum(0) / np.maximum(agree.sum(0), 1)
        out[key] = np64(base[key]) + alpha * merged
    return out


def assert_matches(merged, expected):
    for key, value in expected.items():
        np.testing.assert_allclose(np64(merged[key]), value, rtol=2e-6, atol=1e-6, err_msg=key)


def differs(merged, expected) -> bool:
    return any(not np.allclose(np64(merged[k]), v, rtol=2e-6, atol=1e-6) for k, v in expected.items())


@pytest.mark.parametrize("T, density", [(2, 0.1), (2, 0.35), (5, 0.2), (5, 0.6)])
def test_model_trim_matches_the_definition(T, density):
    base, taus = make_inputs(T, seed=10 + T)
    merged = tsv_fast.merge_layers(base, taus, method="ties", density=density, trim="model", alpha=0.7)
    expected = reference(base, taus, density, 0.7)
    assert_matches(merged, expected)
    assert merged[BUFFER] is base[BUFFER]
    assert differs(merged, reference(base, taus, density, 0.7, per_key=True))  # the two trims do differ here


def test_key_trim_is_the_default_and_unchanged():
    base, taus = make_inputs(4, seed=3)
    default = tsv_fast.merge_layers(base, taus, method="ties", density=0.3, alpha=0.9)
    per_key = tsv_fast.merge_layers(base, taus, method="ties", density=0.3, alpha=0.9, trim="key")
    assert all(torch.equal(default[k], per_key[k]) for k in base)
    assert_matches(per_key, reference(base, taus, 0.3, 0.9, per_key=True))


def test_density_one_trims_nothing():
    base, taus = make_inputs(3, seed=4)
    model = tsv_fast.merge_layers(base, taus, method="ties", density=1.0, trim="model")
    key = tsv_fast.merge_layers(base, taus, method="ties", density=1.0)
    assert all(torch.equal(model[k], key[k]) for k in base)
    assert_matches(model, reference(base, taus, 1.0, 1.0))


@pytest.mark.parametrize("selection", [{"exclude": "blocks.1.*"}, {"include": ["blocks.*", "logit_scale"]}])
def test_include_exclude_choose_the_counted_keys(selection):
    """Only the merged keys count: leaving out the keys with the largest deltas lowers every
    task's threshold, so the other keys keep more entries than a whole-model count gives them."""
    base, taus = make_inputs(3, seed=5)
    merged = tsv_fast.merge_layers(base, taus, method="ties", density=0.2, trim="model", **selection)
    keys = sorted(select_keys(base, selection.get("include"), selection.get("exclude")) - {BUFFER})
    assert_matches(merged, reference(base, taus, 0.2, 1.0, keys=keys))
    all_keys = [k for k in base if k != BUFFER]
    assert differs(merged, reference(base, taus, 0.2, 1.0, keys=keys, counted=all_keys))
    assert all(merged[k] is base[k] for k in base if k not in keys)


def test_keys_absent_from_a_task_vector_count_as_zeros():
    base, taus = make_inputs(3, seed=6)
    for key in ("blocks.1.mlp.weight", "conv.weight"):
        del taus[0][key]
    merged = tsv_fast.merge_layers(base, taus, method="ties", density=0.25, trim="model")
    assert_matches(merged, reference(base, taus, 0.25, 1.0))  # the reference fills them with zeros
    # counted as zeros, not left out: task 0's threshold over its present keys alone is another one
    present = [k for k in base if k in taus[0]]
    thresholds = _thresholds(base, taus, 0.25)
    assert thresholds[0] < _cut(taus[0], present, 0.25)


def _cut(tau, keys, density: float) -> torch.Tensor:
    """The keep-th largest |τ| of ``keys`` concatenated: one ``kthvalue`` (in τ's dtype)."""
    values = torch.cat([tau[k].reshape(-1).abs() for k in keys])
    keep = max(1, int(round(density * values.numel())))
    return values.kthvalue(values.numel() - keep + 1).values


def _thresholds(base, tasks, density: float) -> torch.Tensor:
    spec = get_method("ties")
    ctx = KeyContext(alpha=1.0, options={**spec.options, "density": density, "trim": "model"})
    keys = [k for k in base if base[k].is_floating_point()]
    ties_model_thresholds(base, keys, as_sources(base, tasks), ctx)
    return ctx.ties_thresholds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_thresholds_are_one_kthvalue_over_the_concatenation(dtype):
    """Each task's threshold is exactly ``kthvalue`` of its concatenated |τ| in the compute dtype
    (float32; float64 for a float64 model), for fine-tuned weights, a task vector in another
    16-bit dtype with an absent key, and a compressed task (factors on the matrix keys)."""
    base, taus = make_inputs(3, seed=7, dtype=dtype)
    finetuned = {k: base[k] + taus[0][k] if k in taus[0] else base[k] for k in base}
    vector = TaskVector({k: v.to(torch.float16) for k, v in taus[1].items() if k != "embed.weight"}, name="tv")
    compressed = tsv_fast.compress(base, [TaskVector(taus[2], name="c")], rank=5)[0]
    assert isinstance(compressed, CompressedTask) and compressed.factors
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    keys = [k for k in base if k != BUFFER]
    zero = {k: torch.zeros(base[k].shape, dtype=compute) for k in keys}
    dense = [{k: finetuned[k].to(compute) - base[k].to(compute) for k in keys},
             {k: vector[k].to(compute) if k in vector else zero[k] for k in keys},
             {k: compressed.delta(k).to(compute) if compressed.delta(k) is not None else zero[k] for k in keys}]
    for density in (0.05, 0.3, 0.77):
        expected = torch.stack([_cut(d, keys, density) for d in dense])
        got = _thresholds(base, [finetuned, vector, compressed], density)
        assert got.dtype == compute and torch.equal(got, expected), density


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kth_smallest_is_kthvalue(dtype):
    """The radix select against ``kthvalue`` on heavy tails, repeated values, zeros and subnormals,
    with chunks smaller than the vector."""
    rng = np.random.default_rng(8)
    values = torch.as_tensor(np.abs(rng.standard_t(2, size=5003))).to(dtype)
    values[::7] = values[3]
    values[::11] = 0
    values[5::13] = torch.finfo(dtype).tiny / 4  # subnormal
    values[6::17] = torch.finfo(dtype).max
    for k in (1, 2, 700, 2501, 4000, 5002, 5003):
        assert torch.equal(kth_smallest(values, k, chunk=999), values.kthvalue(k).values), k
    assert kth_smallest(torch.zeros(4, dtype=dtype), 2) == 0


def test_nonfinite_deltas_fail_before_the_first_key():
    base, taus = make_inputs(2, seed=9)
    last = "blocks.1.mlp.bias"
    finetuned = [{k: base[k] + tau[k] if k in tau else base[k] for k in base} for tau in taus]
    finetuned[1][last] = finetuned[1][last].clone()
    finetuned[1][last][3] = float("nan")
    with pytest.raises(tsv_fast.TSVInputError, match=f"task 't1'.*{last}.*NaN"):
        next(tsv_fast.iter_merge(base, finetuned, method="ties", trim="model", names=["t0", "t1"]))
    big = torch.finfo(torch.float32).max
    base = {**base, last: torch.full_like(base[last], big)}
    finetuned = [{**f, last: torch.full_like(base[last], -big) if i else base[last]} for i, f in enumerate(finetuned)]
    with pytest.raises(tsv_fast.TSVInputError, match=f"task 'task1': key '{last}': its delta from the base overflows"):
        next(tsv_fast.iter_merge(base, finetuned, method="ties", trim="model"))


@pytest.mark.parametrize("trim", ["paper", "Model", "", None, 1, ["model"]])
def test_bad_trim_values_are_refused_before_any_key(trim):
    base, taus = make_inputs(2, seed=1)
    with pytest.raises(tsv_fast.TSVInputError, match=r"ties: trim must be one of \('key', 'model'\)"):
        tsv_fast.iter_merge(base, taus, method="ties", trim=trim)
    with pytest.raises(tsv_fast.TSVInputError, match=r"has no option\(s\) \['trim'\]"):
        tsv_fast.merge_layers(base, taus, method="tsv", trim="model")


@pytest.fixture
def on_disk(tmp_path, monkeypatch):
    """base.safetensors and three fine-tuned float32 checkpoints in the working directory."""
    base, taus = make_inputs(3, seed=2)
    finetuned = [{k: base[k] + tau[k] if k in tau else base[k].clone() for k in base} for tau in taus]
    save_file(base, tmp_path / "base.safetensors")
    for i, f in enumerate(finetuned):
        save_file(f, tmp_path / f"t{i}.safetensors")
    monkeypatch.chdir(tmp_path)
    return base, finetuned


FILES = ["base.safetensors", "t0.safetensors", "t1.safetensors", "t2.safetensors"]


def test_cli_trim_model_gives_the_python_api_tensors(on_disk, tmp_path):
    base, finetuned = on_disk
    assert cli.main(["merge", *FILES, "-o", "m.safetensors", "--method", "ties", "--trim", "model",
                     "--density", "0.3", "--alpha", "0.8", "-q"]) == 0
    expected = tsv_fast.merge_layers(base, finetuned, method="ties", trim="model", density=0.3, alpha=0.8)
    out = load_file("m.safetensors")
    assert set(out) == set(base) and all(torch.equal(out[k], expected[k]) for k in base)
    assert json.loads((tmp_path / "m.safetensors.json").read_text())["options"] == {"density": 0.3, "trim": "model"}
    key_trim = tsv_fast.merge_layers(base, finetuned, method="ties", density=0.3, alpha=0.8)
    assert not all(torch.equal(out[k], key_trim[k]) for k in base)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"base": FILES[0], "tasks": FILES[1:], "output": "y.safetensors",
                                                       "method": "ties", "trim": "model", "density": 0.3,
                                                       "alpha": 0.8}))
    assert cli.main(["merge", "job.yaml", "-q"]) == 0
    assert all(torch.equal(t, out[k]) for k, t in load_file("y.safetensors").items())


@pytest.mark.parametrize("argv, problem", [
    (["--method", "ties", "--trim", "paper"], "ties: trim must be one of ('key', 'model')"),
    (["--method", "mean", "--trim", "model"], "has no option(s) ['trim']")])
def test_cli_refuses_bad_trim(on_disk, tmp_path, capsys, argv, problem):
    assert cli.main(["merge", *FILES, "-o", "m.safetensors", *argv]) == 2
    assert problem in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_dry_run_counts_the_trim_pass(on_disk, tmp_path, capsys):
    base, _ = on_disk
    floats = sum(t.numel() for t in base.values() if t.is_floating_point())
    assert cli.main(["merge", *FILES, "-o", "m.safetensors", "--method", "ties", "--dry-run"]) == 0
    assert "first pass over each task" not in capsys.readouterr().out
    assert cli.main(["merge", *FILES, "-o", "m.safetensors", "--method", "ties", "--trim", "model", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"holds that task's |τ| of every merged key, ≈ {cli.human_size(4 * floats)}" in out
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_help_explains_trim(capsys):
    assert cli.main(["merge", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--trim TRIM where that fraction is taken: key (default" in help_text

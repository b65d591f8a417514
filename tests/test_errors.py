"""Bad input fails with a TSVInputError that names the task, the key and the problem."""

import pytest
import torch

import tsv_fast


@pytest.fixture
def base():
    return {"a.weight": torch.randn(6, 4), "a.bias": torch.randn(6), "ids": torch.arange(3)}


def finetuned(base, **changes):
    state = {k: v + 0.1 if v.is_floating_point() else v for k, v in base.items()}
    state.update(changes)
    return {k: v for k, v in state.items() if v is not None}


def test_no_tasks(base):
    with pytest.raises(tsv_fast.TSVInputError, match="no tasks"):
        tsv_fast.merge_layers(base, [])


def test_single_mapping_instead_of_list(base):
    with pytest.raises(tsv_fast.TSVInputError, match="sequence"):
        tsv_fast.merge_layers(base, finetuned(base))


def test_missing_key_is_named(base):
    with pytest.raises(tsv_fast.TSVInputError, match=r"task 'task1'.*missing.*'a.bias'"):
        tsv_fast.merge_layers(base, [finetuned(base), finetuned(base, **{"a.bias": None})])


def test_extra_key_is_named(base):
    with pytest.raises(tsv_fast.TSVInputError, match=r"task 'x'.*not in the base.*'b.weight'"):
        tsv_fast.merge_layers(base, [finetuned(base, **{"b.weight": torch.ones(2)})], names=["x"])


def test_shape_mismatch_is_named(base):
    with pytest.raises(tsv_fast.TSVInputError, match=r"key 'a.weight' has shape \(4, 6\), base has \(6, 4\)"):
        tsv_fast.merge_layers(base, [finetuned(base, **{"a.weight": torch.randn(4, 6)})])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_task(base, bad):
    w = base["a.weight"].clone()
    w[2, 1] = bad
    with pytest.raises(tsv_fast.TSVInputError, match=r"key 'a.weight' contains NaN or Inf"):
        tsv_fast.merge_layers(base, [finetuned(base), finetuned(base, **{"a.weight": w})])


@pytest.mark.parametrize("batch", ["key", "shape"])
def test_a_delta_that_overflows_is_named(base, batch):
    """Finite weights whose difference from the base is not (float32 overflow): the check of the
    stacked deltas finds it and names the task and key (several keys at once: the test below)."""
    base["b.weight"] = torch.randn(6, 4)
    base["b.weight"][0, 0] = -3e38
    w = base["b.weight"].clone()
    w[0, 0] = 3e38
    with pytest.raises(tsv_fast.TSVInputError, match=r"task 'task1': key 'b.weight': its delta from the base overflows"):
        tsv_fast.merge_layers(base, [finetuned(base), finetuned(base, **{"b.weight": w})], batch=batch)


@pytest.mark.parametrize("method", ["task_arithmetic", "mean", "tsv"])
@pytest.mark.parametrize("key,batch", [("a.weight", "key"), ("a.bias", "key"), ("a.bias", "shape")])
def test_merged_weights_that_overflow_are_refused(base, method, key, batch):
    """Every input finite, but deltas of 3.4e38 each sum past float32: an error naming the key, not
    Inf (a bias alone, or in a run of non-matrix keys merged at once)."""
    base["b.bias"] = torch.randn(6)
    base[key].view(-1)[0] = 0.0
    w = base[key].clone()
    w.view(-1)[0] = 3.4e38
    tasks = [finetuned(base, **{key: w}) for _ in range(2)]
    with pytest.raises(tsv_fast.TSVInputError, match=rf"key '{key}'.*not finite"):
        tsv_fast.merge_layers(base, tasks, method=method, alpha=1.0 if method == "mean" else 2.0, batch=batch)


def test_nan_in_base(base):
    base["a.bias"][0] = float("nan")
    with pytest.raises(tsv_fast.TSVInputError, match=r"base: key 'a.bias'"):
        tsv_fast.merge_layers(base, [finetuned(base)])


def test_integer_tensor_where_float_expected(base):
    with pytest.raises(tsv_fast.TSVInputError, match=r"key 'a.bias' has dtype torch.int64"):
        tsv_fast.merge_layers(base, [finetuned(base, **{"a.bias": torch.ones(6, dtype=torch.int64)})])


def test_non_tensor_value(base):
    with pytest.raises(tsv_fast.TSVInputError, match=r"key 'a.bias' is a list"):
        tsv_fast.merge_layers(base, [finetuned(base, **{"a.bias": [1.0] * 6})])


def test_unknown_method_option_and_solver(base):
    tasks = [finetuned(base)]
    with pytest.raises(tsv_fast.TSVInputError, match="unknown merge method 'tsvm'"):
        tsv_fast.merge_layers(base, tasks, method="tsvm")
    with pytest.raises(tsv_fast.TSVInputError, match="has no option"):
        tsv_fast.merge_layers(base, tasks, method="tsv", density=0.3)
    with pytest.raises(tsv_fast.TSVInputError, match="unknown solver"):
        tsv_fast.merge_layers(base, tasks, solver="magic")
    with pytest.raises(tsv_fast.TSVInputError, match="density"):
        tsv_fast.merge_layers(base, tasks, method="ties", density=0)


def test_selection_matching_nothing(base):
    with pytest.raises(tsv_fast.TSVInputError, match="select no floating key to merge"):
        tsv_fast.merge_layers(base, [finetuned(base)], include="text.*")
    # compress and interference too (they returned empty results without a word)
    with pytest.raises(tsv_fast.TSVInputError, match="include='visaul.*' .* select no floating key to compress"):
        tsv_fast.compress(base, [finetuned(base)], include="visaul.*")
    with pytest.raises(tsv_fast.TSVInputError, match="select no floating key to measure"):
        tsv_fast.interference(base, [finetuned(base), finetuned(base)], exclude="*")
    bias = next(k for k, v in base.items() if v.ndim == 1 and v.is_floating_point())
    with pytest.raises(tsv_fast.TSVInputError, match="select no matrix key: STI measures only matrix keys"):
        tsv_fast.interference(base, [finetuned(base), finetuned(base)], include=bias)


@pytest.mark.parametrize("num_tasks", [0, -2, 2.5, True, "8"])
def test_compress_refuses_a_bad_num_tasks(base, num_tasks):
    """num_tasks=-2 stored rank-0 factors without a warning (svd) or crashed, 0 meant len(tasks)."""
    with pytest.raises(tsv_fast.TSVInputError, match=r"num_tasks must be an int >= 1"):
        tsv_fast.compress(base, [finetuned(base)], num_tasks=num_tasks, solver="svd")


def test_numpy_integers_are_integers(base, tmp_path):
    """np.int64 task counts worked before num_tasks was checked; np.float64 ranks reopen a store."""
    import numpy as np

    one = tsv_fast.compress(base, [finetuned(base)], num_tasks=np.int64(2))[0]
    assert one.factors == {} or all(S.shape[0] == min(base[k].shape) // 2 for k, (_, S, _) in one.factors.items())
    tsv_fast.TaskStore(tmp_path / "s", base=base, default_rank=np.float64(0.5), num_tasks=np.int64(4))
    tsv_fast.TaskStore(tmp_path / "s", default_rank=np.float64(0.5), num_tasks=np.int64(4))  # the same values
    with pytest.raises(tsv_fast.TSVInputError, match="default_rank"):
        tsv_fast.TaskStore(tmp_path / "s", default_rank=np.int64(1))  # k = 1 is not a fraction of r
    for bad in ({"num_tasks": True}, {"default_rank": True}, {"default_rank": 7.5}):  # refused as at creation
        with pytest.raises(tsv_fast.TSVInputError, match="must be"):
            tsv_fast.TaskStore(tmp_path / "s", **bad)
    store = tsv_fast.TaskStore(tmp_path / "k", base=base, default_rank=np.int64(3))  # a plain 3 in the manifest
    assert type(store.default_rank) is int and tsv_fast.TaskStore(tmp_path / "k", default_rank=3).default_rank == 3
    factors = tsv_fast.compress(base, [finetuned(base)], rank=np.int64(2))[0].factors
    assert factors and {S.shape[0] for _, S, _ in factors.values()} == {2}


@pytest.mark.parametrize("factor_dtype", [torch.int32, torch.bool, "float16"])
def test_compress_refuses_a_non_floating_factor_dtype(base, factor_dtype):
    """int32 factors rounded every factor to 0: a task of zero delta, without a word."""
    with pytest.raises(tsv_fast.TSVInputError, match="factor_dtype must be a floating torch.dtype"):
        tsv_fast.compress(base, [finetuned(base)], factor_dtype=factor_dtype)


def test_a_single_state_dict_for_the_task_list_is_named_as_such(base):
    """task_vectors(base, ft) iterated ft's key strings: "expected a state dict ..., got str"."""
    for call in (tsv_fast.task_vectors, tsv_fast.merge_layers, tsv_fast.compress):
        with pytest.raises(tsv_fast.TSVInputError, match=r"not a single mapping \(wrap it in a list\)"):
            call(base, finetuned(base))
    assert len(tsv_fast.task_vectors(base, (finetuned(base) for _ in range(2)))) == 2  # any iterable of them


def test_wrong_names_length(base):
    with pytest.raises(tsv_fast.TSVInputError, match="2 names for 1 tasks"):
        tsv_fast.merge_layers(base, [finetuned(base)], names=["a", "b"])


def test_compressed_factors_that_do_not_fit(base):
    bad = tsv_fast.CompressedTask("c", factors={"a.weight": (torch.randn(5, 2), torch.ones(2), torch.randn(4, 2))})
    with pytest.raises(tsv_fast.TSVInputError, match=r"task 'c': key 'a.weight': factors"):
        tsv_fast.merge_layers(base, [bad])


def test_compressed_state_dict_with_missing_factor():
    with pytest.raises(tsv_fast.TSVInputError, match=r"'w' lacks factor\(s\) \['V'\]"):
        tsv_fast.CompressedTask.from_state_dict({"w::U": torch.ones(2, 1), "w::S": torch.ones(1)})


def test_inputs_are_not_modified(base):
    """Fine-tuned dicts, task vectors and compressed tasks, key by key and in shape batches."""
    base["b.weight"] = torch.randn(6, 4)  # a second key of a.weight's shape: a shape batch
    base["b.bias"] = torch.randn(6)  # a second non-matrix key: they merge at once in shape batches
    tasks = [finetuned(base), finetuned(base)]
    vectors = tsv_fast.task_vectors(base, tasks)
    compressed = tsv_fast.compress(base, tasks[:1])
    inputs = [base, *tasks, *vectors]
    before = [{k: v.clone() for k, v in t.items()} for t in inputs]
    factors = {k: [f.clone() for f in fs] for k, fs in compressed[0].factors.items()}
    for method in tsv_fast.METHODS:
        for batch in ("key", "shape"):
            for these in (tasks, vectors, [compressed[0], tasks[1]]):
                tsv_fast.merge_layers(base, these, method=method, batch=batch)
    for saved, live in zip(before, inputs):
        assert all(torch.equal(saved[k], live[k]) for k in saved)
    assert all(torch.equal(a, b) for k, fs in factors.items() for a, b in zip(fs, compressed[0].factors[k]))


@pytest.mark.parametrize("method", ["tsv", "ties", "mean"])
def test_parameters_that_require_grad_are_read_as_values(method):
    """``dict(model.named_parameters())`` as inputs: merged and compressed as their values."""
    base = {"a.weight": torch.randn(8, 6), "a.bias": torch.randn(8)}
    tasks = [finetuned(base) for _ in range(3)]
    params = [{k: torch.nn.Parameter(v.clone()) for k, v in t.items()} for t in [base, *tasks]]
    merged = tsv_fast.merge_layers(params[0], params[1:], method=method)
    want = tsv_fast.merge_layers(base, tasks, method=method)
    assert all(torch.equal(merged[k], want[k]) and not merged[k].requires_grad for k in want)
    got, plain = tsv_fast.compress(params[0], params[1:]), tsv_fast.compress(base, tasks)
    assert all(torch.equal(a, b) for g, p in zip(got, plain) for k in p.factors for a, b in zip(g.factors[k], p.factors[k]))
    tsv_fast.interference(params[0], params[1:])


@pytest.mark.parametrize("method", ["tsv", "task_arithmetic", "ties", "mean"])
@pytest.mark.parametrize("key", ["a.weight", "a.bias", "b.weight", "b.bias"])
def test_nan_in_a_task_is_named_on_every_key_kind(method, key):
    """Matrix keys of a shape batch, a lone matrix key, mean-merged biases (alone, or as one run in
    shape batches): each screens NaN/Inf with one check per key or batch and names the task and key."""
    base = {"a.weight": torch.randn(8, 6), "a.bias": torch.randn(8), "b.weight": torch.randn(8, 6),
            "b.bias": torch.randn(8)}
    bad = finetuned(base)
    bad[key] = bad[key].clone()
    bad[key].view(-1)[3] = float("nan")
    tasks = [finetuned(base), bad, finetuned(base)]
    for batch in ("key", "shape"):
        with pytest.raises(tsv_fast.TSVInputError, match=rf"task 'task1': key '{key}' contains NaN or Inf"):
            tsv_fast.merge_layers(base, tasks, method=method, batch=batch)


def test_nan_in_the_base_of_a_shape_batch_is_named():
    base = {"a.weight": torch.randn(8, 6), "b.weight": torch.randn(8, 6)}
    tasks = [finetuned(base), finetuned(base)]
    base["b.weight"][2, 2] = float("inf")
    with pytest.raises(tsv_fast.TSVInputError, match=r"base: key 'b.weight' contains NaN or Inf"):
        tsv_fast.merge_layers(base, tasks, batch="shape")


def test_nonfinite_finds_nan_and_inf_but_no_finite_tensor():
    from tsv_fast.tasks import nonfinite

    ok = torch.randn(5, 7)
    nan, inf = ok.clone(), ok.clone()
    nan[4, 6], inf[0, 0] = float("nan"), float("-inf")
    big = torch.full((4,), 1e308, dtype=torch.float64)  # finite, though its sum overflows float64
    assert nonfinite([ok, big, torch.arange(3)]) == []
    assert nonfinite([torch.arange(3), nan, ok, big, inf]) == [1, 4]  # indices into the list given
    assert nonfinite([]) == []
    half = torch.full((8,), 60000.0, dtype=torch.float16)  # finite; its float16 sum overflows
    assert nonfinite([half, ok.bfloat16()]) == [] and nonfinite([half, nan.half()]) == [1]
    assert nonfinite([torch.empty(0), inf.double(), torch.tensor(float("nan")), ok.T]) == [1, 2]  # mixed dtypes
    # finite, but their 2-norms (accumulated in float32 for bfloat16) overflow: the ∞-norm decides
    huge = [torch.full((3, 3), 1e20), torch.full((6,), 1e38, dtype=torch.bfloat16),
            torch.full((2,), 1e200, dtype=torch.float64)]
    assert nonfinite(huge) == []
    huge_nan = [t.clone() for t in huge]
    huge_nan[1][-1] = float("inf")
    assert nonfinite([*huge, *huge_nan, ok]) == [4]


def test_a_task_sum_that_overflows_is_not_mistaken_for_nan():
    """float64 deltas whose sum overflows although every element is finite: stacked without error."""
    from tsv_fast.tasks import as_sources, stack_deltas

    base = {"w": torch.zeros(3, 4, dtype=torch.float64)}
    task = {"w": torch.full((3, 4), 1e308, dtype=torch.float64)}
    stacked = stack_deltas(as_sources(base, [task, task]), "w", base["w"])
    assert torch.equal(stacked, torch.full((2, 3, 4), 1e308, dtype=torch.float64))


@pytest.mark.parametrize("problem", ["nan", "overflow"])
def test_a_bad_delta_in_a_shape_batch_names_its_task_and_key(problem, monkeypatch):
    """A shape batch's stacked deltas are checked at once (key-major, one host sync): the error
    still names the key and task at fault, not the batch's first ones."""
    from tsv_fast import tsv
    seen = []
    check = tsv.check_stacked
    monkeypatch.setattr(tsv, "check_stacked", lambda sources, keys, *a: seen.append(len(keys)) or check(sources, keys, *a))
    base = {f"l{i}.weight": torch.randn(64, 8) for i in range(3)}
    if problem == "overflow":
        base["l2.weight"][3, 1] = -3e38
    tasks = [finetuned(base) for _ in range(8)]
    tasks[5]["l2.weight"][3, 1] = float("nan") if problem == "nan" else 3e38
    match = " contains NaN or Inf" if problem == "nan" else ": its delta from the base overflows"
    with pytest.raises(tsv_fast.TSVInputError, match=rf"task 'task5': key 'l2.weight'{match}"):
        tsv_fast.merge_layers(base, tasks, batch="shape")
    assert seen == [3]  # one check, for the three keys


def test_nan_in_several_elementwise_keys_names_the_first_key_as_key_by_key():
    """Two bad biases in one run of elementwise keys: the error names the first key in the base's
    order (and its first bad task), as merging one key at a time does, not the first bad task."""
    base = {"a.bias": torch.randn(8), "b.bias": torch.randn(8), "c.bias": torch.randn(8)}
    tasks = [finetuned(base) for _ in range(3)]
    tasks[2]["a.bias"][1] = float("nan")
    tasks[0]["b.bias"][4] = float("inf")
    for batch in ("key", "shape"):
        with pytest.raises(tsv_fast.TSVInputError, match=r"task 'task2': key 'a.bias' contains NaN or Inf"):
            tsv_fast.merge_layers(base, tasks, method="mean", batch=batch)


def test_task_vectors_refuse_a_delta_that_overflows_its_dtype():
    """Finite bfloat16 weights 3e38 and -3e38 apart by 6e38, past float32's range: named, never Inf.
    float16 weights 60000 and -60000 apart (past float16's range) are kept: deltas are float32."""
    base = {"a.weight": torch.full((3, 2), -3e38, dtype=torch.bfloat16), "a.bias": torch.zeros(3)}
    ok = {"a.weight": torch.zeros(3, 2, dtype=torch.bfloat16), "a.bias": torch.ones(3)}
    bad = {**ok, "a.weight": torch.full((3, 2), 3e38, dtype=torch.bfloat16)}
    with pytest.raises(tsv_fast.TSVInputError, match=r"task 'task1': key 'a.weight': its delta from the base overflows"):
        tsv_fast.task_vectors(base, [ok, bad])
    half = {"a.weight": torch.full((3, 2), -60000.0, dtype=torch.float16), "a.bias": torch.zeros(3)}
    (tv,) = tsv_fast.task_vectors(half, [{**ok, "a.weight": torch.full((3, 2), 60000.0, dtype=torch.float16)}])
    assert tv["a.weight"].dtype == torch.float32 and (tv["a.weight"] == 120000).all()


def test_task_vectors_of_parameters_that_require_grad_hold_no_graph():
    """``dict(model.named_parameters())``: the deltas are values (no grad_fn holding both models)."""
    base = {"a.weight": torch.randn(8, 6), "a.bias": torch.randn(8)}
    params = [{k: torch.nn.Parameter(v.clone()) for k, v in t.items()} for t in [base, finetuned(base)]]
    (tv,) = tsv_fast.task_vectors(params[0], params[1:])
    assert all(not d.requires_grad and d.grad_fn is None for d in tv.values())
    assert all(torch.allclose(tv[k], params[1][k].detach() - base[k]) for k in base)


def test_task_vectors_of_compressed_tasks_or_sparse_task_vectors(base):
    """A CompressedTask was a bare TypeError ('NoneType' object is not subscriptable); a TaskVector
    without some key (zero) a KeyError."""
    compressed = tsv_fast.compress(base, [finetuned(base)], names=["c"])[0]
    with pytest.raises(tsv_fast.TSVInputError, match=r"task 'c': task_vectors takes fine-tuned state dicts"):
        tsv_fast.task_vectors(base, [finetuned(base), compressed])
    sparse = tsv_fast.TaskVector({"a.weight": torch.ones(6, 4)}, name="s")
    (tv,) = tsv_fast.task_vectors(base, [sparse])
    assert tv.name == "s" and list(tv) == ["a.weight"] and torch.equal(tv["a.weight"], sparse["a.weight"])


@pytest.mark.parametrize("out_dtype", [torch.uint8, torch.int32, torch.bool, torch.complex64, "float16"])
def test_merge_refuses_a_non_floating_out_dtype(base, out_dtype):
    """uint8 merged weights wrapped modulo 256, bool ones became 0/1, without a word; refused
    before any work, by iter_merge too, as compress refuses such a factor_dtype."""
    with pytest.raises(tsv_fast.TSVInputError, match="out_dtype must be a floating torch.dtype"):
        tsv_fast.merge_layers(base, [finetuned(base)], out_dtype=out_dtype)
    with pytest.raises(tsv_fast.TSVInputError, match="out_dtype must be a floating torch.dtype"):
        tsv_fast.iter_merge(base, [finetuned(base)], out_dtype=out_dtype)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), "0.5", True, None])
def test_merge_refuses_an_alpha_that_is_not_a_finite_number(base, alpha):
    """α = NaN made every merged weight NaN, then blamed on the tasks' deltas ("overflow")."""
    if alpha is None:  # None takes the method's default
        tsv_fast.merge_layers(base, [finetuned(base)], alpha=alpha)
        return
    with pytest.raises(tsv_fast.TSVInputError, match="alpha must be a finite number"):
        tsv_fast.merge_layers(base, [finetuned(base)], method="mean", alpha=alpha)


@pytest.mark.parametrize("where,call", [(w, c) for w in ("base", "task", "compressed")
                                         for c in ("merge", "compress", "task_vectors")
                                         if (w, c) != ("compressed", "task_vectors")])  # takes none
def test_meta_tensors_are_refused_naming_the_key(base, where, call):
    """A model built on the meta device (shapes, no data) failed as a bare RuntimeError of the
    NaN check ("cannot be called on meta tensors") or a NotImplementedError of a copy."""
    meta = {k: v.to("meta") for k, v in base.items()}
    if where == "base":
        args, owner = (meta, [finetuned(base)]), "base"
    elif where == "task":
        args, owner = (base, [finetuned(base), finetuned(meta)]), "task 'task1'"
    else:
        c = tsv_fast.compress(base, [finetuned(base)])[0]
        c.factors = {k: tuple(t.to("meta") for t in f) for k, f in c.factors.items()}
        args, owner = (base, [c]), "task 'task0'"
    fn = {"merge": tsv_fast.merge_layers, "compress": tsv_fast.compress, "task_vectors": tsv_fast.task_vectors}[call]
    with pytest.raises(tsv_fast.TSVInputError, match=rf"{owner}: key 'a\.weight.*' is on the meta device: "
                                                     r"meta tensors have no data"):
        fn(*args)

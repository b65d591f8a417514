"""MultiTaskModel against the materialised reference model (open_clip with the task's
weights loaded, run with ``encode_image``), the segmented op against float64, exports."""

import copy
import json

import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import load_file

import tsv_fast
from tsv_fast import TSVInputError, compress
from tsv_fast.peft_export import export_peft
from tsv_fast.runtime import MultiTaskModel, OpenCLIPVisionAdapter, merge_compressed
from tsv_fast.runtime_ops import group_rows, segmented_lowrank_apply
from tsv_fast.store import TaskStore
from tsv_fast.synthetic import synthetic_task_vectors

TOL = 1e-4  # max relative error, float32


def tiny_clip(seed=0, **vision):
    torch.manual_seed(seed)
    cfg = dict(layers=2, width=64, patch_size=16, image_size=64, head_width=32)
    cfg.update(vision)
    return CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(**cfg),
                text_cfg=CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=2, layers=1)).eval()


def finetune(model, n, seed=1):
    """Fine-tuned state dicts: synthetic deltas on every floating image-tower key; text tower frozen."""
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    visual = {k: v for k, v in base.items() if k.startswith("visual.")}
    return base, [{k: v + tau[k] if k in tau else v.clone() for k, v in base.items()}
                  for tau in synthetic_task_vectors(visual, n, seed=seed, scale=0.2)]


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_clip()
    base, fts = finetune(model, 3)
    store = TaskStore(tmp_path_factory.mktemp("rt") / "store", base=base)
    for i, ft in enumerate(fts):
        store.add(f"t{i}", ft, rank=[None, 0.25, 3][i])  # different ranks per task
    mt = MultiTaskModel(model, store, calibration_batches=(1, 4))
    return mt, store, base, torch.randn(6, 3, 64, 64)


@pytest.fixture(scope="module")
def reference(setup):
    """encode_image of a separate open_clip model with the task's full weights loaded."""
    mt, _, _, _ = setup
    ref = tiny_clip(seed=5)

    def run(task_id, images):
        ref.load_state_dict(mt.state_dict_for(task_id))
        with torch.no_grad():
            return ref.encode_image(images)
    return run


def test_segmented_lowrank_apply_matches_float64():
    gen = torch.Generator().manual_seed(0)
    N, n, m = 11, 7, 5
    x = torch.randn(N, n, generator=gen)
    offsets = [0, 4, 4, 9, 11]  # one empty segment
    ranks = [2, 3, None, 1]
    U = [None if k is None else torch.randn(m, k, generator=gen) for k in ranks]
    S = [None if k is None else torch.rand(k, generator=gen) for k in ranks]
    V = [None if k is None else torch.randn(n, k, generator=gen) for k in ranks]
    y0 = torch.randn(N, m, generator=gen)
    out = segmented_lowrank_apply(x, offsets, U, S, V, out=y0.clone())
    expect = y0.double().clone()
    for i in range(4):
        if U[i] is not None:
            delta = U[i].double() @ torch.diag(S[i].double()) @ V[i].double().T  # m×n, dense
            expect[offsets[i]:offsets[i + 1]] += x[offsets[i]:offsets[i + 1]].double() @ delta.T
    torch.testing.assert_close(out.double(), expect, rtol=0, atol=1e-5)
    bf = segmented_lowrank_apply(x, offsets, [u if u is None else u.bfloat16() for u in U],
                                 [s if s is None else s.bfloat16() for s in S],
                                 [v if v is None else v.bfloat16() for v in V])
    assert bf.dtype == torch.float32 and bf.shape == (N, m)
    with pytest.raises(TSVInputError, match="offsets"):
        segmented_lowrank_apply(x, [0, 5, 3, 9, 11], U, S, V)
    with pytest.raises(TSVInputError, match="do not fit"):
        segmented_lowrank_apply(torch.randn(N, n + 1), offsets, U, S, V)


def test_group_rows():
    order, offsets, tasks = group_rows(["b", "a", "b", None, "a"])
    assert tasks == ["b", "a", None] and offsets == [0, 2, 4, 5]
    assert order.tolist() == [0, 2, 1, 4, 3]


@pytest.mark.parametrize("strategy", ["lowrank", "materialise", "auto"])
def test_select_matches_materialised_model(setup, reference, strategy):
    mt, _, _, x = setup
    mt.strategy = strategy
    try:
        for name in [None, "t0", "t1", "t2"]:
            mt.select(name)
            assert rel(mt(x), reference(name, x)) <= TOL, (name, strategy)
            if name is not None and strategy != "auto":
                assert mt.last_strategy == strategy
            torch.testing.assert_close(mt(x, normalize=True), torch.nn.functional.normalize(reference(name, x), dim=-1),
                                       rtol=0, atol=TOL)
    finally:
        mt.strategy = "auto"
        mt.select(None)


def test_auto_strategy_is_measured(setup):
    mt, _, _, x = setup
    mt.strategy = "auto"
    mt.select("t0")
    mt(x[:1])
    table = next(iter(mt.calibration.values()))
    assert set(table) == {1, 4} and all(set(t) == {"lowrank", "materialise"} for t in table.values())
    t1 = table[1]
    assert mt.last_strategy == min(t1, key=t1.get)
    assert mt.crossover("t0") in (None, 1, 4)
    with pytest.raises(TSVInputError, match="strategy"):
        mt.strategy = "guess"
    sizes = mt.calibration_batches
    try:
        mt.calibration_batches = (2,)  # the old sizes' timings must not decide for the new ones
        assert not mt.calibration
        mt(x[:1])
        assert set(next(iter(mt.calibration.values()))) == {2}
    finally:
        mt.calibration_batches = sizes
    mt.select(None)


def test_mixed_batch_matches_per_row_reference(setup, reference):
    mt, _, _, x = setup
    merged = mt.merge(["t0", "t2"])
    ids = ["t2", "t0", None, merged, "t0", "t1"]
    out = mt(x, task_ids=ids)
    for i, t in enumerate(ids):
        assert rel(out[i], reference(t, x)[i]) <= TOL, (i, t)
    # one task for every row equals select()
    same = mt(x, task_ids=["t1"] * 6)
    assert rel(same, reference("t1", x)) <= TOL
    with pytest.raises(TSVInputError, match="unknown task 'nope'"):
        mt(x, task_ids=["t0"] * 5 + ["nope"])
    with pytest.raises(TSVInputError, match="entries"):
        mt(x, task_ids=["t0"])


def test_merge_from_store_matches_merge_layers(setup, reference):
    mt, store, base, x = setup
    loaded = [store.load(n) for n in ["t0", "t1", "t2"]]
    for names, alpha in [(["t0", "t1", "t2"], 1.0), (["t1", "t2"], 0.7)]:
        mid = mt.merge(names, alpha)
        assert mt.merge(names, alpha) == mid  # cached
        dense = tsv_fast.merge_layers(base, [loaded[int(n[1])] for n in names], alpha=alpha)
        ours = mt.state_dict_for(mid)
        for k, t in dense.items():
            if t.is_floating_point():
                assert (ours[k] - t).abs().max() <= 1e-5 * max(t.abs().max(), 1e-6), k
        ref = tiny_clip(seed=3)
        ref.load_state_dict(dense)
        with torch.no_grad():
            expect = ref.encode_image(x)
        mt.select(mid)
        for s in ("lowrank", "materialise"):
            mt.strategy = s
            assert rel(mt(x), expect) <= TOL
    mt.strategy = "auto"
    mt.select(None)


def test_merge_compressed_equals_dense_merge_for_subsets(setup):
    _, store, base, _ = setup
    tasks = [store.load("t0"), store.load("t2")]
    merged = merge_compressed(base, tasks, 1.0)
    dense = tsv_fast.merge_layers(base, tasks)
    rebuilt = merged.apply(base)
    for k, t in dense.items():
        if t.is_floating_point():
            torch.testing.assert_close(rebuilt[k], t, rtol=0, atol=1e-5)


def test_negative_alpha_merge_is_an_svd_and_merges_again(setup):
    """α < 0 goes into U's sign, so S stays ≥ 0 (SVD form), and merging that merge again keeps
    it (a negative S used to count as null directions and be dropped)."""
    _, store, base, _ = setup
    tasks = [store.load("t0"), store.load("t1")]
    neg, pos = merge_compressed(base, tasks, -0.5), merge_compressed(base, tasks, 0.5)
    for key, (U, S, V) in neg.factors.items():
        assert bool((S >= 0).all())
        Up, Sp, Vp = pos.factors[key]
        torch.testing.assert_close((U * S) @ V.T, -(Up * Sp) @ Vp.T, rtol=0, atol=1e-6)
    other = store.load("t2")
    again = merge_compressed(base, [neg, other], 1.0).apply(base)
    flipped = tsv_fast.CompressedTask("neg", {k: (-U, -S, V) for k, (U, S, V) in neg.factors.items()}, neg.deltas)
    want = merge_compressed(base, [flipped, other], 1.0).apply(base)  # S < 0: the same delta
    for k, t in want.items():
        if t.is_floating_point():
            torch.testing.assert_close(again[k], t, rtol=0, atol=1e-5)


def test_bfloat16_store_and_variants(tmp_path):
    """bf16 factors; LayerScale, avg pooling, LN after pooling, output tokens."""
    model = tiny_clip(seed=2, ls_init_value=0.5, pool_type="avg", final_ln_after_pool=True, output_tokens=True)
    base, fts = finetune(model, 2, seed=4)
    store = TaskStore(tmp_path / "s", base=base, dtype="bfloat16")
    for i, ft in enumerate(fts):
        store.add(f"t{i}", ft)
    assert any(k.endswith("ls_1.gamma") for k in store.load("t0").deltas)
    mt = MultiTaskModel(model, store, strategy="lowrank")
    ref = tiny_clip(seed=9, ls_init_value=0.5, pool_type="avg", final_ln_after_pool=True, output_tokens=True)
    x = torch.randn(3, 3, 64, 64)
    ids = ["t1", "t0", "t1"]
    pooled, tokens = mt(x, task_ids=ids)
    for i, t in enumerate(ids):
        ref.load_state_dict(mt.state_dict_for(t))
        with torch.no_grad():
            p_ref, tok_ref = ref.encode_image(x)
        assert rel(pooled[i], p_ref[i]) <= TOL and rel(tokens[i], tok_ref[i]) <= TOL
        mt.strategy = "materialise"
        mt.select(t)
        assert rel(mt(x)[0], p_ref) <= TOL
        mt.strategy = "lowrank"


def _storage_bytes(*tasks) -> int:
    """Bytes of the distinct storages behind the tasks' tensors (a shared table counts once)."""
    storages = {}
    for task in tasks:
        for t in [t for f in task.factors.values() for t in f] + list(task.deltas.values()):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def test_resident_bytes_are_the_stored_bytes(setup):
    mt, store, base, _ = setup
    stored = sum(store.nbytes(n) for n in store.names())
    merged = sum(mt.task(n).nbytes() for n in mt.names() if n not in store.names())
    assert mt.nbytes() == stored + merged
    mt(setup[3], task_ids=["t0", "t1", "t2", "t0", "t1", "t2"])  # mixed batch: factor tables are packed
    assert _storage_bytes(*[mt.task(n) for n in mt.names()]) == mt.nbytes()  # nothing else pinned
    task_storages = {t.untyped_storage().data_ptr() for n in mt.names() for f in mt.task(n).factors.values()
                     for t in f}
    assert mt._packed and all(entry[1].untyped_storage().data_ptr() in task_storages  # the table is the copy
                              for entry in mt._packed.values())
    # tasks straight from compress() are slices of one batched solver output: compacted on load
    _, fts = finetune(mt.model, 3, seed=6)
    tasks = compress(base, fts, exclude="logit_scale")
    fresh = MultiTaskModel(mt.model, tasks)
    assert _storage_bytes(*[fresh.task(n) for n in fresh.names()]) == fresh.nbytes() == sum(t.nbytes() for t in tasks)


def test_refuses_other_base_and_unsupported_models(setup, tmp_path):
    _, store, _, _ = setup
    with pytest.raises(TSVInputError, match="different base"):
        MultiTaskModel(tiny_clip(seed=7), store)
    with pytest.raises(TSVInputError, match="attentional pooling"):
        MultiTaskModel(tiny_clip(attentional_pool=True), [])
    with pytest.raises(TSVInputError, match="no adapter"):
        MultiTaskModel(torch.nn.Linear(2, 2), [])
    with pytest.raises(TSVInputError, match="unknown task"):
        MultiTaskModel(tiny_clip(), []).select("t0")


def test_export_state_dict_and_safetensors(setup, reference, tmp_path):
    mt, _, _, x = setup
    path = mt.export("t1", tmp_path / "t1.safetensors")
    state = load_file(path)
    ref = tiny_clip(seed=11)
    ref.load_state_dict(state)
    with torch.no_grad():
        assert rel(ref.encode_image(x), reference("t1", x)) == 0.0
    assert set(state) == set(mt.model.state_dict())


def test_export_peft_adapter(setup, tmp_path):
    mt, store, base, _ = setup
    # ranks differ between keys (energy-based), so lower ranks are zero-padded up to r
    _, fts = finetune(mt.model, 1, seed=8)
    ct = compress(base, fts, energy=0.6, exclude="logit_scale")[0]  # 0-d keys: see report
    with pytest.warns(UserWarning, match="cannot be held by a PEFT LoRA.*attention out_proj"):
        report = export_peft(ct, tmp_path / "lora", mt.model)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == report.rank
    # nn.Linear weights under their module, attention in_proj under the attention module (PEFT's names)
    exported = {k: k.removesuffix(".weight").removesuffix(".in_proj_weight") for k in ct.factors
                if k.endswith(("in_proj_weight", "c_fc.weight", "c_proj.weight"))}
    assert sorted(config["target_modules"]) == sorted(exported.values())
    assert all(k in report.skipped_keys for k in ct.factors if k.endswith("out_proj.weight"))
    assert len({ct.rank(k) for k in exported}) > 1  # padding exercised
    weights = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    attn = [m for m in exported.values() if m.endswith(".attn")]
    assert len(weights) == 2 * (len(exported) + len(attn))
    for m in attn:  # PEFT wraps out_proj with the attention module: a zero LoRA there
        assert not weights[f"base_model.model.{m}.base_layer.out_proj.lora_B.weight"].any()
    for key, m in exported.items():
        A = weights[f"base_model.model.{m}.lora_A.weight"].double()
        B = weights[f"base_model.model.{m}.lora_B.weight"].double()
        assert A.shape == (report.rank, base[key].shape[1]) and B.shape == (base[key].shape[0], report.rank)
        U, S, V = (t.double() for t in ct.factors[key])
        scaling = config["lora_alpha"] / config["r"]
        torch.testing.assert_close(scaling * B @ A, U @ torch.diag(S) @ V.T, rtol=0, atol=1e-6)
    # through the runtime, for a stored task
    with pytest.warns(UserWarning, match="cannot be held by a PEFT LoRA"):
        out = mt.export_peft("t0", tmp_path / "lora_t0")
    assert out.rank == max(r for k, r in store.ranks("t0").items() if k not in out.skipped_keys)
    with pytest.raises(TSVInputError, match="not empty"):
        mt.export_peft("t0", tmp_path / "lora_t0")


def test_export_peft_keeps_float64_factors_exact(tmp_path):
    """float64 factors went through float32 for B = U diag(S): 4.6e-8 off instead of rounding."""
    gen = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40)).double()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    task = {"0.weight": base["0.weight"] + torch.randn(40, 24, generator=gen, dtype=torch.float64),
            "0.bias": base["0.bias"]}
    ct = compress(base, [task], rank=6)[0]
    export_peft(ct, tmp_path / "lora", model)
    weights = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    A, B = weights["base_model.model.0.lora_A.weight"], weights["base_model.model.0.lora_B.weight"]
    assert A.dtype == B.dtype == torch.float64
    U, S, V = ct.factors["0.weight"]
    torch.testing.assert_close(B @ A, U @ torch.diag(S) @ V.T, rtol=0, atol=1e-13)


def test_export_peft_failure_leaves_no_half_adapter(tmp_path, monkeypatch):
    """The weights were moved in before the config was written: a failure there left a folder with
    weights and no config, or (overwriting) new weights beside the old adapter's config."""
    model = torch.nn.Sequential(torch.nn.Linear(24, 40))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cts = [compress(base, [{**base, "0.weight": base["0.weight"] + torch.randn(40, 24)}], rank=k)[0] for k in (3, 5)]
    write_text = type(tmp_path).write_text

    def full_disk(self, *args, **kwargs):
        if "adapter_config.json" in self.name:
            raise OSError(28, "No space left on device", str(self))
        return write_text(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(type(tmp_path), "write_text", full_disk)
        with pytest.raises(Exception, match="No space left"):
            export_peft(cts[0], tmp_path / "new" / "lora", model)
    assert list(tmp_path.iterdir()) == []  # nothing written, the folders it made removed
    export_peft(cts[0], tmp_path / "lora", model)
    before = {p.name: p.read_bytes() for p in (tmp_path / "lora").iterdir()}
    with monkeypatch.context() as m:
        m.setattr(type(tmp_path), "write_text", full_disk)
        with pytest.raises(Exception, match="No space left"):
            export_peft(cts[1], tmp_path / "lora", model, overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "lora").iterdir()} == before  # the old adapter, whole
    export_peft(cts[1], tmp_path / "lora", model, overwrite=True)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 5


def test_export_peft_to_a_file_is_refused_naming_it(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(24, 40))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ct = compress(base, [{**base, "0.weight": base["0.weight"] + torch.randn(40, 24)}], rank=3)[0]
    (tmp_path / "file").write_text("mine")
    for overwrite in (False, True):  # was a bare NotADirectoryError
        with pytest.raises(TSVInputError, match="file: exists and is not a folder"):
            export_peft(ct, tmp_path / "file", model, overwrite=overwrite)
    assert (tmp_path / "file").read_text() == "mine"


def test_peft_loads_the_exported_adapter(setup, tmp_path):
    """PEFT itself reads the adapter and reproduces the task on every exported weight, unmerged and
    merged. The attention out_proj was exported as a Linear LoRA, which PEFT ignores unmerged
    (nn.MultiheadAttention never calls out_proj.forward): the served model was off by 4e-2; and
    in_proj_weight was not exported at all."""
    peft = pytest.importorskip("peft")
    mt, store, base, x = setup
    task = store.load("t1")
    with pytest.warns(UserWarning, match="cannot be held by a PEFT LoRA"):
        report = export_peft(task, tmp_path / "lora", mt.model)
    exported = [k for k in task.factors if k not in report.skipped_keys]
    assert any(k.endswith("attn.in_proj_weight") for k in exported)
    want = {k: base[k].double() + task.delta(k).double() if k in exported else base[k].double() for k in base}
    reference = tiny_clip(seed=5)
    reference.load_state_dict({k: v.float() for k, v in want.items()})
    model = tiny_clip(seed=3)
    model.load_state_dict(base)
    wrapped = peft.PeftModel.from_pretrained(model, tmp_path / "lora")
    c_fc = report.target_modules[[m.endswith("c_fc") for m in report.target_modules].index(True)]
    assert "lora_A" in dict(wrapped.named_modules())[f"base_model.model.{c_fc}"]._modules  # LoRA wrapped it
    with torch.no_grad():  # unmerged: how a LoRA server runs it
        torch.testing.assert_close(wrapped.base_model.model.encode_image(x),
                                   reference.encode_image(x), rtol=0, atol=1e-5)
    merged = wrapped.merge_and_unload().state_dict()
    assert set(merged) == set(base)
    for key in base:
        if key in exported:
            torch.testing.assert_close(merged[key].double(), want[key], rtol=0, atol=1e-5)
        else:
            assert torch.equal(merged[key], base[key]), key


@pytest.mark.parametrize("imported", [True, False], ids=["imported", "installed"])
def test_export_peft_refuses_attention_loras_for_a_peft_too_old_to_load_them(tmp_path, monkeypatch, imported):
    """PEFT before 0.15.0 has no nn.MultiheadAttention LoRA: its from_pretrained refused the adapter
    ("Target module MultiheadAttention(...) is not supported") long after the export succeeded."""
    import importlib.metadata
    import sys
    import types

    model = tiny_clip()
    base, fts = finetune(model, 1)
    ct = compress(base, fts, rank=3)[0]

    real, version = importlib.metadata.version, None

    def installed(name):
        if name != "peft":
            return real(name)
        if version is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return version

    def pretend(v):  # None: no peft at all
        nonlocal version
        version = v
        if imported and v is not None:
            monkeypatch.setitem(sys.modules, "peft", types.SimpleNamespace(__version__=v))
        else:
            monkeypatch.delitem(sys.modules, "peft", raising=False)
            monkeypatch.setattr(importlib.metadata, "version", installed)

    pretend("0.14.0")
    with pytest.raises(ImportError, match=r"peft 0\.14\.0 is installed.*'visual\.transformer\.resblocks\.0\.attn'"
                                          r".*from version 0\.15\.0 on.*pip install 'peft>=0\.15\.0'"):
        export_peft(ct, tmp_path / "lora", model)
    assert not (tmp_path / "lora").exists()  # nothing written
    linear = torch.nn.Sequential(torch.nn.Linear(24, 40))  # no attention LoRA: nothing to check
    lbase = {k: v.detach().clone() for k, v in linear.state_dict().items()}
    lct = compress(lbase, [{**lbase, "0.weight": lbase["0.weight"] + torch.randn(40, 24)}], rank=3)[0]
    export_peft(lct, tmp_path / "linear", linear)
    for i, v in enumerate(["0.15.0", None]):  # new enough, or none here (the adapter may be served elsewhere)
        pretend(v)
        with pytest.warns(UserWarning, match="cannot be held by a PEFT LoRA"):
            export_peft(ct, tmp_path / f"lora{i}", model)


def test_export_peft_refuses_another_models_shapes(tmp_path):
    """An adapter for a model of another width was written, and failed only when PEFT loaded it."""
    model = tiny_clip()
    base, fts = finetune(model, 1)
    ct = compress(base, fts, rank=3)[0]
    with pytest.raises(TSVInputError, match=r"key 'visual\.transformer\.resblocks\.0\..*not the task's base"):
        export_peft(ct, tmp_path / "lora", tiny_clip(width=96, head_width=32))
    assert not (tmp_path / "lora").exists()


# -- float64 references, independent of the code under test -----------------------------------

def tsv_m64(deltas, alpha=1.0):
    """TSV-M of dense float64 deltas of one matrix key: top floor(r/T) SVD of each without its
    zero singular values (a zero delta adds nothing), concatenated, polar factor of each side
    by an SVD, ``α U⊥ diag(S) V⊥ᵀ``."""
    k = min(deltas[0].shape) // len(deltas)
    parts = [torch.linalg.svd(d, full_matrices=False) for d in deltas]
    keep = [(s[:k] > 1e-9 * s[0]).nonzero().flatten() for _, s, _ in parts]
    U = torch.cat([P[:, i] for (P, _, _), i in zip(parts, keep)], 1)
    S = torch.cat([s[i] for (_, s, _), i in zip(parts, keep)])
    V = torch.cat([Qh[i].T for (_, _, Qh), i in zip(parts, keep)], 1)

    def polar(X):
        P, _, Qh = torch.linalg.svd(X, full_matrices=False)
        return P @ Qh
    return alpha * (polar(U) * S) @ polar(V).T


def deltas64(task, base):
    """A CompressedTask's deltas as dense float64 tensors (``U diag(S) Vᵀ`` for matrix keys)."""
    out = {k: (U.double() * S.double()) @ V.double().T for k, (U, S, V) in task.factors.items()}
    out.update({k: d.double() for k, d in task.deltas.items()})
    return out


def merge64(base, task_deltas, alpha=1.0):
    """TSV-M of float64 delta dicts: tsv_m64 on matrix keys, the mean on the others."""
    out = {}
    for key, b in base.items():
        present = [d[key] for d in task_deltas if key in d]
        if not present:
            continue
        if b.dim() == 2 and "text_projection" not in key:
            out[key] = tsv_m64([d.get(key, torch.zeros_like(b, dtype=torch.float64)) for d in task_deltas], alpha)
        else:
            out[key] = sum(present) * (alpha / len(task_deltas))
    return out


def test_merge_of_a_merge_is_the_tsv_m_of_the_merged_model():
    """A merge is stored in SVD form, so merging it again truncates it to its top singular
    triplets: the same as TSV-M of the merged model's full weights."""
    model = tiny_clip(seed=12)
    base, fts = finetune(model, 4, seed=13)
    tasks = compress(base, fts, rank=1.0, names=["a", "b", "c", "d"])  # full rank: τ exactly
    mt = MultiTaskModel(model, tasks, strategy="lowrank")
    abc = mt.merge(["a", "b", "c"])
    stored = mt.task(abc)
    for key, (U, S, V) in stored.factors.items():
        assert torch.all(S[:-1] >= S[1:]), key  # sorted: truncation keeps the top triplets
        eye = torch.eye(S.shape[0], dtype=torch.float64)
        torch.testing.assert_close(U.double().T @ U.double(), eye, rtol=0, atol=1e-5)
        torch.testing.assert_close(V.double().T @ V.double(), eye, rtol=0, atol=1e-5)
    tau = {t.name: deltas64(t, base) for t in tasks}
    delta_abc = merge64(base, [tau["a"], tau["b"], tau["c"]])
    want = merge64(base, [delta_abc, tau["d"]], alpha=0.8)
    got = mt.state_dict_for(mt.merge([abc, "d"], 0.8))
    _check_merge(base, got, want)
    # a task without a delta on most keys: its zero columns are dropped from the merge
    part = compress(base, fts[1:2], rank=1.0, names=["c_fc only"], include="*mlp.c_fc.weight")[0]
    mt = MultiTaskModel(model, [tasks[0], part], strategy="lowrank")
    stored = mt.task(mt.merge(["a", "c_fc only"]))
    U, S, V = stored.factors["visual.transformer.resblocks.0.attn.out_proj.weight"]  # 64×64: k = 32
    assert S.shape == (32,) and torch.all(S[:-1] >= S[1:]) and torch.all(S > 0)
    assert stored.rank("visual.transformer.resblocks.0.mlp.c_fc.weight") == 64
    _check_merge(base, mt.state_dict_for(stored.name), merge64(base, [tau["a"], deltas64(part, base)]))


def _check_merge(base, got, want):
    for key, b in base.items():
        d = got[key].double() - b.double()
        if key in want:
            assert (d - want[key]).norm() <= 1e-4 * want[key].norm(), key
        else:
            assert d.abs().max() == 0, key


def encode64(model, base, task, images):
    """Independent float64 reference: ``θ0 + U diag(S) Vᵀ`` (+ deltas) loaded into a float64
    copy of the model, then ``encode_image``."""
    ref = copy.deepcopy(model).cpu().double()
    state = {k: v.double() if v.is_floating_point() else v for k, v in base.items()}
    if task is not None:
        for k, d in deltas64(task, base).items():
            state[k] = state[k] + d.cpu()
    ref.load_state_dict(state)
    with torch.no_grad():
        return ref.encode_image(images.cpu().double())


@pytest.mark.parametrize("convert", [lambda m: m.double(), lambda m: m.to(torch.float64)], ids=["double", "to"])
def test_module_conversion_converts_base_and_tasks(convert):
    model = tiny_clip(seed=14)
    base, fts = finetune(model, 2, seed=15)
    tasks = compress(base, fts, names=["a", "b"])
    x = torch.randn(3, 3, 64, 64)
    mt = MultiTaskModel(model, tasks, calibration_batches=(1, 2))
    mt.select("a")(x)  # calibrated and, below, packed in float32 before the conversion
    ids = ["b", None, "a"]
    mt(x, task_ids=ids)
    ref_model = tiny_clip(seed=14)
    assert convert(mt) is mt
    out = mt(x.double(), task_ids=ids)
    assert not mt.calibration  # timed in float32: redone on the next auto forward
    assert out.dtype == torch.float64 and mt.nbytes() == 2 * sum(t.nbytes() for t in tasks)
    by_name = {"a": tasks[0], "b": tasks[1], None: None}
    for i, t in enumerate(ids):
        assert rel(out[i], encode64(ref_model, base, by_name[t], x)[i]) <= 1e-10, t
    assert rel(mt.select("b")(x.double()), encode64(ref_model, base, tasks[1], x)) <= 1e-10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_cuda_moves_base_and_tasks():
    model = tiny_clip(seed=14)
    base, fts = finetune(model, 2, seed=15)
    tasks = compress(base, fts, names=["a", "b"])
    mt = MultiTaskModel(model, tasks, strategy="lowrank").cuda()
    x = torch.randn(2, 3, 64, 64)
    out = mt(x.cuda(), task_ids=["b", "a"])
    ref_model = tiny_clip(seed=14)
    for i, task in enumerate([tasks[1], tasks[0]]):
        assert rel(out[i].cpu().double(), encode64(ref_model, base, task, x)[i]) <= TOL


def test_tasks_of_another_factor_dtype_are_not_copied_into_the_table():
    """bfloat16 and float32 tasks of one rank: the table holds one dtype, so only the most
    common (rank, dtype) shares it and nothing is stored twice."""
    model = tiny_clip(seed=16)
    base, fts = finetune(model, 3, seed=17)
    tasks = compress(base, fts[:2], names=["a", "b"], num_tasks=3, factor_dtype=torch.bfloat16)
    tasks += compress(base, fts[2:], names=["c"], num_tasks=3)  # float32, same ranks
    mt = MultiTaskModel(model, tasks, strategy="lowrank")
    assert mt.nbytes() == sum(t.nbytes() for t in tasks)
    x = torch.randn(4, 3, 64, 64)
    ids = ["c", "a", "b", "c"]
    out = mt(x, task_ids=ids)
    assert mt._packed  # resident: the tasks' tensors and the packed tables
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [t for n in mt.names() for f in mt.task(n).factors.values() for t in f]
                + [t for n in mt.names() for t in mt.task(n).deltas.values()]
                + [t for entry in mt._packed.values() for t in entry[1:4]]}
    assert sum(storages.values()) == mt.nbytes() == sum(t.nbytes() for t in tasks)
    ref_model = tiny_clip(seed=16)
    by_name = {t.name: t for t in tasks}
    for i, t in enumerate(ids):
        assert rel(out[i].double(), encode64(ref_model, base, by_name[t], x)[i]) <= TOL, t


def test_merge_ids_follow_name_and_alpha(setup):
    mt, store, base, _ = setup
    tau = [deltas64(store.load(n), base) for n in ("t0", "t1")]
    default = mt.merge(["t0", "t1"], 0.3)
    named = mt.merge(["t0", "t1"], 0.3, name="my-merge")  # same tasks and alpha, its own id
    assert named == "my-merge" and mt.merge(["t0", "t1"], 0.3, name="my-merge") == named
    close = mt.merge(["t0", "t1"], 0.3 + 1e-9)  # prints as 0.3 with 6 digits
    assert len({default, named, close}) == 3
    for mid, alpha in [(default, 0.3), (named, 0.3), (close, 0.3 + 1e-9)]:
        mt.select(mid)
        _check_merge(base, mt.state_dict_for(mid), merge64(base, tau, alpha))
    mt.select(None)
    for bad in ([None, "t0"], "t0", []):
        with pytest.raises(TSVInputError, match="list of task names"):
            mt.merge(bad)


def test_bad_input_raises_tsv_input_error(setup, tmp_path):
    mt, _, _, x = setup
    for batches in [(0, 8), (1, -4), (), (2.5,)]:
        with pytest.raises(TSVInputError, match="calibration_batches"):
            MultiTaskModel(mt.model, [], calibration_batches=batches)
    with pytest.raises(TSVInputError, match="crossover needs a task"):
        mt.crossover(None)
    with pytest.raises(TSVInputError, match="export_peft needs a task"):
        mt.export_peft(None, tmp_path / "lora")
    for task_ids in (None, []):
        with pytest.raises(TSVInputError, match="empty batch"):
            mt(x[:0], task_ids=task_ids)
    for alpha in ("x", float("nan"), float("inf"), None):
        with pytest.raises(TSVInputError, match="alpha must be a finite number"):
            mt.merge(["t0", "t1"], alpha)


def test_dense_delta_on_a_matrix_key_is_refused_not_ignored():
    """The forward applies a matrix key's delta only from U, S, V: a task holding it dense
    (``key::delta`` in a store file) used to be served as if that delta were zero."""
    model = tiny_clip(seed=18)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    task = tsv_fast.CompressedTask("dense", {}, {key: 0.1 * torch.randn(base[key].shape)})
    x = torch.randn(2, 3, 64, 64)
    assert rel(encode64(model, base, task, x), encode64(model, base, None, x)) > 1e-3  # the delta matters
    with pytest.raises(TSVInputError, match=f"task 'dense': matrix key.*{key}.*dense delta"):
        MultiTaskModel(model, [task])


def test_merge_compressed_keeps_matrix_keys_held_as_dense_deltas():
    """A matrix key that every task holds as a dense delta used to be skipped (base kept);
    merge_layers factorises it. Reference: float64 TSV-M from the definition."""
    model = tiny_clip(seed=19)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    gen = torch.Generator().manual_seed(0)
    tasks = [tsv_fast.CompressedTask(f"d{i}", {}, {key: 0.1 * torch.randn(base[key].shape, generator=gen)})
             for i in range(2)]
    merged = merge_compressed(base, tasks)
    _check_merge(base, merged.apply(base), merge64(base, [deltas64(t, base) for t in tasks]))


def test_default_merge_ids_of_different_tasks_differ():
    """Store names may contain '+': the merges of ["a+b", "c"] and ["a", "b+c"] used to get one
    id, so the second merge was refused ("two tasks named ...")."""
    model = tiny_clip(seed=20)
    base, fts = finetune(model, 4, seed=21)
    names = ["a+b", "c", "a", "b+c"]
    tasks = compress(base, fts, names=names)
    mt = MultiTaskModel(model, tasks, strategy="lowrank")
    first, second = mt.merge(["a+b", "c"]), mt.merge(["a", "b+c"])
    assert first != second and mt.merge(["a", "b+c"]) == second  # cached
    assert mt.merge(["a", "c"]) == "tsv-m(a+c)"  # plain names as before
    with pytest.raises(TSVInputError, match=r"\['a'\] named more than once"):
        mt.merge(["a", "c", "a"])  # a task merged with itself: a mistake, refused
    by = dict(zip(names, tasks))
    for mid, pair in [(first, ["a+b", "c"]), (second, ["a", "b+c"])]:
        _check_merge(base, mt.state_dict_for(mid), merge64(base, [deltas64(by[n], base) for n in pair]))


def test_auto_calibration_leaves_the_global_rng_alone():
    """The timing input of strategy="auto" came from the global torch.randn, advancing the user's RNG."""
    model = tiny_clip(seed=22)
    base, fts = finetune(model, 1, seed=23)
    mt = MultiTaskModel(model, compress(base, fts, names=["a"]), calibration_batches=(1, 2))
    x = torch.randn(2, 3, 64, 64)
    state = torch.get_rng_state()
    mt.select("a")(x)
    assert mt.calibration  # it did time the strategies
    assert torch.equal(torch.get_rng_state(), state)


class GlobalRandnAdapter(OpenCLIPVisionAdapter):
    """A custom adapter as users write them: its timing input comes from the global RNG."""

    def calibration_block(self, batch):
        i, p, x = super().calibration_block(batch)
        return i, p, torch.randn(x.shape, dtype=x.dtype, device=x.device)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU visible"))])
def test_auto_calibration_with_a_custom_adapter_leaves_the_global_rng_alone(device):
    """The built-in adapter draws from its own Generator, but a custom calibration_block calling
    torch.randn advanced the user's global RNG (CPU, or the GPU's), on every new rank profile."""
    model = tiny_clip(seed=24)
    base, fts = finetune(model, 1, seed=25)
    model = model.to(device)
    mt = MultiTaskModel(model, compress(base, fts, names=["a"]), calibration_batches=(1, 2),
                        adapter=GlobalRandnAdapter(model))
    x = torch.randn(2, 3, 64, 64, device=device)
    def states():
        return [torch.get_rng_state()] + ([torch.cuda.get_rng_state(x.device)] if device == "cuda" else [])

    before = states()
    mt.select("a")(x)
    assert mt.calibration and mt.last_strategy in ("lowrank", "materialise")  # it did time the strategies
    assert all(torch.equal(a, b) for a, b in zip(states(), before))
    assert mt.crossover("a") in (None, 1, 2)  # a calibrated profile: the lookup leaves it alone too
    assert all(torch.equal(a, b) for a, b in zip(states(), before))


def test_export_refuses_an_existing_file_and_makes_missing_folders(setup, tmp_path):
    """export() replaced an existing file silently, and a missing folder gave a raw OSError naming
    a hidden temporary file."""
    mt, _, _, _ = setup
    path = tmp_path / "new" / "deeper" / "t1.safetensors"
    assert mt.export("t1", path) == path and set(load_file(path)) == set(mt.model.state_dict())
    with pytest.raises(TSVInputError, match=f"{path}: already exists; pass overwrite=True to replace it"):
        mt.export("t0", path)
    assert torch.equal(load_file(path)["visual.proj"], mt.state_dict_for("t1")["visual.proj"])  # still t1
    mt.export("t0", path, overwrite=True)
    assert torch.equal(load_file(path)["visual.proj"], mt.state_dict_for("t0")["visual.proj"])
    with pytest.raises(TSVInputError, match=f"{tmp_path}: is a folder"):
        mt.export("t0", tmp_path, overwrite=True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["t1.safetensors"]  # no temporary file left


def test_half_refuses_factors_that_overflow_float16():
    """.half() of a task whose singular values exceed 65504 gave Inf factors and NaN outputs."""
    model = tiny_clip(seed=24)
    base, fts = finetune(model, 1, seed=25)
    task = compress(base, fts, names=["big"])[0]
    key = "visual.transformer.resblocks.1.mlp.c_fc.weight"
    U, S, V = task.factors[key]
    task.factors[key] = (U, S * 1e6, V)  # finite in float32
    mt = MultiTaskModel(model, [task], strategy="lowrank")
    x = torch.randn(2, 3, 64, 64)
    before = mt.select("big")(x)
    with pytest.raises(TSVInputError, match=f"task 'big': key '{key}::S' overflows float16 .*left unconverted"):
        mt.half()
    assert mt.task("big").factors[key][1].dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in mt.model.parameters())
    torch.testing.assert_close(mt(x), before, rtol=0, atol=0)
    assert mt.bfloat16() is mt  # in range there
    assert mt.task("big").factors[key][1].dtype == torch.bfloat16


def test_a_float16_store_serves_a_float16_model(tmp_path):
    """A store (dtype="float16") of a float32 model was refused by the same model converted with
    .half(): "built from a different base". Now it equals building on float32 and converting."""
    model = tiny_clip(seed=26)
    base, fts = finetune(model, 2, seed=27)
    store = TaskStore(tmp_path / "s", base=base, dtype="float16")
    for i, ft in enumerate(fts):
        store.add(f"t{i}", ft)
    half = MultiTaskModel(copy.deepcopy(model).half(), store, strategy="lowrank")
    converted = MultiTaskModel(model, store, strategy="lowrank").half()
    x = torch.randn(2, 3, 64, 64).half()
    ids = ["t1", "t0"]
    torch.testing.assert_close(half(x, task_ids=ids), converted(x, task_ids=ids), rtol=0, atol=0)
    with pytest.raises(TSVInputError, match="different base"):
        MultiTaskModel(tiny_clip(seed=7).half(), store)


def test_merge_name_must_be_a_string(setup):
    """merge(name=5) made a task id 5, which no store or export can name."""
    mt, _, _, _ = setup
    for bad in (5, "", b"m"):
        with pytest.raises(TSVInputError, match="merge: name must be a non-empty string"):
            mt.merge(["t0", "t1"], name=bad)
    assert not [n for n in mt.names() if not isinstance(n, str)]


def test_alpha_zero_merge_is_the_base(setup):
    """alpha=0 kept every factor with zero singular values (the README says they are dropped)."""
    mt, _, base, x = setup
    zero = mt.task(mt.merge(["t0", "t1"], 0.0))
    assert not zero.factors and not zero.deltas  # zero singular values dropped, as the README says
    assert all(torch.equal(t, base[k]) for k, t in mt.state_dict_for(zero.name).items())
    torch.testing.assert_close(mt(x, task_ids=[zero.name] * 6), mt.select(None)(x), rtol=0, atol=0)


def test_deepcopy_holds_the_base_once(setup):
    """A copy held the base twice: the model's cloned parameters and a second copy in _base."""
    mt, _, _, x = setup
    twin = copy.deepcopy(mt)
    params = {t.untyped_storage().data_ptr() for t in twin.model.state_dict().values()}
    assert {t.untyped_storage().data_ptr() for t in twin._base.values()} == params
    ids = ["t0", "t1", None, "t2", "t0", "t1"]
    torch.testing.assert_close(twin(x, task_ids=ids), mt(x, task_ids=ids), rtol=0, atol=0)

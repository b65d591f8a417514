"""TaskStore: format, exact sizes, rank options, fingerprint refusal, atomic writes."""

import json
import os
import re
import struct

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import tsv_fast.store as store_mod
from tsv_fast import CompressedTask, TSVInputError, compress
from tsv_fast.store import MANIFEST, TaskStore, base_fingerprint, expected_nbytes
from tsv_fast.writer import OutputError


@pytest.fixture
def base(small_base):
    # a frozen "text tower" next to the image tower, plus a 0-d logit_scale
    b = dict(small_base)
    b["text.token_embedding.weight"] = torch.randn(50, 16)
    b["text.ln_final.weight"] = torch.ones(16)
    b["logit_scale"] = torch.tensor(2.5)
    b["position_ids"] = torch.arange(8)
    return b


@pytest.fixture
def finetuned(base, small_tasks):
    """Image-tower deltas from the shared synthetic tasks; text tower frozen; logit_scale tuned."""
    out = []
    for i, ft in enumerate(small_tasks[:3]):
        d = dict(base)
        d.update(ft)
        d["logit_scale"] = base["logit_scale"] + 0.1 * (i + 1)
        out.append(d)
    return out


def _data_bytes(path) -> int:
    """Bytes of the tensor data in a safetensors file (file size minus its header)."""
    raw = path.read_bytes()
    header = struct.unpack("<Q", raw[:8])[0]
    return len(raw) - 8 - header


def _implied_bytes(base, ranks, delta_keys, itemsize=None) -> int:
    """Independent count: (m + n + 1)·k per matrix key, the whole tensor elsewhere."""
    total = 0
    for key, k in ranks.items():
        m, n = base[key].shape
        total += (m + n + 1) * k * (itemsize or base[key].element_size())
    for key in delta_keys:
        total += base[key].numel() * (itemsize or base[key].element_size())
    return total


def test_store_roundtrip_manifest_and_default_rank(tmp_path, base, finetuned):
    store = TaskStore(tmp_path / "s", base=base)
    for i, ft in enumerate(finetuned):
        store.add(f"task{i}", ft)
    assert store.names() == ["task0", "task1", "task2"]
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert manifest["base"]["fingerprint"] == base_fingerprint(base)
    assert manifest["version"] and manifest["num_tasks"] == 8 and manifest["dtype"] is None
    entry = manifest["tasks"][0]
    for key, k in entry["ranks"].items():
        assert k == min(base[key].shape) // 8  # the store's default: floor(r/8)
    # frozen text tower not stored; tuned logit_scale stored; integer buffers never
    assert not any(k.startswith("text.") for k in [*entry["ranks"], *entry["deltas"]])
    assert "logit_scale" in entry["deltas"] and "position_ids" not in entry["deltas"]
    reopened = TaskStore(tmp_path / "s", base=base)
    assert reopened.names() == store.names()
    loaded = reopened.load("task1")
    ref = compress(base, [finetuned[1]], num_tasks=8)[0]
    for key, (U, S, V) in ref.factors.items():
        U2, S2, V2 = loaded.factors[key]
        torch.testing.assert_close((U2 * S2) @ V2.T, (U * S) @ V.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded.deltas["logit_scale"], torch.tensor(0.2), rtol=0, atol=1e-6)
    # opening without the base still reads (no add)
    ro = TaskStore(tmp_path / "s")
    assert ro.names() == store.names()
    with pytest.raises(TSVInputError, match="needs the base"):
        ro.add("x", finetuned[0])


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_stored_bytes_equal_what_the_ranks_imply(tmp_path, base, finetuned, dtype):
    store = TaskStore(tmp_path / "s", base=base, dtype=dtype)
    entry = store.add("a", finetuned[0])
    itemsize = dtype.itemsize if dtype else None
    implied = _implied_bytes(base, entry["ranks"], entry["deltas"], itemsize)
    assert entry["bytes"] == implied == store.nbytes("a")
    assert expected_nbytes(base, entry["ranks"], entry["deltas"], dtype) == implied
    assert _data_bytes(tmp_path / "s" / "a.safetensors") == implied  # no hidden copies in the file
    report = store.size_report()["a"]
    assert report["ratio"] == pytest.approx(implied / sum(t.numel() * t.element_size() for t in base.values()))
    loaded = store.load("a")
    assert loaded.nbytes() == implied
    assert all(t.dtype == (dtype or torch.float32) for f in loaded.factors.values() for t in f)


def test_rank_options(tmp_path, base, finetuned):
    store = TaskStore(tmp_path / "s", base=base, default_rank=0.25, num_tasks=4)
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"  # 256×64, r = 64
    assert store.add("default", finetuned[0])["ranks"][key] == 16  # floor(0.25·64)
    assert store.add("int", finetuned[0], rank=5)["ranks"][key] == 5
    assert store.add("clamped", finetuned[0], rank=10_000)["ranks"][key] == 64
    assert store.add("frac", finetuned[0], rank=0.5)["ranks"][key] == 32
    full = store.load("clamped").apply(base)  # full rank rebuilds the fine-tuned model
    for k, t in finetuned[0].items():
        if t.is_floating_point():
            torch.testing.assert_close(full[k], t, rtol=0, atol=2e-6)
    with pytest.raises(TSVInputError, match="rank"):
        store.add("bad", finetuned[0], rank=1.5)
    with pytest.raises(TSVInputError, match="num_tasks"):
        TaskStore(tmp_path / "s", num_tasks=8)  # fixed at creation
    TaskStore(tmp_path / "s", default_rank=0.25, num_tasks=4)  # the same values reopen it
    full = TaskStore(tmp_path / "full", base=base, default_rank=1.0)
    with pytest.raises(TSVInputError, match=r"default_rank=1 differs from the store's 1.0"):
        TaskStore(tmp_path / "full", default_rank=1)  # k = 1, not the full rank 1.0 means (1 == 1.0 in Python)
    assert full.add("a", finetuned[0])["ranks"][key] == 64
    store2 = TaskStore(tmp_path / "s2", base=base, num_tasks=2)
    assert store2.add("a", finetuned[0])["ranks"][key] == 32  # floor(64/2)


def test_fingerprint_refuses_another_base(tmp_path, base, finetuned):
    TaskStore(tmp_path / "s", base=base).add("a", finetuned[0])
    other = dict(base)
    key = "visual.transformer.resblocks.1.mlp.c_fc.weight"
    other[key] = base[key].clone()
    other[key].view(-1)[0] += 1.0  # a sampled position (stride start)
    assert base_fingerprint(other) != base_fingerprint(base)
    with pytest.raises(TSVInputError, match="different base"):
        TaskStore(tmp_path / "s", base=other)
    assert base_fingerprint({k: v.clone() for k, v in base.items()}) == base_fingerprint(base)
    assert base_fingerprint({**base, "logit_scale": base["logit_scale"].double()}) != base_fingerprint(base)
    # a task file copied in from another store is refused on load
    TaskStore(tmp_path / "o", base=other).add("a", finetuned[0])
    (tmp_path / "s" / "a.safetensors").write_bytes((tmp_path / "o" / "a.safetensors").read_bytes())
    with pytest.raises(TSVInputError, match="another base"):
        TaskStore(tmp_path / "s").load("a")


def test_remove_add_compressed_and_errors(tmp_path, base, finetuned):
    store = TaskStore(tmp_path / "s", base=base)
    store.add("a", finetuned[0])
    store.add("b", finetuned[1])
    store.remove("a")
    assert store.names() == ["b"] and not (tmp_path / "s" / "a.safetensors").exists()
    assert TaskStore(tmp_path / "s").names() == ["b"]
    with pytest.raises(TSVInputError, match="no task named 'a'"):
        store.load("a")
    with pytest.raises(TSVInputError, match="exists"):
        store.add("b", finetuned[1])
    store.add("b", finetuned[2], overwrite=True)
    assert store.names() == ["b"]
    with pytest.raises(TSVInputError, match="task name"):
        store.add("../evil", finetuned[0])
    ct = compress(base, [finetuned[0]], rank=3)[0]
    entry = store.add("pre", ct)
    assert set(entry["ranks"].values()) == {3}
    bad = CompressedTask("x", {"visual.proj": (torch.zeros(3, 1), torch.zeros(1), torch.zeros(3, 1))})
    with pytest.raises(TSVInputError, match="visual.proj"):
        store.add("x", bad)
    with pytest.raises(TSVInputError, match="no task store"):
        TaskStore(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "f").write_text("x")
    with pytest.raises(TSVInputError, match="non-empty"):
        TaskStore(tmp_path / "junk", base=base)


def test_failed_write_leaves_store_unchanged(tmp_path, base, finetuned, monkeypatch):
    store = TaskStore(tmp_path / "s", base=base)
    store.add("a", finetuned[0])
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}

    def boom(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(store_mod, "save_file", boom)
    with pytest.raises(OutputError, match="b.safetensors: cannot write: disk full"):  # names the file
        store.add("b", finetuned[1])
    with pytest.raises(OutputError, match="a.safetensors: cannot write: disk full"):
        store.add("a", finetuned[1], overwrite=True)
    after = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}
    assert after == before  # no partial file, no temp file, manifest untouched
    assert TaskStore(tmp_path / "s").names() == ["a"]


def test_save_file_error_is_an_output_error_naming_the_file(tmp_path, base, finetuned, monkeypatch):
    """A full disk inside save_file raises SafetensorError (not OSError)."""
    store = TaskStore(tmp_path / "s", base=base)

    def full(tensors, path, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(store_mod, "save_file", full)
    with pytest.raises(OutputError, match="s/a.safetensors: cannot write: .*No space left on device"):
        store.add("a", finetuned[0])
    assert TaskStore(tmp_path / "s").names() == []


@pytest.mark.parametrize("change, problem", [
    ({"format_version": "2"}, "field 'format_version': expected an integer"),
    ({"base": None}, "field 'base': expected a mapping"),
    ({"num_tasks": "8"}, "field 'num_tasks': expected an integer >= 1"),
    ({"dtype": "int4"}, "field 'dtype': expected null or one of"),
    ({"default_rank": "high"}, "field 'default_rank'"),
    ({"tasks": [{"name": "a", "file": "../base.safetensors"}]}, "file '../base.safetensors' is not a file name inside"),
    ({"tasks": [{"name": "a", "file": "a.safetensors"}, {"name": "a", "file": "a.safetensors"}]},
     "tasks[1]: task name 'a' appears twice"),
    ({"tasks": [{"name": 3, "file": "a.safetensors"}]}, "tasks[0] lacks 'name' or 'file'"),
    ({"tasks": [{"name": "a", "file": "a.safetensors"}, {"name": "b", "file": "a.safetensors"}]},
     "tasks[1]: file 'a.safetensors' of task 'b' is also the file of task 'a'"),  # remove('b') deleted a's file
])
def test_malformed_manifest_is_refused_naming_the_field(tmp_path, base, finetuned, change, problem):
    TaskStore(tmp_path / "s", base=base).add("a", finetuned[0])
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    (tmp_path / "s" / MANIFEST).write_text(json.dumps({**manifest, **change}))
    with pytest.raises(TSVInputError, match=re.escape(f"{tmp_path / 's' / MANIFEST}: ") + ".*" + re.escape(problem)):
        TaskStore(tmp_path / "s", base=base)


def test_a_bad_task_file_is_named(tmp_path, base, finetuned):
    store = TaskStore(tmp_path / "s", base=base)
    store.add("a", finetuned[0])
    flat = load_file(tmp_path / "s" / "a.safetensors")
    save_file({**flat, "extra": torch.zeros(1)}, tmp_path / "s" / "a.safetensors")
    with pytest.raises(TSVInputError, match=re.escape(str(tmp_path / "s" / "a.safetensors")) + ".*'extra'"):
        store.load("a")


def test_a_task_file_with_nan_or_other_ranks_than_its_manifest_is_named(tmp_path, base, finetuned):
    """NaN/Inf is refused at load naming the file and key (not later, mid-merge); a file whose
    ranks differ from its manifest entry (a file copied over another) is refused too."""
    store = TaskStore(tmp_path / "s", base=base)
    store.add("a", finetuned[0], rank=2)
    store.add("b", finetuned[1], rank=3)
    file_a = tmp_path / "s" / "a.safetensors"
    flat = load_file(file_a)
    key = next(k for k in flat if k.endswith("::S"))
    save_file({**flat, key: flat[key].clone().index_fill_(0, torch.tensor([0]), float("nan"))}, file_a)
    with pytest.raises(TSVInputError, match=re.escape(f"{file_a}: task 'a': key {key!r} contains NaN or Inf")):
        store.load("a")
    save_file(load_file(tmp_path / "s" / "b.safetensors"), file_a)  # b's rank-3 factors under a's rank-2 entry
    with pytest.raises(TSVInputError, match=re.escape(f"{file_a}: task 'a' does not match {MANIFEST}: key ") +
                       ".* has rank 3 in the file, 2 in the manifest"):
        store.load("a")
    assert store.load("b").rank(key[:-3]) == 3


def test_size_queries_name_a_missing_manifest_field_or_file(tmp_path, base, finetuned):
    """A manifest from another tool may lack the byte counts: a clear error, not a KeyError."""
    TaskStore(tmp_path / "s", base=base).add("a", finetuned[0])
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    del manifest["tasks"][0]["bytes"], manifest["base"]["nbytes"]
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(manifest))
    store = TaskStore(tmp_path / "s", base=base)
    with pytest.raises(TSVInputError, match=r"manifest.json: task 'a': field 'bytes': expected a byte count, got None"):
        store.nbytes("a")
    with pytest.raises(TSVInputError, match=r"manifest.json: base: field 'nbytes': expected a byte count"):
        _ = store.base_nbytes
    (tmp_path / "s" / "a.safetensors").unlink()
    with pytest.raises(TSVInputError, match=r"file 'a.safetensors' of task 'a' is missing"):
        store.size_report()


def test_manifest_is_readable_by_others(tmp_path, base):
    old = os.umask(0o022)
    try:
        TaskStore(tmp_path / "s", base=base)
    finally:
        os.umask(old)
    assert (tmp_path / "s" / MANIFEST).stat().st_mode & 0o777 == 0o644


def _manifest_writes_fail(monkeypatch):
    """Every later write of the manifest fails as on a full disk; task files still write."""
    real_write = store_mod._write

    def manifest_fails(path, write):
        if path.name == MANIFEST:
            raise OutputError(f"{path}: cannot write: disk full")
        real_write(path, write)

    monkeypatch.setattr(store_mod, "_write", manifest_fails)


def test_a_failed_add_or_remove_writes_nothing_and_keeps_the_store_as_on_disk(tmp_path, base, finetuned,
                                                                            monkeypatch):
    """The task file is written before the manifest: an ``info`` that JSON cannot hold (a Path)
    or a failed manifest write used to leave an orphan task file, and a store object listing a
    task (or missing one) that the manifest on disk does not."""
    store = TaskStore(tmp_path / "s", base=base)
    store.add("a", finetuned[0])
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}
    with pytest.raises(TSVInputError, match="task 'b': info must be JSON-able"):
        store.add("b", finetuned[1], info={"source": tmp_path / "b.safetensors"})
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before and store.names() == ["a"]

    _manifest_writes_fail(monkeypatch)
    with pytest.raises(OutputError, match="disk full"):
        store.add("b", finetuned[1])
    with pytest.raises(OutputError, match="disk full"):
        store.remove("a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before
    assert store.names() == TaskStore(tmp_path / "s").names() == ["a"]


def test_a_failed_overwrite_keeps_the_old_task_file(tmp_path, base, finetuned, monkeypatch):
    """``add(overwrite=True)`` wrote the new task file over the old one before the manifest: a
    failed manifest write left the old entry (ranks, bytes) pointing at the new task's factors."""
    store = TaskStore(tmp_path / "s", base=base)
    store.add("a", finetuned[0], rank=2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}
    _manifest_writes_fail(monkeypatch)
    with pytest.raises(OutputError, match="disk full"):
        store.add("a", finetuned[1], rank=4, overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before
    reopened = TaskStore(tmp_path / "s")
    assert {k: f[1].shape[0] for k, f in reopened.load("a").factors.items()} == reopened.ranks("a")


def _rewrite(path, change):
    """Rewrite a task file with ``change(flat)``, keeping its metadata (its task name, base)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(change(load_file(path)), path, metadata=meta)


_C_FC = "visual.transformer.resblocks.0.mlp.c_fc"


@pytest.mark.parametrize("change, problem", [
    (lambda flat: {k: t for k, t in flat.items() if k != "logit_scale::delta"},
     "does not match manifest.json: key 'logit_scale::delta' is missing from the file"),
    (lambda flat: {**flat, f"{_C_FC}.bias::delta": flat[f"{_C_FC}.bias::delta"][:-1].clone()},
     f"key '{_C_FC}.bias::delta' has shape (255,), expected (256,)"),
    (lambda flat: {**flat, f"{_C_FC}.weight::U": flat[f"{_C_FC}.weight::U"][:-1].clone()},
     f"key '{_C_FC}.weight::U' has shape (255, 8), expected (256, 8)"),
    (lambda flat: {k: t.double() for k, t in flat.items()}, "has dtype F64, expected float32"),
    (lambda flat: {**flat, f"{_C_FC}.weight::S": flat[f"{_C_FC}.weight::S"].long()},
     f"key '{_C_FC}.weight::S' has dtype I64, expected float32"),
], ids=["missing delta", "delta shape", "factor shape", "other dtype", "integer factor"])
def test_load_refuses_a_task_file_that_is_not_what_the_manifest_promises(tmp_path, base, finetuned, change, problem):
    """A task file was checked only for its ranks: a missing delta loaded as a zero one, and wrong
    shapes or dtypes (integer factors) passed load, to fail later or not at all."""
    store = TaskStore(tmp_path / "s", base=base)
    store.add("a", finetuned[0])
    path = tmp_path / "s" / "a.safetensors"
    _rewrite(path, change)
    with pytest.raises(TSVInputError, match=re.escape(f"{path}: task 'a'") + ".*" + re.escape(problem)):
        store.load("a")


def test_load_refuses_another_tasks_file_of_the_same_ranks(tmp_path, base, finetuned):
    """b's file copied over a's (same ranks, same base) was served as task 'a'; its metadata names b."""
    store = TaskStore(tmp_path / "s", base=base)
    store.add("a", finetuned[0])
    store.add("b", finetuned[1])
    assert store.ranks("a") == store.ranks("b")
    (tmp_path / "s" / "a.safetensors").write_bytes((tmp_path / "s" / "b.safetensors").read_bytes())
    with pytest.raises(TSVInputError, match=re.escape(f"{tmp_path / 's' / 'a.safetensors'}: holds task 'b' "
                                                      f"(its metadata), not task 'a' as manifest.json says")):
        store.load("a")
    store.load("b")


def test_float16_store_refuses_a_compressed_task_that_overflows(tmp_path, base, finetuned):
    """A float32 CompressedTask whose singular values exceed float16's 65504 was written as Inf
    (a later load failed); refused before anything is written, naming the task and key."""
    store = TaskStore(tmp_path / "s", base=base, dtype="float16")
    ct = compress(base, [finetuned[0]], rank=2)[0]
    U, S, V = ct.factors[f"{_C_FC}.weight"]
    ct.factors[f"{_C_FC}.weight"] = (U, S * 1e6, V)  # finite in float32
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}
    with pytest.raises(TSVInputError, match=re.escape(f"task store {tmp_path / 's'}: task 'big': key "
                                                      f"'{_C_FC}.weight::S' overflows the store's dtype float16")):
        store.add("big", ct)
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before and store.names() == []


def test_add_refuses_a_stray_file_of_the_same_name(tmp_path, base, finetuned):
    """add("x") wrote over an x.safetensors that no manifest entry names (a user's file, a crash's leftover)."""
    store = TaskStore(tmp_path / "s", base=base)
    (tmp_path / "s" / "x.safetensors").write_bytes(b"mine")
    with pytest.raises(TSVInputError, match=re.escape(f"task store {tmp_path / 's'}: file 'x.safetensors' exists "
                                                      f"but no task of manifest.json names it")):
        store.add("x", finetuned[0])
    assert (tmp_path / "s" / "x.safetensors").read_bytes() == b"mine" and store.names() == []
    store.add("x", finetuned[0], overwrite=True)  # replacing it is asked for explicitly
    assert store.load("x").factors


def test_the_store_base_in_another_dtype_is_the_same_base(tmp_path, base, finetuned):
    """A store is identified by its base's values, not the dtype they are held in: a float32 base
    converted to float16 (a model's .half()), or a float16 base loaded as float32, was refused as
    "a different base". A different base in that dtype still is."""
    floating = {k: v for k, v in base.items() if v.is_floating_point()}
    TaskStore(tmp_path / "s", base=base, dtype="float16").add("a", finetuned[0])
    TaskStore(tmp_path / "s", base={**base, **{k: v.half() for k, v in floating.items()}})
    TaskStore(tmp_path / "s", base={**base, **{k: v.bfloat16() for k, v in floating.items()}})
    other = {**base, **{k: (v + 1).half() for k, v in floating.items()}}
    with pytest.raises(TSVInputError, match="different base"):
        TaskStore(tmp_path / "s", base=other)
    half = {**base, **{k: v.half() for k, v in floating.items()}}
    TaskStore(tmp_path / "h", base=half).add("a", finetuned[0])
    TaskStore(tmp_path / "h", base={**half, **{k: half[k].float() for k in floating}})  # upcast: exact
    # a store written before the per-dtype fingerprints: the error says the dtypes differ
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    del manifest["base"]["fingerprints_as"]
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(TSVInputError, match=r"different base.*it is held in float16, the store's base in float32 "
                                            r"\(this store compares the base only in its own dtype"):
        TaskStore(tmp_path / "s", base=half)

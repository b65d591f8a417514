"""Reading checkpoints lazily and safely, and writing outputs atomically (tsv_fast.checkpoints / writer)."""

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tsv_fast
from tsv_fast import checkpoints, writer
from tsv_fast.checkpoints import CheckpointError, SafetensorsCheckpoint, fingerprint, open_checkpoint
from tsv_fast.writer import (Entry, OutputError, OwnRecord, check_output, entries_of, parse_size, plan_shards,
                             write_safetensors)


def _listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def _sharded(folder, state, max_bytes):
    write_safetensors(folder, entries_of(state), state.items(), metadata={}, max_shard_bytes=max_bytes)
    return folder


# --- reading -------------------------------------------------------------------------------


def test_safetensors_checkpoint_is_lazy(tmp_path, small_base, monkeypatch):
    save_file(small_base, tmp_path / "base.safetensors")
    ckpt = open_checkpoint(tmp_path / "base.safetensors")
    assert isinstance(ckpt, SafetensorsCheckpoint)
    assert set(ckpt) == set(small_base) and len(ckpt) == len(small_base)
    reads = []
    real = checkpoints.safe_open

    def counting(*args, **kwargs):
        reads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "safe_open", counting)
    for key, t in small_base.items():  # meta and membership come from the header: no file access
        assert ckpt.meta(key) == (tuple(t.shape), t.dtype)
        assert key in ckpt
    assert "nope" not in ckpt and reads == []
    key = "visual.proj"
    assert torch.equal(ckpt[key], small_base[key]) and len(reads) == 1
    with pytest.raises(KeyError):
        ckpt["nope"]


def test_sharded_folder_and_prefix(tmp_path, small_base):
    full = {**small_base, "transformer.w": torch.randn(4, 4), "logit_scale": torch.tensor(4.6)}
    folder = _sharded(tmp_path / "hf", full, max_bytes=100_000)
    assert (folder / "model.safetensors.index.json").is_file()
    ckpt = open_checkpoint(folder)
    assert len(ckpt.files) > 1 and set(ckpt) == set(full)
    assert all(torch.equal(ckpt[k], full[k]) for k in full)
    assert set(open_checkpoint(folder / "model.safetensors.index.json")) == set(full)
    visual = open_checkpoint(folder, prefix="visual.")
    assert set(visual) == set(small_base)  # names kept as they are
    with pytest.raises(CheckpointError, match="no key starts with 'text.'"):
        open_checkpoint(folder, prefix="text.")


def test_sharded_index_problems(tmp_path, small_base):
    folder = _sharded(tmp_path / "hf", small_base, max_bytes=100_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (folder / shard).unlink()
    with pytest.raises(CheckpointError, match=f"{shard}: shard listed in .* is missing"):
        open_checkpoint(folder)
    (tmp_path / "bad.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid sharded-checkpoint index"):
        open_checkpoint(tmp_path / "bad.index.json")


def test_bad_files(tmp_path, small_base):
    with pytest.raises(CheckpointError, match="missing.safetensors: no such file"):
        open_checkpoint(tmp_path / "missing.safetensors")
    save_file(small_base, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.safetensors: not a valid safetensors file"):
        open_checkpoint(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="junk.pt: not a readable PyTorch checkpoint"):
        open_checkpoint(tmp_path / "junk.pt")


def test_torch_state_dicts(tmp_path, small_base):
    torch.save(small_base, tmp_path / "flat.pt")
    torch.save(small_base, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)  # no mmap possible
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in small_base.items()}}, tmp_path / "open_clip.pt")
    for name in ("flat.pt", "legacy.bin", "open_clip.pt"):
        ckpt = open_checkpoint(tmp_path / name, base=small_base)  # DDP's module. matched to the base's names
        assert set(ckpt) == set(small_base), name
        assert all(torch.equal(ckpt[k], v) for k, v in small_base.items())
    assert set(open_checkpoint(tmp_path / "open_clip.pt", prefix="visual.transformer.", base=small_base)) == \
        {k for k in small_base if k.startswith("visual.transformer.")}
    torch.save({"weights": [1, 2], "w": torch.zeros(2)}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="odd.pt: weights: is a list, not a tensor"):
        open_checkpoint(tmp_path / "odd.pt")


def test_pickled_model_refused_unless_opted_in(tmp_path):
    model = torch.nn.Linear(3, 2)
    torch.save(model, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="model.pt: holds pickled Python objects.*--unsafe-pickle"):
        open_checkpoint(tmp_path / "model.pt")
    with pytest.warns(UserWarning, match="weights_only=False"):
        state = open_checkpoint(tmp_path / "model.pt", unsafe_pickle=True)
    assert torch.equal(state["weight"], model.weight.detach())


def test_fingerprint(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(1 << 20)}, path)  # 4 MiB: head and tail are hashed, not the middle
    first = fingerprint(path)
    assert first["size"] == path.stat().st_size and first == fingerprint(path)
    save_file({"a": torch.ones(1 << 20)}, path)
    assert fingerprint(path)["sha256_head_tail"] != first["sha256_head_tail"]


def test_streamed_merge_matches_in_memory(tmp_path, small_base, small_tasks):
    save_file(small_base, tmp_path / "base.safetensors")
    for i, t in enumerate(small_tasks):
        save_file(t, tmp_path / f"t{i}.safetensors")
    lazy = [open_checkpoint(tmp_path / f"t{i}.safetensors") for i in range(len(small_tasks))]
    streamed = tsv_fast.merge_layers(open_checkpoint(tmp_path / "base.safetensors"), lazy)
    expected = tsv_fast.merge_layers(small_base, small_tasks)
    assert all(torch.allclose(streamed[k], expected[k], atol=1e-6) for k in expected)


# --- writing -------------------------------------------------------------------------------


def test_roundtrip_all_dtypes_and_metadata(tmp_path):
    state = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "f16": torch.randn(2, 2).half(),
             "f64": torch.randn(3).double(), "i64": torch.arange(7), "scalar": torch.tensor(1.5),
             "empty": torch.zeros(0, 3), "bool": torch.tensor([True, False]), "view": torch.randn(4, 6)[:, ::2]}
    files = write_safetensors(tmp_path / "x.safetensors", entries_of(state), state.items(),
                              metadata={"format": "pt", "tsv_fast": "{}"}, record={"method": "tsv"})
    assert [f.name for f in files] == ["x.safetensors", "x.safetensors.json"]
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "tsv_fast": "{}"}
    assert json.loads((tmp_path / "x.safetensors.json").read_text()) == {"method": "tsv"}
    assert _listing(tmp_path) == ["x.safetensors", "x.safetensors.json"]  # no staging folder left


def test_sharded_output_layout(tmp_path, small_base):
    total = sum(t.numel() * t.element_size() for t in small_base.values())
    files = write_safetensors(tmp_path / "out", entries_of(small_base), small_base.items(), metadata={"format": "pt"},
                              record={"a": 1}, max_shard_bytes=200_000)
    names = [f.name for f in files]
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) == 4 and shards[0] == "model-00001-of-00004.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total and set(index["weight_map"]) == set(small_base)
    assert "tsv_fast_merge.json" in names
    assert all(os.path.getsize(tmp_path / "out" / s) < 200_000 + 10_000 for s in shards)
    with pytest.raises(OutputError, match="larger than the shard limit"):
        write_safetensors(tmp_path / "one.safetensors", entries_of(small_base), small_base.items(), metadata={},
                          max_shard_bytes=200_000)
    assert not (tmp_path / "one.safetensors").exists()


def test_plan_shards_and_sizes():
    entries = [Entry(str(i), (n,), torch.float32) for i, n in enumerate([10, 10, 30, 5])]
    assert [[e.key for e in s] for _, s in plan_shards(entries, 80)] == [["0", "1"], ["2"], ["3"]]
    assert plan_shards(entries, None) == [("model.safetensors", entries)]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError, match="not a size"):
        parse_size("5 parsecs")


def test_failed_write_leaves_nothing(tmp_path, small_base, monkeypatch):
    (tmp_path / "keep.txt").write_text("untouched")
    calls = []
    real = writer._write_tensor

    def disk_full(f, tensor):
        calls.append(1)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, tensor)

    monkeypatch.setattr(writer, "_write_tensor", disk_full)
    for out, limit in ((tmp_path / "m.safetensors", None), (tmp_path / "folder", 100_000)):
        calls.clear()
        with pytest.raises(OutputError) as info:
            write_safetensors(out, entries_of(small_base), small_base.items(), metadata={}, record={},
                              max_shard_bytes=limit)
        message = str(info.value)  # names the destination (not the staging folder) and the key
        assert message.startswith(str(out)) and ".safetensors: visual." in message
        assert message.endswith("write failed: No space left on device")
        assert _listing(tmp_path) == ["keep.txt"]


def test_error_in_producer_and_overwrite(tmp_path, small_base):
    def failing():
        for i, item in enumerate(small_base.items()):
            if i == 3:
                raise tsv_fast.TSVInputError("task 't': key 'k' contains NaN or Inf")
            yield item

    out = tmp_path / "out"
    with pytest.raises(tsv_fast.TSVInputError):
        write_safetensors(out, entries_of(small_base), failing(), metadata={})
    assert _listing(tmp_path) == []
    write_safetensors(out, entries_of(small_base), small_base.items(), metadata={}, record={"v": 1})
    with pytest.raises(OutputError, match="already exists"):
        write_safetensors(out, entries_of(small_base), small_base.items(), metadata={})
    half = {k: v.half() if v.is_floating_point() else v for k, v in small_base.items()}
    write_safetensors(out, entries_of(half), half.items(), metadata={}, overwrite=True)
    assert load_file(out / "model.safetensors")["visual.proj"].dtype == torch.float16
    assert not (out / "tsv_fast_merge.json").exists()  # the old folder was replaced, not merged into
    assert _listing(tmp_path) == ["out", "out/model.safetensors"]


def test_check_output(tmp_path):
    src = tmp_path / "models" / "a.safetensors"
    src.parent.mkdir()
    src.write_bytes(b"x")
    with pytest.raises(OutputError, match="is one of the inputs"):
        check_output(src, [src], overwrite=True)
    with pytest.raises(OutputError, match="contains an input"):  # replacing the folder would delete it
        check_output(tmp_path / "models", [src], overwrite=True)
    with pytest.raises(OutputError, match="already exists"):
        check_output(tmp_path / "models", [], overwrite=False)
    check_output(tmp_path / "new.safetensors", [src], overwrite=False)


# --- review fixes: malformed inputs are CheckpointErrors naming the file ---------------------


@pytest.mark.parametrize("weight_map, problem", [([], "weight_map: expected a mapping"),
                                                 ({"a": 3}, "a: shard 3 is not a file name"),
                                                 ({"a": "../base.safetensors"}, "a: shard '../base.safetensors'")])
def test_malformed_index_is_refused(tmp_path, weight_map, problem):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=f"model.safetensors.index.json: {re.escape(problem)}"):
        open_checkpoint(tmp_path / "hf")


def test_sharded_pytorch_checkpoint_is_refused_as_such(tmp_path, small_base):
    """Hugging Face's pytorch_model.bin.index.json: its valid .bin shards are not "corrupt safetensors"."""
    (tmp_path / "hf").mkdir()
    torch.save(small_base, tmp_path / "hf" / "pytorch_model-00001-of-00001.bin")
    weight_map = dict.fromkeys(small_base, "pytorch_model-00001-of-00001.bin")
    (tmp_path / "hf" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for given in (tmp_path / "hf", tmp_path / "hf" / "pytorch_model.bin.index.json"):
        with pytest.raises(CheckpointError, match="pytorch_model.bin.index.json: lists PyTorch shards "
                                                  r"\(pytorch_model-00001-of-00001.bin, ...\): sharded PyTorch"):
            open_checkpoint(given)


def test_state_dict_with_a_non_string_key(tmp_path):
    torch.save({0: torch.ones(2)}, tmp_path / "intkey.pt")
    with pytest.raises(CheckpointError, match="intkey.pt: key 0 is not a string"):
        open_checkpoint(tmp_path / "intkey.pt")


@pytest.mark.parametrize("data", [b"PKgarbage", b"\x80\x02garbage-bytes-here"])
def test_corrupt_pickle_is_not_called_a_pickled_model(tmp_path, data):
    """torch says "Weights only load failed" for garbage too: no --unsafe-pickle hint for it."""
    (tmp_path / "garbage.pt").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"garbage.pt: not a readable PyTorch checkpoint \(corrupt\?\)") as info:
        open_checkpoint(tmp_path / "garbage.pt")
    assert "--unsafe-pickle" not in str(info.value) and "\n" not in str(info.value)


def test_pytorch_file_named_safetensors_is_called_what_it_is(tmp_path, small_base):
    """A renamed .bin is a PyTorch checkpoint, not a corrupt safetensors file; real garbage still is."""
    torch.save(small_base, tmp_path / "renamed.safetensors")
    with pytest.raises(CheckpointError, match="renamed.safetensors: a PyTorch checkpoint .* named like a safetensors"):
        open_checkpoint(tmp_path / "renamed.safetensors")
    # garbage, and a truncated safetensors whose header length (640 = 0x0280) starts like a pickle
    for name, data in [("junk", b"\x01\x02garbage"), ("cut", b"\x80\x02" + bytes(6) + b'{"w": {"dtype"')]:
        (tmp_path / f"{name}.safetensors").write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"{name}.safetensors: not a valid safetensors file \(truncated"):
            open_checkpoint(tmp_path / f"{name}.safetensors")


def test_pickled_model_names_the_global(tmp_path):
    torch.save(torch.nn.Linear(3, 2), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"model.pt: holds pickled .*torch\.nn\.modules\.linear\.Linear"):
        open_checkpoint(tmp_path / "model.pt")


@pytest.mark.parametrize("dtype, name", [(torch.float8_e4m3fn, "F8_E4M3"), (torch.float8_e5m2, "F8_E5M2")])
def test_float8_is_refused_when_opened(tmp_path, dtype, name):
    """torch has no NaN/Inf check or SVD for float8: refused at open, not mid-merge."""
    save_file({"w": torch.zeros(4, 4, dtype=dtype), "b": torch.zeros(4)}, tmp_path / "fp8.safetensors")
    with pytest.raises(CheckpointError, match=f"fp8.safetensors: w: dtype {name}: float8 is not supported"):
        open_checkpoint(tmp_path / "fp8.safetensors")
    torch.save({"w": torch.zeros(4, 4, dtype=dtype)}, tmp_path / "fp8.pt")
    with pytest.raises(CheckpointError, match="fp8.pt: w: dtype float8_.*: float8 is not supported"):
        open_checkpoint(tmp_path / "fp8.pt")


def test_complex_tensor_in_a_torch_file_is_refused_when_opened(tmp_path):
    torch.save({"w": torch.zeros(2, 2), "c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="c.pt: c: dtype complex64: not supported"):
        open_checkpoint(tmp_path / "c.pt")


def test_unsupported_dtypes_outside_the_prefix_are_ignored(tmp_path):
    """As for safetensors: a full checkpoint's other tower may hold complex (RoPE) buffers."""
    torch.save({"visual.w": torch.ones(2, 2), "text.rope": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.pt")
    ckpt = open_checkpoint(tmp_path / "c.pt", prefix="visual.")
    assert list(ckpt) == ["visual.w"]


# --- review fixes: unwritable outputs, failed runs ---------------------------------------------


def test_unwritable_output_is_refused_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "a.safetensors").write_bytes(b"x")
    with pytest.raises(OutputError, match=r"a.safetensors/x.safetensors: cannot write: .* is not a folder"):
        check_output(tmp_path / "a.safetensors" / "x.safetensors", [], overwrite=False)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".x"))

    monkeypatch.setattr(writer.tempfile, "mkdtemp", read_only)
    with pytest.raises(OutputError, match="new/x.safetensors: cannot write: Read-only file system"):
        check_output(tmp_path / "new" / "x.safetensors", [], overwrite=False)
    with pytest.raises(OutputError, match="x.safetensors: cannot write: Read-only file system"):
        write_safetensors(tmp_path / "new" / "x.safetensors", [], [], metadata={})
    assert _listing(tmp_path) == ["a.safetensors"]


class _FailingClose:
    """A file whose close() fails like a full disk's flush."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        return self.f.write(data)

    def close(self):
        self.f.close()
        raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_error_is_not_hidden_by_abort(tmp_path, small_base, monkeypatch):
    monkeypatch.setattr(writer, "open", lambda path, mode: _FailingClose(open(path, mode)),
                        raising=False)

    def disk_full(f, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "_write_tensor", disk_full)
    with pytest.raises(OutputError, match=r"m.safetensors: visual\..*: write failed: No space left on device"):
        write_safetensors(tmp_path / "m.safetensors", entries_of(small_base), small_base.items(), metadata={})
    assert _listing(tmp_path) == []


def test_failed_run_removes_the_parent_folders_it_made(tmp_path, small_base):
    def failing():
        yield from list(small_base.items())[:2]
        raise tsv_fast.TSVInputError("task 't': key 'k' contains NaN or Inf")

    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "new" / "sub" / "m.safetensors", tmp_path / "kept" / "new" / "folder"):
        with pytest.raises(tsv_fast.TSVInputError):
            write_safetensors(out, entries_of(small_base), failing(), metadata={})
    assert _listing(tmp_path) == ["kept"]  # a folder that existed before stays


MERGED = OwnRecord("tsv_fast_merge.json", "a merged model", {"tool": "tsv-fast", "command": "merge"})
STORE = OwnRecord("manifest.json", "a task store", {"tool": "tsv-fast", "format": "tsv-fast task store"})


def test_overwrite_never_replaces_a_folder_tsv_fast_did_not_write(tmp_path):
    """A record's name is not enough (any tool may write a manifest.json): its content must be
    tsv-fast's, and of the output's kind."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="results: is a folder tsv-fast did not write"):
        check_output(results, [], overwrite=True, record=MERGED, folder=True)
    for fake in ("{}", "not json", '{"tool": "other", "command": "merge"}', "[1]", "\xff"):
        (results / "tsv_fast_merge.json").write_text(fake)
        with pytest.raises(OutputError, match="results: its tsv_fast_merge.json is not a record tsv-fast wrote"):
            check_output(results, [], overwrite=True, record=MERGED, folder=True)
    (results / "tsv_fast_merge.json").write_text('{"tool": "tsv-fast", "command": "merge", "version": "0.1"}')
    check_output(results, [], overwrite=True, record=MERGED, folder=True)
    check_output(tmp_path / "empty", [], overwrite=True, record=MERGED, folder=True)
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text('{"tool": "tsv-fast", "format": "tsv-fast task store", "tasks": []}')
    with pytest.raises(OutputError, match="store: holds a task store \\(its manifest.json\\), and this output is a "
                                          "merged model; refusing"):
        check_output(store, [], overwrite=True, record=MERGED, others=[MERGED, STORE], folder=True)
    check_output(store, [], overwrite=True, record=STORE, others=[MERGED, STORE], folder=True)


def _foreign_folder(path):
    path.mkdir()
    (path / "notes.txt").write_text("mine")


@pytest.mark.parametrize("swap", ["foreign folder", "another kind", "a file"])
def test_overwrite_checks_the_target_again_right_before_replacing_it(tmp_path, swap):
    """Ownership was checked only before the work: a target replaced meanwhile by a user's folder
    (or a store, or a file) was moved aside and deleted by the final replace."""
    out = tmp_path / "merged"
    write_safetensors(out, entries_of({"w": torch.ones(2)}), [("w", torch.ones(2))], metadata={},
                      record={"tool": "tsv-fast", "command": "merge"}, own=MERGED)
    check_output(out, [], overwrite=True, record=MERGED, others=[MERGED, STORE], folder=True)  # ours: passes

    def swapped():  # the target changes while the output is computed
        shutil.rmtree(out)
        if swap == "foreign folder":
            _foreign_folder(out)
        elif swap == "another kind":
            _foreign_folder(out)
            (out / "manifest.json").write_text('{"tool": "tsv-fast", "format": "tsv-fast task store"}')
        else:
            out.write_text("mine")
        yield "w", torch.zeros(2)

    expected = {"foreign folder": "merged: is a folder tsv-fast did not write",
                "another kind": "merged: holds a task store",
                "a file": "merged: is a file, and this output is a folder"}
    with pytest.raises(OutputError, match=expected[swap]):
        write_safetensors(out, entries_of({"w": torch.ones(2)}), swapped(), metadata={},
                          record={"tool": "tsv-fast", "command": "merge"}, overwrite=True, own=MERGED,
                          others=[MERGED, STORE])
    assert os.listdir(tmp_path) == ["merged"]  # nothing staged left
    assert (out.read_text() if swap == "a file" else (out / "notes.txt").read_text()) == "mine"


@pytest.mark.parametrize("swap, error", [("record", "m.safetensors.json: is not a record tsv-fast wrote"),
                                         ("file", "m.safetensors: is a folder, and this output is a file")])
def test_overwrite_checks_a_file_output_and_its_record_again_before_replacing(tmp_path, swap, error):
    """The same for a one-file output: its JSON record, or the file itself, swapped meanwhile."""
    out, beside = tmp_path / "m.safetensors", tmp_path / "m.safetensors.json"
    record = {"tool": "tsv-fast", "command": "merge"}
    write_safetensors(out, entries_of({"w": torch.ones(2)}), [("w", torch.ones(2))], metadata={}, record=record)

    def swapped():
        if swap == "record":
            beside.write_text('{"mine": true}')
        else:
            out.unlink()
            _foreign_folder(out)
        yield "w", torch.zeros(2)

    with pytest.raises(OutputError, match=error):
        write_safetensors(out, entries_of({"w": torch.ones(2)}), swapped(), metadata={}, record=record,
                          overwrite=True, own=MERGED)
    if swap == "record":  # neither file replaced: not the record, nor the output beside it
        assert beside.read_text() == '{"mine": true}' and load_file(out)["w"].tolist() == [1.0, 1.0]
    else:
        assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "m.safetensors.json"]  # none staged


def test_atomic_write_file_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        writer.atomic_write_file(tmp_path / "m.json", lambda tmp: Path(tmp).write_text("{}"))
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644

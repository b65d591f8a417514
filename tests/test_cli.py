"""The `tsv-fast` command line, in-process through cli.main (plus one subprocess run)."""

import errno
import json
import re
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tsv_fast
from tsv_fast import cli, writer
from tsv_fast.checkpoints import open_checkpoint
from tsv_fast.tasks import CompressedTask

LAST_KEY = "visual.transformer.resblocks.1.mlp.c_proj.weight"  # read late in a merge: fails mid-stream


@pytest.fixture(scope="module")
def disk(tmp_path_factory, small_base, small_tasks):
    """base.safetensors and three fine-tuned tasks t0..t2 on disk."""
    folder = tmp_path_factory.mktemp("ckpts")
    save_file(small_base, folder / "base.safetensors")
    for i, t in enumerate(small_tasks[:3]):
        save_file(t, folder / f"t{i}.safetensors")
    return folder


@pytest.fixture
def work(tmp_path, disk, monkeypatch):
    """A fresh folder with links to the checkpoints, as the working directory."""
    for f in disk.iterdir():
        (tmp_path / f.name).symlink_to(f)
    monkeypatch.chdir(tmp_path)
    return tmp_path


TASKS = ["base.safetensors", "t0.safetensors", "t1.safetensors", "t2.safetensors"]


def run(*argv, expect=0):
    code = cli.main([str(a) for a in argv])
    assert code == expect, f"exit code {code}, expected {expect}"


def listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_merge_matches_library_and_records_inputs(work, small_base, small_tasks, capsys):
    run("merge", *TASKS, "-o", "merged.safetensors")
    out = load_file("merged.safetensors")
    expected = tsv_fast.merge_layers(small_base, small_tasks[:3])
    assert list(out) == list(load_file("base.safetensors"))
    assert all(torch.allclose(out[k], expected[k], atol=1e-6) for k in expected)
    record = json.loads((work / "merged.safetensors.json").read_text())
    assert record["method"] == "tsv" and record["alpha"] == 1.0 and record["version"] == tsv_fast.__version__
    assert record["ranks_per_task"]["256x64"] == 21
    assert [t["path"] for t in record["inputs"]["tasks"]] == TASKS[1:]
    assert record["inputs"]["base"]["files"][0]["size"] == (work / "base.safetensors").stat().st_size
    with safe_open("merged.safetensors", "pt") as f:
        assert json.loads(f.metadata()["tsv_fast"]) == record
    assert "merged 3 tasks (tsv, alpha 1)" in capsys.readouterr().out


def test_merge_options_dtype_and_shards(work, small_base, small_tasks):
    run("merge", *TASKS, "-o", "ties", "--method", "ties", "--density", "0.5", "--alpha", "0.7", "--dtype", "bf16",
        "--max-shard-size", "200KB", "--exclude", "*.ln_*", "-q")
    merged = open_checkpoint("ties")
    assert len(merged.files) > 1 and (work / "ties" / "model.safetensors.index.json").exists()
    expected = tsv_fast.merge_layers(small_base, small_tasks[:3], method="ties", alpha=0.7, density=0.5,
                                     exclude="*.ln_*", out_dtype=torch.bfloat16)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    assert json.loads((work / "ties" / "tsv_fast_merge.json").read_text())["options"] == {"density": 0.5, "trim": "key"}
    run("merge", *TASKS, "-o", "r.safetensors", "--rank", "4", "-q")
    assert json.loads((work / "r.safetensors.json").read_text())["ranks_per_task"]["256x64"] == 4


def test_dry_run_reads_headers_only(work, capsys):
    before = listing(work)
    run("merge", *TASKS, "-o", "m", "--dry-run")
    text = capsys.readouterr().out
    assert "dry run" in text and "10 matrix keys" in text and "256x64: k=21" in text and "memory" in text
    assert "working set (largest key" in text  # a CPU merge goes key by key
    run("merge", *TASKS, "-o", "m", "--dry-run", "--batch", "shape")
    whole = re.search(r"(\d+) shape batches, the largest ([\d.]+) KiB of stacked deltas", capsys.readouterr().out)
    run("merge", *TASKS, "-o", "m", "--dry-run", "--batch", "shape", "--batch-bytes", "200KiB")
    split = re.search(r"(\d+) shape batches, the largest ([\d.]+) KiB of stacked deltas", capsys.readouterr().out)
    assert whole and split and int(whole.group(1)) == 4  # the 4 matrix shapes of a ViT block
    assert float(split.group(2)) <= 200 < float(whole.group(2))  # the 256×64 keys (196 KiB each) go alone
    run("compress", *TASKS, "-o", "store", "--dry-run")
    assert "per task" in capsys.readouterr().out
    run("compress", *TASKS, "-o", "store", "--dry-run", "--include", "nomatch*", expect=2)  # as the real run
    assert "select no floating key to compress" in capsys.readouterr().err
    assert listing(work) == before


def test_yaml_config(work, small_base, small_tasks, capsys):
    config = {"base": "base.safetensors", "tasks": TASKS[1:], "output": "from_yaml.safetensors",
              "method": "task_arithmetic", "alpha": 0.5, "include": "visual.transformer.*"}
    (work / "job.yaml").write_text(yaml.safe_dump(config))
    run("merge", "job.yaml", "-q")
    expected = tsv_fast.merge_layers(small_base, small_tasks[:3], method="task_arithmetic", alpha=0.5,
                                     include="visual.transformer.*")
    out = load_file("from_yaml.safetensors")
    assert all(torch.allclose(out[k], expected[k], atol=1e-6) for k in expected)
    run("merge", "job.yaml", "-o", "override.safetensors", "--alpha", "0.2", "-q")  # flags override the file
    assert json.loads((work / "override.safetensors.json").read_text())["alpha"] == 0.2
    capsys.readouterr()
    for bad, problem in [({"alhpa": 1}, "unknown field 'alhpa'"),
                         ({"alpha": "high"}, "field 'alpha': expected a number"),
                         ({"tasks": "t0.safetensors"}, "field 'tasks': expected a list of paths"),
                         ({"method": "nope"}, "unknown merge method 'nope'")]:
        (work / "bad.yaml").write_text(yaml.safe_dump({**config, **bad}))
        run("merge", "bad.yaml", expect=2)
        err = capsys.readouterr().err
        assert err.startswith("tsv-fast: error: bad.yaml") or "nope" in err, err
        assert problem in err and err.count("\n") == 1


def test_compress_store_rebuilds_tasks(work, small_base, small_tasks):
    run("compress", *TASKS, "-o", "store", "-q")
    manifest = json.loads((work / "store" / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["t0", "t1", "t2"] and manifest["num_tasks"] == 3
    expected = tsv_fast.compress(small_base, small_tasks[:3])
    for entry, exp in zip(manifest["tasks"], expected):
        task = CompressedTask.from_state_dict(load_file(work / "store" / entry["file"]), entry["name"])
        assert task.nbytes() == entry["bytes"] == exp.nbytes()
        rebuilt, want = task.apply(small_base), exp.apply(small_base)
        assert all(torch.allclose(rebuilt[k], want[k], atol=1e-6) for k in want)
    run("compress", *TASKS[:2], "-o", "one", "--energy", "0.5", "-q")
    assert len(json.loads((work / "one" / "manifest.json").read_text())["tasks"]) == 1


def test_merge_takes_task_stores_mixed_with_checkpoints(work, small_base, small_tasks):
    """A store from `compress` stands for its tasks; it merges like those compressed tasks."""
    run("compress", *TASKS[:3], "-o", "store", "-q")  # t0, t1 compressed at floor(r/2)
    run("merge", "base.safetensors", "store", "t2.safetensors", "-o", "merged.safetensors", "-q")
    compressed = tsv_fast.compress(small_base, small_tasks[:2])
    expected = tsv_fast.merge_layers(small_base, [*compressed, small_tasks[2]])
    out = load_file("merged.safetensors")
    assert all(torch.allclose(out[k], expected[k], atol=1e-5) for k in expected)
    record = json.loads((work / "merged.safetensors.json").read_text())
    assert record["inputs"]["tasks"][0]["path"] == "store"
    assert any(f["file"].endswith("manifest.json") for f in record["inputs"]["tasks"][0]["files"])


def test_merge_batch_flag_gives_the_same_merge(work):
    run("merge", *TASKS, "-o", "by_key.safetensors", "-q", "--batch", "key")
    run("merge", *TASKS, "-o", "by_shape.safetensors", "-q", "--batch", "shape")
    a, b = load_file("by_key.safetensors"), load_file("by_shape.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert json.loads((work / "by_shape.safetensors.json").read_text())["method"] == "tsv"


def test_merge_batch_bytes_flag_and_field_reach_the_merge(work, monkeypatch, capsys):
    seen = []
    real = cli.iter_merge
    monkeypatch.setattr(cli, "iter_merge", lambda *a, **kw: seen.append(kw["batch_bytes"]) or real(*a, **kw))
    run("merge", *TASKS, "-o", "small.safetensors", "-q", "--batch", "shape", "--batch-bytes", "1KiB")
    run("merge", *TASKS, "-o", "default.safetensors", "-q", "--batch", "shape")
    (work / "job.yaml").write_text("base: base.safetensors\ntasks: [t0.safetensors, t1.safetensors, t2.safetensors]\n"
                                   "output: yaml.safetensors\nbatch: shape\nbatch_bytes: 64MiB\n")
    run("merge", "job.yaml", "-q")
    run("merge", "job.yaml", "-q", "-o", "auto.safetensors", "--batch-bytes", "auto")  # the flag overrides the file
    assert seen == [1024, None, 64 << 20, None]  # None: resolve_batch_bytes (2 GiB on a CPU)
    a, b = load_file("small.safetensors"), load_file("default.safetensors")  # one key per batch, or all
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    run("merge", *TASKS, "-o", "key.safetensors", "--batch", "key", "--batch-bytes", "1GiB", expect=2)
    assert "batch='key' forms none" in capsys.readouterr().err and not (work / "key.safetensors").exists()
    for bad in ("0", "1e400", "1.2.3GB", "automatic"):
        run("merge", *TASKS, "-o", "bad.safetensors", "--batch-bytes", bad, expect=2)
        assert "batch_bytes" in capsys.readouterr().err and not (work / "bad.safetensors").exists()


def test_merge_refuses_a_store_of_another_base_or_too_few_tasks(work, small_base, capsys):
    run("compress", *TASKS[:2], "-o", "one", "-q")  # a store holding one task
    run("merge", "base.safetensors", "one", "-o", "m.safetensors", expect=2)
    assert "at least 2 tasks" in capsys.readouterr().err
    other = {k: v + 1 for k, v in small_base.items()}
    save_file(other, work / "other.safetensors")
    run("merge", "other.safetensors", "one", "t1.safetensors", "-o", "m.safetensors", expect=2)
    err = capsys.readouterr().err
    assert "one" in err and "different base" in err and err.count("\n") == 1
    assert not (work / "m.safetensors").exists()
    run("merge", "base.safetensors", "one", "./one", "-o", "m.safetensors", expect=2)
    assert "given twice" in capsys.readouterr().err


def test_interference_report(work, small_base, small_tasks):
    run("interference", *TASKS, "-o", "sti", "-q")
    files = listing(work / "sti")
    assert files == ["sti.json", "sti_by_depth.png", "sti_heatmap.png", "sti_per_layer.csv", "sti_per_pair.csv"]
    report = json.loads((work / "sti" / "sti.json").read_text())
    expected = tsv_fast.interference(small_base, small_tasks[:3])
    assert report["tasks"] == ["t0", "t1", "t2"]
    assert report["per_key"] == pytest.approx(expected.per_key, rel=1e-5)
    rows = (work / "sti" / "sti_per_pair.csv").read_text().splitlines()
    assert rows[0] == "key,task_a,task_b,sti" and len(rows) == 1 + 3 * len(expected.per_key)


def test_inspect(work, capsys):
    run("inspect", "base.safetensors")
    out = capsys.readouterr().out
    assert "32 tensors" in out and "visual.proj" in out and "64x32" in out and "10 matrix keys" in out
    run("inspect", "t0.safetensors", "t1.safetensors", "--base", "base.safetensors", "-q")
    out = capsys.readouterr().out
    assert "of its energy on average at k = floor(r/2)" in out
    run("inspect", "t0.safetensors", "--base", "base.safetensors", "--num-tasks", "8")
    assert "energy@k" in capsys.readouterr().out
    run("inspect", "t0.safetensors", "--num-tasks", "8", expect=2)  # without --base it would be ignored
    _one_line_error(capsys, "inspect --num-tasks sets the rank floor(r/T) of the deltas against --base")


def _bad_inputs(work):
    """(name, command line, words the error must contain) for each kind of bad input."""
    base = load_file(work / "t0.safetensors")
    nan = dict(base)
    nan[LAST_KEY] = nan[LAST_KEY].clone()
    nan[LAST_KEY][0, 0] = float("nan")
    save_file(nan, work / "nan.safetensors")
    shape = {**base, "visual.proj": torch.zeros(64, 33)}
    save_file(shape, work / "shape.safetensors")
    keys = {k: v for k, v in base.items() if "ln_" not in k}
    save_file(keys, work / "keys.safetensors")
    data = (work / "t1.safetensors").read_bytes()
    (work / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    torch.save(torch.nn.Linear(2, 2), work / "model.pt")
    (work / "exists.safetensors").write_bytes(b"old")
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in base.items()}, work / "fp8.safetensors")
    (work / "garbage.pt").write_bytes(b"PKgarbage")
    merge = ["merge", "base.safetensors", "t0.safetensors"]
    return [
        ("new parents", [*merge, "nan.safetensors", "-o", "newdir/sub/o.safetensors"], ["nan.safetensors", "NaN"]),
        ("nan base", ["merge", "nan.safetensors", "t0.safetensors", "t1.safetensors", "-o", "o.safetensors"],
         ["error: nan.safetensors: key", LAST_KEY, "NaN"]),
        ("fp8", [*merge, "fp8.safetensors", "-o", "o.safetensors"], ["fp8.safetensors", "F8_E4M3", "float8"]),
        ("garbage", [*merge, "garbage.pt", "-o", "o.safetensors"], ["garbage.pt", "corrupt"]),
        ("missing file", [*merge, "nope.safetensors", "-o", "o.safetensors"], ["nope.safetensors", "no such file"]),
        ("truncated", [*merge, "trunc.safetensors", "-o", "o.safetensors"], ["trunc.safetensors", "truncated"]),
        ("pickle", [*merge, "model.pt", "-o", "o.safetensors"], ["model.pt", "--unsafe-pickle"]),
        ("keys", [*merge, "keys.safetensors", "-o", "o.safetensors"],
         ["keys.safetensors", "missing", "visual.ln_post.bias", "(and"]),
        ("shape", [*merge, "shape.safetensors", "-o", "o.safetensors"],
         ["shape.safetensors", "visual.proj", "(64, 33)"]),
        ("nan", [*merge, "nan.safetensors", "-o", "o.safetensors"], ["nan.safetensors", LAST_KEY, "NaN"]),
        ("one task", [*merge, "-o", "o.safetensors"], ["at least 2 task"]),
        ("duplicate", [*merge, "./t0.safetensors", "-o", "o.safetensors"], ["t0.safetensors", "given twice"]),
        ("method", [*merge, "t1.safetensors", "-o", "o.safetensors", "--method", "magic"], ["unknown merge method"]),
        ("option", [*merge, "t1.safetensors", "-o", "o.safetensors", "--method", "mean", "--density", "0.3"],
         ["no option", "density"]),
        ("flag", [*merge, "t1.safetensors", "-o", "o.safetensors", "--densty", "0.3"], ["unrecognized", "--densty"]),
        ("exists", [*merge, "t1.safetensors", "-o", "exists.safetensors"], ["exists.safetensors", "--overwrite"]),
        ("is input", [*merge, "t1.safetensors", "-o", "t1.safetensors", "--overwrite"],
         ["t1.safetensors", "is one of the inputs"]),
        ("sti one task", ["interference", "base.safetensors", "t0.safetensors", "-o", "r"], ["at least 2"]),
        ("compress dup", ["compress", "base.safetensors", "base.safetensors", "-o", "s"], ["given twice"]),
        ("compress dtype", ["compress", "base.safetensors", "t0.safetensors", "-o", "s", "--dtype", "int4"],
         ["--dtype", "int4"]),
        ("bad yaml", ["merge", "nope.yaml"], ["nope.yaml", "cannot read"]),
    ]


def test_bad_input_one_line_exit_2_nothing_left(work, capsys):
    for name, argv, words in _bad_inputs(work):
        before = listing(work)
        capsys.readouterr()
        run(*argv, expect=2)
        err = capsys.readouterr().err
        assert err.startswith("tsv-fast: error: ") and err.count("\n") == 1, (name, err)
        assert all(w in err for w in words), (name, err)
        assert listing(work) == before, name
    assert (work / "exists.safetensors").read_bytes() == b"old"


def test_disk_full_leaves_nothing(work, capsys, monkeypatch):
    calls = []

    def disk_full(f, tensor):
        calls.append(1)
        if len(calls) == 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)

    monkeypatch.setattr(writer, "_write_tensor", disk_full)
    before = listing(work)
    run("merge", *TASKS, "-o", "full", "--max-shard-size", "100KB", expect=2)
    err = capsys.readouterr().err
    assert err.startswith("tsv-fast: error: full/model-0000") and "write failed: No space left on device" in err
    assert listing(work) == before


def test_sigterm_leaves_nothing(work, capsys, monkeypatch):
    monkeypatch.setattr(writer, "_write_tensor", lambda f, tensor: os.kill(os.getpid(), signal.SIGTERM))
    before = listing(work)
    run("merge", *TASKS, "-o", "m", expect=130)
    assert "interrupted" in capsys.readouterr().err and listing(work) == before
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the command


def test_unexpected_error_exit_1(work, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(cli, "iter_merge", boom)
    run("merge", *TASKS, "-o", "x.safetensors", expect=1)
    err = capsys.readouterr().err
    assert "unexpected RuntimeError: kaboom (run with -v" in err and "Traceback" not in err
    run("merge", *TASKS, "-o", "x.safetensors", "-v", expect=1)
    assert "Traceback" in capsys.readouterr().err


def test_python_m_help():
    done = subprocess.run([sys.executable, "-m", "tsv_fast", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "merge" in done.stdout and "inspect" in done.stdout


def test_bench_accuracy_forwards_to_the_evaluation(capsys):
    from tsv_fast import cli

    assert cli.main(["bench", "accuracy", "--help"]) == 0
    out = capsys.readouterr().out
    assert "vision-mini" in out and out.startswith("usage: tsv-fast bench accuracy")
    assert cli.main(["bench", "accuracy", "--benchmark", "nope"]) == 2  # its usage error, under this command's name
    assert "tsv-fast bench accuracy: error: argument --benchmark" in capsys.readouterr().err


# --- review fixes ------------------------------------------------------------------------------


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.startswith("tsv-fast: error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    return err


def test_unwritable_output_exit_2_before_any_work(work, capsys, monkeypatch):
    run("merge", *TASKS, "-o", "base.safetensors/x.safetensors", expect=2)
    _one_line_error(capsys, "base.safetensors/x.safetensors: cannot write", "is not a folder")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    def never(*args, **kwargs):
        raise AssertionError("computed before checking the output")

    monkeypatch.setattr(writer.tempfile, "mkdtemp", read_only)
    monkeypatch.setattr(cli, "compress", never)
    monkeypatch.setattr(cli, "interference", never)
    before = listing(work)
    for command in ("merge", "compress", "interference"):
        run(command, *TASKS, "-o", "ro/out", expect=2)
        _one_line_error(capsys, "ro/out: cannot write: Read-only file system")
    assert listing(work) == before


def test_inspect_base_with_nan_is_named(work, capsys):
    t0 = load_file(work / "t0.safetensors")
    t0[LAST_KEY][1, 1] = float("nan")
    save_file(t0, work / "nan.safetensors")
    run("inspect", "nan.safetensors", "--base", "base.safetensors", "--num-tasks", "2", "-q", expect=2)
    _one_line_error(capsys, f"nan.safetensors: {LAST_KEY}: contains NaN or Inf")


@pytest.mark.parametrize("command", ["compress", "inspect"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_num_tasks_must_be_positive(work, capsys, command, value):
    argv = [*TASKS, "-o", "store"] if command == "compress" else ["t0.safetensors", "--base", "base.safetensors"]
    run(command, *argv, "--num-tasks", value, expect=2)
    _one_line_error(capsys, "--num-tasks", "expected an integer >= 1")
    assert not (work / "store").exists()


def test_compress_makes_valid_task_names_from_file_names(work):
    for name, task in zip(("my task", "_t1", "café"), TASKS[1:]):
        (work / f"{name}.safetensors").symlink_to(work / task)
    run("compress", "base.safetensors", "my task.safetensors", "_t1.safetensors", "café.safetensors", "-o", "s", "-q")
    manifest = json.loads((work / "s" / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["my-task", "t1", "cafe"]
    assert cli._unique_names([work / "...", work / "+", work / "b"]) == ["task0", "task1", "b"]  # nothing left


def test_yaml_paths_expand_the_home_folder(work, monkeypatch, capsys):
    """``~/…`` in a config file means the home folder, as in a shell (it was read as a folder
    named '~' beside the config)."""
    monkeypatch.setenv("HOME", str(work))
    os.mkdir("jobs")
    config = {"base": "~/base.safetensors", "tasks": [f"~/{t}" for t in TASKS[1:]], "output": "~/home.safetensors",
              "method": "mean"}
    (work / "jobs" / "job.yaml").write_text(yaml.safe_dump(config))
    run("merge", "jobs/job.yaml", "-q")
    assert os.path.exists("home.safetensors") and not os.path.exists("jobs/~")


def test_yaml_option_group_is_replaced_by_a_flag(work, capsys):
    """--rank on a file with rank_fraction: the flag wins (one exclusive group)."""
    (work / "job.yaml").write_text(yaml.safe_dump({"base": "base.safetensors", "tasks": TASKS[1:],
                                                   "output": "m.safetensors", "rank_fraction": 0.1}))
    run("merge", "job.yaml", "--rank", "3", "-q")
    record = json.loads((work / "m.safetensors.json").read_text())
    assert record["options"]["rank"] == 3 and record["ranks_per_task"]["256x64"] == 3
    run("merge", "job.yaml", "extra.safetensors", expect=2)
    _one_line_error(capsys, "job.yaml: a CONFIG.yaml must be the only input")


def test_one_checkpoint_given_twice_by_other_paths(work, capsys, small_tasks):
    writer.write_safetensors(work / "sh", writer.entries_of(small_tasks[1]), small_tasks[1].items(), metadata={},
                             max_shard_bytes=100_000)
    run("merge", "base.safetensors", "sh", "sh/model.safetensors.index.json", "-o", "d.safetensors", expect=2)
    _one_line_error(capsys, "sh/model.safetensors.index.json: given twice (also as sh)")
    (work / "x3").mkdir()
    (work / "x3" / "model.safetensors").symlink_to(work / "t0.safetensors")
    run("merge", "base.safetensors", "x3", "t0.safetensors", "-o", "d.safetensors", expect=2)
    _one_line_error(capsys, "t0.safetensors: given twice (also as x3)")
    assert not (work / "d.safetensors").exists()


def test_alpha_must_be_finite(work, capsys):
    run("merge", *TASKS, "-o", "m.safetensors", "--alpha", "nan", expect=2)
    _one_line_error(capsys, "field 'alpha': expected a finite number")
    assert not (work / "m.safetensors").exists()


def test_dry_run_reports_an_existing_output(work, capsys):
    run("merge", *TASKS, "-o", "m.safetensors", "-q")
    capsys.readouterr()
    run("merge", *TASKS, "-o", "m.safetensors", "--dry-run")
    assert "(exists: a real run needs --overwrite)" in capsys.readouterr().out
    run("compress", *TASKS, "-o", "m.safetensors", "--dry-run", expect=2)  # a store never replaces a file
    _one_line_error(capsys, "m.safetensors: is a file, and this output is a folder")
    run("compress", *TASKS, "-o", "store", "-q")
    capsys.readouterr()
    run("compress", *TASKS, "-o", "store", "--dry-run")  # a store tsv-fast wrote: replaced with --overwrite
    assert "(exists: a real run needs --overwrite)" in capsys.readouterr().out


def test_overwrite_refuses_a_folder_tsv_fast_did_not_write(work, capsys):
    (work / "results").mkdir()
    (work / "results" / "notes.txt").write_text("mine")
    run("merge", *TASKS, "-o", "results", "--overwrite", expect=2)
    _one_line_error(capsys, "results: is a folder tsv-fast did not write")
    assert (work / "results" / "notes.txt").read_text() == "mine"
    run("interference", *TASKS, "-o", "sti", "-q")
    run("interference", *TASKS, "-o", "sti", "-q", "--overwrite")  # its own report is replaced


def test_quiet_keeps_warnings(work, capsys):
    torch.save(torch.nn.Linear(2, 2), work / "model.pt")
    run("inspect", "model.pt", "--unsafe-pickle", "-q")
    assert "tsv-fast: warning: model.pt: loading with weights_only=False" in capsys.readouterr().err


def test_default_shard_size_limits_folders_only(work, capsys, monkeypatch):
    limits = []
    write = cli.write_safetensors

    def spy(out, *args, **kwargs):
        limits.append(kwargs["max_shard_bytes"])
        return write(out, *args, **kwargs)

    monkeypatch.setattr(cli, "write_safetensors", spy)
    run("merge", *TASKS, "-o", "m.safetensors", "-q")  # a 6 GB model must not be refused by a flag not given
    run("merge", *TASKS, "-o", "folder", "-q")
    assert limits == [None, writer.parse_size(cli.DEFAULT_SHARD_SIZE)]
    # a limit given for one file: the dry run refuses it as the real run does
    run("merge", *TASKS, "-o", "s.safetensors", "--max-shard-size", "100KB", "--dry-run", expect=2)
    _one_line_error(capsys, "s.safetensors: the output (596.0 KiB) is larger than the shard limit")


@pytest.mark.parametrize("flag, value, problem", [("--solver", "foo", "unknown solver 'foo'"),
                                                  ("--device", "tpu", "unknown device 'tpu'"),
                                                  ("--energy", "1.5", "--energy: expected a share in (0, 1]")])
def test_compress_dry_run_checks_the_settings(work, capsys, flag, value, problem):
    run("compress", *TASKS, "--dry-run", flag, value, expect=2)  # as the real run does
    _one_line_error(capsys, problem)


@pytest.mark.parametrize("options, problem", [
    (["--polar", "foo"], "tsv: polar must be one of"),
    (["--method", "ties", "--density", "2"], "density must be a number in (0, 1]")])
def test_merge_dry_run_checks_the_method_options(work, capsys, options, problem):
    """Option values are checked with the inputs, before any key: a dry run that passes must run."""
    run("merge", *TASKS, "-o", "m.safetensors", "--dry-run", *options, expect=2)
    _one_line_error(capsys, problem)
    run("merge", *TASKS, "-o", "m.safetensors", *options, expect=2)
    assert not os.path.exists("m.safetensors")


def test_interference_without_matplotlib_warns_in_the_cli_format(work, capsys, monkeypatch):
    """The PNGs are optional: without matplotlib the run still succeeds, says so as a
    'tsv-fast: warning:' line, and lists only the files it wrote."""
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **kw):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    run("interference", *TASKS, "-o", "sti")
    err = capsys.readouterr()
    assert "tsv-fast: warning: matplotlib is not installed" in err.err
    assert ".png" not in err.out and not [f for f in os.listdir("sti") if f.endswith(".png")]


@pytest.mark.parametrize("command", [["merge", *TASKS, "--method", "mean"], ["compress", *TASKS],
                                     ["interference", *TASKS]])
def test_a_folder_output_never_replaces_a_file_even_with_overwrite(work, capsys, command):
    """``-o notes.txt --overwrite`` used to turn the user's file into an output folder."""
    with open("notes.txt", "w") as f:
        f.write("mine")
    for extra in (["--overwrite"], ["--overwrite", "--dry-run"]):
        if command[0] == "interference" and "--dry-run" in extra:
            continue  # interference has no dry run
        run(*command, "-o", "notes.txt", *extra, expect=2)
        _one_line_error(capsys, "is a file, and this output is a folder")
    with open("notes.txt") as f:
        assert f.read() == "mine"


def test_an_output_inside_a_folder_input_is_refused(work, capsys):
    """A one-file folder input (or shards, or a store) is defined by what it holds: writing the
    merge into it would make it ambiguous as an input afterwards."""
    os.mkdir("ckpt")
    os.replace("base.safetensors", "ckpt/base.safetensors")
    run("merge", "ckpt", *TASKS[1:], "-o", "ckpt/merged.safetensors", expect=2)
    _one_line_error(capsys, "ckpt/merged.safetensors: is inside the input folder ckpt")
    assert os.listdir("ckpt") == ["base.safetensors"]
    run("merge", "ckpt", *TASKS[1:], "-o", "merged.safetensors", "-q")  # beside it: fine


# --- review fixes: the output writer -----------------------------------------------------------


def test_overwrite_replaces_only_its_own_output_of_the_same_kind(work, capsys):
    """A file named like a record is not enough (any tool writes a manifest.json): --overwrite
    replaces only an output tsv-fast wrote, of the same kind (a merge never replaces a store)."""
    os.mkdir("app")
    (work / "app" / "manifest.json").write_text('{"name": "my web app"}')
    (work / "app" / "index.html").write_text("mine")
    for command in (["merge", *TASKS], ["compress", *TASKS], ["interference", *TASKS]):
        run(*command, "-o", "app", "--overwrite", "-q", expect=2)
        _one_line_error(capsys, "app: ", "refusing to replace it, even with --overwrite")
    (work / "app" / "tsv_fast_merge.json").write_text("{}")
    run("merge", *TASKS, "-o", "app", "--overwrite", "-q", expect=2)
    _one_line_error(capsys, "app: its tsv_fast_merge.json is not a record tsv-fast wrote")
    assert sorted(os.listdir("app")) == ["index.html", "manifest.json", "tsv_fast_merge.json"]
    run("compress", *TASKS, "-o", "store", "-q")
    run("interference", *TASKS, "-o", "sti", "-q")
    run("merge", *TASKS, "-o", "merged", "-q")
    kinds = {"store": "a task store (its manifest.json)", "sti": "an STI report (its sti.json)",
             "merged": "a merged model (its tsv_fast_merge.json)"}
    for command, own in (("merge", "merged"), ("compress", "store"), ("interference", "sti")):
        for out, holds in kinds.items():
            before = listing(work / out)
            run(command, *TASKS, "-o", out, "--overwrite", "-q", expect=0 if out == own else 2)
            if out != own:
                _one_line_error(capsys, f"{out}: holds {holds}, and this output is")
                assert listing(work / out) == before
    run("merge", *TASKS, "-o", "store", "--overwrite", "--dry-run", expect=2)  # as the real run
    _one_line_error(capsys, "store: holds a task store")


@pytest.mark.parametrize("command, out", [(["merge", *TASKS, "--method", "mean"], "merged"),
                                          (["compress", *TASKS], "store"), (["interference", *TASKS], "sti")])
def test_overwrite_checks_the_output_again_before_replacing_it(work, capsys, monkeypatch, command, out):
    """The ownership check ran only before the work: an output replaced meanwhile by a user's
    folder was deleted by the final replace."""
    run(*command, "-o", out, "-q")
    check_output = cli.check_output

    def check_then_swap(path, *args, **kwargs):  # the check passes, then the target changes
        check_output(path, *args, **kwargs)
        for p in (work / out).iterdir():
            p.unlink()
        (work / out / "notes.txt").write_text("mine")

    monkeypatch.setattr(cli, "check_output", check_then_swap)
    run(*command, "-o", out, "--overwrite", "-q", expect=2)
    _one_line_error(capsys, f"{out}: is a folder tsv-fast did not write", "refusing to replace it")
    assert listing(work / out) == ["notes.txt"] and (work / out / "notes.txt").read_text() == "mine"
    assert not [name for name in os.listdir(work) if name.startswith(".")]  # nothing staged left


def test_the_record_beside_a_file_output_gets_the_output_checks(work, capsys):
    """``-o X.safetensors`` also writes X.safetensors.json: it must not replace an input, a
    user's file or folder of that name, even with --overwrite; only its own earlier record."""
    (work / "in.safetensors.json").write_bytes((work / "t2.safetensors").read_bytes())  # a task, oddly named
    run("merge", *TASKS[:3], "in.safetensors.json", "-o", "in.safetensors", "--overwrite", expect=2)
    _one_line_error(capsys, "in.safetensors.json: is one of the inputs")
    (work / "notes.safetensors.json").write_text('{"mine": true}')
    for extra in ([], ["--overwrite"], ["--overwrite", "--dry-run"]):
        run("merge", *TASKS, "-o", "notes.safetensors", *extra, expect=2)
        _one_line_error(capsys, "notes.safetensors.json: ", "--overwrite")
    os.mkdir("dir.safetensors.json")
    run("merge", *TASKS, "-o", "dir.safetensors", "--overwrite", expect=2)
    _one_line_error(capsys, "dir.safetensors.json: is a folder, and this output is a file")
    os.mkdir("folder.safetensors")
    run("merge", *TASKS, "-o", "folder.safetensors", "--overwrite", expect=2)
    _one_line_error(capsys, "folder.safetensors: is a folder, and this output is a file")
    assert (work / "notes.safetensors.json").read_text() == '{"mine": true}'
    assert (work / "in.safetensors.json").read_bytes() == (work / "t2.safetensors").read_bytes()
    assert not os.path.exists("in.safetensors") and not os.path.exists("notes.safetensors")
    run("merge", *TASKS, "-o", "m.safetensors", "-q")
    run("merge", *TASKS, "-o", "m.safetensors", "-q", "--overwrite", "--method", "mean")  # its own record
    assert json.loads((work / "m.safetensors.json").read_text())["method"] == "mean"


@pytest.mark.parametrize("argv, file", [(["merge", *TASKS, "-o", "m.safetensors"], "m.safetensors.json"),
                                        (["merge", *TASKS, "-o", "m", "--max-shard-size", "100KB"],
                                         "m/model.safetensors.index.json"),
                                        (["merge", *TASKS, "-o", "m", "--method", "mean"], "m/tsv_fast_merge.json"),
                                        (["interference", *TASKS, "-o", "sti"], "sti/sti.json")])
def test_a_full_disk_writing_a_json_file_names_it(work, capsys, monkeypatch, argv, file):
    """ENOSPC carries no file name: it was 'unexpected OSError' (exit 1), naming no file."""
    real = type(work).write_text

    def disk_full(path, *args, **kwargs):
        if path.name == os.path.basename(file):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(type(work), "write_text", disk_full)
    before = listing(work)
    run(*argv, "-q", expect=2)
    _one_line_error(capsys, f"error: {file}: cannot write: No space left on device")
    assert listing(work) == before


def test_sighup_leaves_nothing_unless_ignored(work, capsys, monkeypatch):
    """A closed terminal (SIGHUP) unwinds like Ctrl-C; under nohup (SIGHUP ignored) the run goes on."""
    real = writer._write_tensor

    def hangup_then_write(f, tensor):
        os.kill(os.getpid(), signal.SIGHUP)
        real(f, tensor)

    monkeypatch.setattr(writer, "_write_tensor", hangup_then_write)
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal, whatever runs the tests
    try:
        before = listing(work)
        run("merge", *TASKS, "-o", "m", expect=130)
        assert "interrupted" in capsys.readouterr().err and listing(work) == before
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # restored after the command
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
        run("merge", *TASKS, "-o", "m", "-q")
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert open_checkpoint(work / "m").keys() == load_file(work / "base.safetensors").keys()


def test_stale_staging_folders_of_a_killed_run_are_removed(work):
    """A run killed outright (SIGKILL) leaves its staging folder; the next run of the same output
    removes it when it is clearly stale: our name, this machine, a process that is gone."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = work / (writer._stage_prefix(work / "m.safetensors", gone.pid) + "x1y2z3")
    alive = work / (writer._stage_prefix(work / "m.safetensors", os.getppid()) + "a1b2c3")
    old_style = work / ".m.safetensors.tsv-fast-tmp-k3j4h5g6"  # no process in its name: left alone
    other = work / (writer._stage_prefix(work / "other.safetensors", gone.pid) + "x1y2z3")
    for folder in (stale, alive, old_style, other):
        folder.mkdir()
        (folder / "m.safetensors").write_bytes(b"partial")
    run("merge", *TASKS, "-o", "m.safetensors", "-q")
    assert not stale.exists() and alive.exists() and old_style.exists() and other.exists()


def test_hard_links_and_a_store_beside_its_source_are_given_twice(work, capsys):
    (work / "copy.safetensors").write_bytes((work / "t0.safetensors").read_bytes())
    os.link(work / "copy.safetensors", work / "hard.safetensors")
    run("merge", "base.safetensors", "copy.safetensors", "t1.safetensors", "hard.safetensors", "-o", "m.safetensors",
        expect=2)
    _one_line_error(capsys, "hard.safetensors: given twice (also as copy.safetensors)")
    run("compress", "base.safetensors", "copy.safetensors", "hard.safetensors", "-o", "s", expect=2)
    _one_line_error(capsys, "hard.safetensors: given twice")
    run("compress", *TASKS[:3], "-o", "store", "-q")  # t0 and t1, compressed
    run("merge", "base.safetensors", "store", "t2.safetensors", "copy.safetensors", "-o", "m.safetensors", expect=2)
    _one_line_error(capsys, "copy.safetensors: given twice (also as store:t0, compressed from it)")
    run("compress", "base.safetensors", "t1.safetensors", "t2.safetensors", "-o", "store2", "-q")
    run("merge", "base.safetensors", "store", "store2", "-o", "m.safetensors", expect=2)
    _one_line_error(capsys, "store2: task 't1' was compressed from the same checkpoint as store:t1")
    assert not (work / "m.safetensors").exists()


def test_ddp_prefix_follows_the_base_whatever_the_format(work, small_base, small_tasks, capsys):
    """``module.`` (DistributedDataParallel) was removed from .pt files only: a DDP safetensors
    task failed with missing keys, and a DDP .pt base renamed the output's keys."""
    ddp = lambda state: {f"module.{k}": v for k, v in state.items()}  # noqa: E731
    torch.save(ddp(small_tasks[1]), work / "ddp_t1.pt")
    save_file(ddp(small_tasks[2]), work / "ddp_t2.safetensors")
    torch.save({"state_dict": ddp(small_base)}, work / "ddp_base.pt")
    save_file(ddp(small_tasks[0]), work / "ddp_t0.safetensors")
    expected = tsv_fast.merge_layers(small_base, small_tasks[:3])
    run("merge", "base.safetensors", "t0.safetensors", "ddp_t1.pt", "ddp_t2.safetensors", "-o", "a.safetensors", "-q")
    out = load_file("a.safetensors")
    assert set(out) == set(small_base) and all(torch.allclose(out[k], expected[k], atol=1e-6) for k in out)
    run("merge", "ddp_base.pt", "ddp_t0.safetensors", "t1.safetensors", "ddp_t2.safetensors", "-o", "b.safetensors",
        "-q")
    out = load_file("b.safetensors")
    assert set(out) == {f"module.{k}" for k in small_base}
    assert all(torch.allclose(out[f"module.{k}"], expected[k], atol=1e-6) for k in expected)
    run("merge", "base.safetensors", "ddp_t0.safetensors", "ddp_t1.pt", "t2.safetensors", "-o", "c.safetensors",
        "--prefix", "visual.transformer.", "-q")  # --prefix sees past module. in a DDP checkpoint
    assert set(load_file("c.safetensors")) == {k for k in small_base if k.startswith("visual.transformer.")}
    run("inspect", "ddp_t2.safetensors", "--base", "base.safetensors", "--num-tasks", "3", "-q")
    assert "energy on average" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["merge", *TASKS, "-o", "m.safetensors", "--device", "meta"], ["--device meta: not supported here"]),
    (["merge", *TASKS, "-o", "m.safetensors", "--device", "mps"], ["--device mps: not supported here"]),
    (["compress", *TASKS, "-o", "s", "--device", "meta"], ["--device meta: not supported here"]),
    (["merge", *TASKS, "-o", "m.safetensors", "--alpha", "1e39"], ["field 'alpha'", "float32 range", "1e+39"]),
    (["merge", *TASKS, "-o", "m.safetensors", "--alpha=-1e39"], ["field 'alpha'", "float32 range"])])
def test_unusable_device_or_alpha_is_a_usage_error(work, capsys, argv, words):
    """They failed as 'unexpected' errors (exit 1) once the work had begun."""
    if "mps" in argv and torch.backends.mps.is_available():
        pytest.skip("mps is available here")
    run(*argv, expect=2)
    _one_line_error(capsys, *words)
    assert listing(work) == sorted(TASKS)


def test_inspect_base_with_num_tasks_1(work, capsys):
    """--num-tasks 1 was refused with 'give --num-tasks T', which it had given."""
    run("inspect", "t0.safetensors", "--base", "base.safetensors", "--num-tasks", "1", "-q")
    assert "at k = floor(r/1)" in capsys.readouterr().out
    run("inspect", "t0.safetensors", "--base", "base.safetensors", expect=2)
    _one_line_error(capsys, "inspect --base with one file: give --num-tasks T")


@pytest.mark.parametrize("argv", [["compress", "base.safetensors", "store", "t2.safetensors", "-o", "s2"],
                                  ["interference", "base.safetensors", "store", "t2.safetensors", "-o", "r"],
                                  ["merge", "store", "t1.safetensors", "t2.safetensors", "-o", "m.safetensors"],
                                  ["inspect", "store"], ["inspect", "t0.safetensors", "--base", "store"]])
def test_a_task_store_where_a_checkpoint_is_expected_is_named(work, capsys, argv):
    """A store of one task was read as a checkpoint (its factors as weights); of several, the
    error spoke of '.safetensors files' and an index."""
    run("compress", "base.safetensors", "t0.safetensors", "-o", "store", "--rank", "2", "-q")
    run(*argv, expect=2)
    _one_line_error(capsys, "store: is a task store (a folder with manifest.json), not a checkpoint")


# --- review 2: duplicate inputs told apart from distinct ones ------------------------------------


def test_files_are_told_apart_where_inode_numbers_are_zero(work, capsys, monkeypatch):
    """Where st_ino is 0 (some FUSE, network or Windows file systems) every file had the same
    (device, inode): any two inputs were 'given twice'. The real path tells them apart there."""
    class NoInodes:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def stat(path, *args, **kwargs):
            st = os.stat(path, *args, **kwargs)
            return type("Stat", (), {"st_dev": st.st_dev, "st_ino": 0})()

    run("compress", *TASKS[:3], "-o", "store", "-q")
    run("compress", "base.safetensors", "t2.safetensors", "-o", "store2", "--rank", "2", "-q")
    monkeypatch.setattr(cli, "os", NoInodes())
    run("merge", *TASKS, "-o", "m.safetensors", "-q")
    run("merge", "base.safetensors", "store", "store2", "-o", "s.safetensors", "-q")
    os.symlink("t0.safetensors", "again.safetensors")  # the same file by another path: still refused
    run("merge", *TASKS, "again.safetensors", "-o", "m2.safetensors", expect=2)
    _one_line_error(capsys, "again.safetensors: given twice (also as t0.safetensors)")


def test_checkpoints_sharing_their_first_and_last_mib_are_distinct_tasks(work, small_base, small_tasks, capsys):
    """A store's source is recorded by a fingerprint of each file's first and last MiB, which
    fine-tunes that left those weights frozen share: two such tasks compressed into one store
    could not be merged at all ('compressed from the same checkpoint'). Their deltas tell them
    apart; a real duplicate is still refused."""
    frozen = {"aaa.frozen": torch.zeros(300_000), "zzz.frozen": torch.ones(300_000)}  # first, last in the file
    save_file({**small_base, **frozen}, "fbase.safetensors")
    for i in range(3):
        save_file({**small_tasks[i], **frozen}, f"f{i}.safetensors")
    same = {tsv_fast.checkpoints.fingerprint(f"f{i}.safetensors")["sha256_head_tail"] for i in range(3)}
    assert len(same) == 1  # what made them 'the same checkpoint'
    run("compress", "fbase.safetensors", "f0.safetensors", "f1.safetensors", "-o", "store", "-q")
    run("merge", "fbase.safetensors", "store", "-o", "a.safetensors", "-q")
    run("merge", "fbase.safetensors", "store", "f2.safetensors", "-o", "b.safetensors", "-q")
    (work / "copy.safetensors").write_bytes((work / "f1.safetensors").read_bytes())
    run("merge", "fbase.safetensors", "store", "copy.safetensors", "-o", "c.safetensors", expect=2)
    _one_line_error(capsys, "copy.safetensors: given twice (also as store:f1, compressed from it)")
    run("compress", "fbase.safetensors", "f1.safetensors", "f2.safetensors", "-o", "store2", "-q", "--dtype", "bf16")
    run("merge", "fbase.safetensors", "store", "store2", "-o", "c.safetensors", expect=2)
    _one_line_error(capsys, "store2: task 'f1' was compressed from the same checkpoint as store:f1")


# --- review 2: the staging folder of a run in progress ------------------------------------------


@pytest.mark.parametrize("name, folder", [("m.safetensors", False), ("m", True)])
def test_a_staging_folder_in_use_is_kept_whatever_its_process_id_says(tmp_path, monkeypatch, name, folder):
    """A process id is no proof a run is gone: in another PID namespace (containers sharing the
    output folder and the host name) it names another process, or none. A concurrent run of the
    same output deleted the staging folder of a run in progress; its lock now keeps it."""
    out = tmp_path / name
    with writer.staged_output(out, folder=folder, overwrite=False) as stage:
        (stage / "model.safetensors").write_bytes(b"partial")
        with monkeypatch.context() as m:
            m.setattr(writer, "_alive", lambda pid: False)  # as another PID namespace sees it
            writer._remove_stale_stages(out)
        assert (stage / "model.safetensors").exists()
    assert (out / "model.safetensors" if folder else tmp_path / "model.safetensors").read_bytes() == b"partial"
    killed = tmp_path / (writer._stage_prefix(out, 999_999_999) + "abc123")  # no lock, no process: stale
    killed.mkdir()
    monkeypatch.setattr(writer, "_alive", lambda pid: False)
    writer._remove_stale_stages(out)
    assert not killed.exists()


def test_a_ddp_save_of_a_model_whose_keys_start_with_module_pairs_with_it(work, small_base, small_tasks):
    """A wrapper model's own keys may all start with ``module.``; saved from DDP they read
    ``module.module.*``. Both sides looked 'DDP', so nothing was renamed and every key was missing."""
    wrap = lambda state, prefix: {prefix + k: v for k, v in state.items()}  # noqa: E731
    save_file(wrap(small_base, "module."), "wbase.safetensors")
    save_file(wrap(small_tasks[0], "module."), "w0.safetensors")
    save_file(wrap(small_tasks[1], "module.module."), "w1.safetensors")
    torch.save(wrap(small_tasks[2], "module.module."), "w2.pt")
    run("merge", "wbase.safetensors", "w0.safetensors", "w1.safetensors", "w2.pt", "-o", "m.safetensors", "-q")
    out = load_file("m.safetensors")
    expected = tsv_fast.merge_layers(small_base, small_tasks[:3])
    assert set(out) == {f"module.{k}" for k in small_base}
    assert all(torch.allclose(out[f"module.{k}"], expected[k], atol=1e-6) for k in expected)

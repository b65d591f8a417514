"""Smoke run of `make demo`'s job on a tiny tower: files and schema, not numbers."""

import json
import os

import pytest
import torch

from tsv_fast import demo
from tsv_fast.errors import TSVRankWarning
from tsv_fast.interference import Interference
from tsv_fast.plots import plot_sti_heatmap


def test_demo_writes_summary_and_plot(tmp_path, capsys):
    summary = demo.main(["--width", "64", "--layers", "2", "--tasks", "3", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "demo_synthetic.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["tasks"] == ["task0", "task1", "task2"]
    assert {"tsv_c", "tsv_m_from_factors", "sti_from_factors", "task_arithmetic", "ties", "mean"} <= set(saved["timings_s"])
    assert saved["shapes"]["256x64"] == {"keys": 2, "r": 64, "k_per_task": 21, "merged_rank": 63,
                                         "tsv_c_energy_kept": saved["shapes"]["256x64"]["tsv_c_energy_kept"]}
    assert 0 < saved["shapes"]["256x64"]["tsv_c_energy_kept"] < 1
    assert set(saved["sti_by_block"]) >= {"visual.transformer.resblocks.0", "visual.transformer.resblocks.1"}
    assert (tmp_path / "demo_sti.png").stat().st_size > 10_000
    assert "STI (singular task interference) per block" in capsys.readouterr().out


def test_a_failed_rerun_keeps_the_previous_json(tmp_path, monkeypatch):
    """demo_synthetic.json was written in place: a failure part-way left a truncated file."""
    argv = ["--width", "64", "--layers", "1", "--tasks", "2", "--out", str(tmp_path)]
    demo.main(argv)
    before = (tmp_path / "demo_synthetic.json").read_bytes()
    write_text = type(tmp_path).write_text

    def full_disk(self, data, *args, **kwargs):
        write_text(self, data[:len(data) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(type(tmp_path), "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        demo.main(argv + ["--seed", "1"])
    monkeypatch.undo()
    assert (tmp_path / "demo_synthetic.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_sti.png", "demo_synthetic.json"]  # no temp file


def test_a_failed_plot_keeps_the_previous_png(tmp_path, monkeypatch):
    """PNGs were written in place: a failure part-way left half a file."""
    matplotlib = pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    report = Interference(["a", "b"], {"visual.transformer.resblocks.0.attn.in_proj_weight": 1.0},
                          {"visual.transformer.resblocks.0.attn.in_proj_weight": torch.tensor([[0.0, 1.0], [1.0, 0.0]])})
    path = tmp_path / "sti.png"
    assert plot_sti_heatmap(report, path) == path
    before = path.read_bytes()
    savefig = Figure.savefig

    def full_disk(self, fname, *args, **kwargs):
        savefig(self, fname, *args, **kwargs)
        with open(fname, "r+b") as f:
            f.truncate(len(before) // 2)
        raise OSError(28, "No space left on device", str(fname))

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(OSError, match="No space left"):
        plot_sti_heatmap(report, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["sti.png"]
    assert matplotlib.pyplot.get_fignums() == []  # the figure was closed anyway


@pytest.mark.parametrize("width, tasks", [(64, 51), (32, 33)])
def test_more_tasks_than_a_key_has_rank(tmp_path, width, tasks):
    """A key with r < T gets k = 0 (a warning, no factors): the summary crashed with a KeyError on its
    missing factors and, when every key had k = 0, with a ValueError on the empty STI table."""
    with pytest.warns(TSVRankWarning):
        summary = demo.main(["--width", str(width), "--layers", "1", "--tasks", str(tasks), "--out", str(tmp_path)])
    pos = summary["shapes"][f"50x{width}"]
    assert pos["k_per_task"] == 0 and pos["tsv_c_energy_kept"] == 0.0
    assert (tmp_path / "demo_synthetic.json").is_file()
    if width == 64:
        assert summary["shapes"]["256x64"]["k_per_task"] == 1 and summary["shapes"]["256x64"]["tsv_c_energy_kept"] > 0
        assert (tmp_path / "demo_sti.png").is_file()
    else:
        assert summary["sti_by_block"] == {} and not (tmp_path / "demo_sti.png").exists()


@pytest.mark.parametrize("option, value, words", [
    ("--width", "0", "argument --width: expected an integer >= 1, got '0'"),
    ("--width", "-5", "argument --width: expected an integer >= 1, got '-5'"),
    ("--width", "200", "argument --width: 200 is not divisible into its 3 attention heads"),
    ("--layers", "0", "argument --layers: expected an integer >= 1, got '0'"),
    ("--layers", "-1", "argument --layers: expected an integer >= 1, got '-1'"),
    ("--layers", "13", "argument --layers: ViT-B-32 has 12 blocks, got 13"),
    ("--tasks", "1", "argument --tasks: expected an integer >= 2, got 1"),
    ("--tasks", "x", "argument --tasks: invalid int value: 'x'"),
    ("--seed", "-1", "argument --seed: expected an integer from 0 to 9223372036854775807, got '-1'"),
    ("--seed", str(2**64), f"argument --seed: expected an integer from 0 to 9223372036854775807, got '{2**64}'"),
    ("--device", "bogus", "--device: unknown device 'bogus'"),
])
def test_bad_sizes_are_usage_errors_before_any_work(tmp_path, monkeypatch, capsys, option, value, words):
    """--width 0 / --layers 0 silently meant the full ViT-B/32 (minutes of work), negative sizes and
    a width its heads cannot divide failed with tracebacks deep in open_clip or torch, a too large
    seed after the tower was built, an unknown device after too."""
    monkeypatch.setattr(demo, "clip_vit_base", lambda *a, **k: pytest.fail("work started"))
    argv = ["--width", "64", "--layers", "1", "--tasks", "2", "--out", str(tmp_path / "out"), option, value]
    with pytest.raises(SystemExit) as exc:
        demo.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("tsv-fast: error: ") and err.count("\n") == 1, err
    assert words in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, words", [
    ("a file", "argument --out: {out} is a file; --out names a folder"),
    ("under a file", "argument --out: {out}/demo_synthetic.json: cannot write: {parent} is not a folder"),
    ("a folder in the way", "argument --out: {out}/demo_sti.png: is a folder, and this output is a file"),
])
def test_a_bad_out_is_a_usage_error_before_any_work(tmp_path, monkeypatch, capsys, case, words):
    """--out naming a file failed only after all the work, with a FileExistsError traceback;
    a folder named like an output file, with an IsADirectoryError after the JSON was written."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    out = {"a file": notes, "under a file": notes / "sub", "a folder in the way": tmp_path / "results"}[case]
    if case == "a folder in the way":
        (out / "demo_sti.png").mkdir(parents=True)
    monkeypatch.setattr(demo, "clip_vit_base", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(SystemExit) as exc:
        demo.main(["--width", "64", "--layers", "1", "--tasks", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("tsv-fast: error: ") and err.count("\n") == 1, err
    assert words.format(out=out, parent=notes) in err
    assert notes.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["notes.txt"] + (["results"] if case == "a folder in the way" else []))
    if case == "a folder in the way":
        assert os.listdir(out) == ["demo_sti.png"]

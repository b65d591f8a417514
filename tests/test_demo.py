"""Smoke run of `make demo`'s job on a tiny tower: files and schema, not numbers."""

import json

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

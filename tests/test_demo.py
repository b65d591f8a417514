"""Smoke run of `make demo`'s job on a tiny tower: files and schema, not numbers."""

import json

from tsv_fast import demo


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

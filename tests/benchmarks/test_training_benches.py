"""The training benchmarks run end to end in their quick form and write what the README and
the checks read."""

from __future__ import annotations

import json

import pytest

from benchmarks import run_benchmark


def test_filter_bench_quick_writes_json_and_plots(tmp_path):
    result = run_benchmark("filter", quick=True, out=tmp_path)
    saved = json.loads((tmp_path / "filter.json").read_text())
    assert saved["speedup"] == result["speedup"]
    for run in ("plain", "filtered"):
        assert {"final_accuracy", "time_to_target_s", "final_val_loss", "epochs"} <= set(
            saved[run])
    assert saved["plain"]["time_to_target_s"] is not None  # plain reaches its own final acc
    assert {"task", "num_samples", "seed", "target_accuracy", "accuracy_gap_points"} <= set(saved)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "filter_accuracy.png", "filter_kept.png", "filter_loss.png"]


@pytest.mark.slow
def test_distributed_bench_quick_writes_json(tmp_path):
    run_benchmark("distributed", quick=True, out=tmp_path)
    saved = json.loads((tmp_path / "distributed.json").read_text())
    assert saved["workers"] == 2
    for run in ("plain", "hardbatch"):
        assert {"final_accuracy", "time_to_target_s"} <= set(saved[run])
    assert "speedup" in saved and saved["hardbatch"]["final_kept_fraction"] < 1

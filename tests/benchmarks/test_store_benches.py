"""Smoke runs of the loss-store benchmarks (--quick), through the `hardbatch bench` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from benchmarks import BENCHMARKS
from hardbatch.cli import main


@pytest.mark.parametrize(
    "name, key",
    [("ingest", "sample_losses_per_s"), ("stream-overhead", "overhead_ratio"),
     ("store-memory", "bytes_per_sample")],
)
def test_quick_bench_writes_its_figure(name: str, key: str, tmp_path: Path) -> None:
    assert name in BENCHMARKS
    res = CliRunner().invoke(main, ["bench", name, "--quick", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert data["quick"] is True and data[key] > 0
    assert isinstance(data["passes"], bool)


def test_store_memory_quick_is_within_the_bar(tmp_path: Path) -> None:
    # Memory does not depend on machine load, so even the quick run must meet the bar.
    from benchmarks.store_memory import run

    assert run(quick=True, out=tmp_path)["bytes_per_sample"] <= 24

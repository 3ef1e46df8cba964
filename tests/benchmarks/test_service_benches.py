"""Smoke runs of the service benchmarks (`--quick`): they run end to end and report their keys."""

from __future__ import annotations

import json

from benchmarks import BENCHMARKS, run_benchmark


def test_plan_quick(tmp_path):
    assert BENCHMARKS["plan"] == "benchmarks.plan"
    r = run_benchmark("plan", quick=True, out=tmp_path)
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["table_size"] == r["table_size"] == 1_000_000
    assert 0 < saved["p50_ms"] <= saved["p99_ms"]
    assert saved["http"]["p50_ms"] > 0


def test_lookup_load_quick(tmp_path):
    r = run_benchmark("lookup-load", quick=True, out=tmp_path)
    saved = json.loads((tmp_path / "lookup-load.json").read_text())
    assert set(saved) >= {"requests_per_s", "p99_ms", "errors"}
    assert r["errors"] == 0 and r["requests"] > 0 and r["requests_per_s"] > 0

"""`hardbatch bench faults --quick`: a worker killed mid-run on 2 Ray workers, then 30 runs
behind one service and /healthz with Redis stopped; writes the keys issue 12's bars read."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks import run_benchmark

pytestmark = pytest.mark.slow


def test_quick_faults_bench_applies_every_record_once(tmp_path):
    token_before = os.environ.get("HARDBATCH_API_TOKEN")
    r = run_benchmark("faults", quick=True, out=tmp_path)
    # its token must not reach the services of the tests after it (they have none: 401)
    assert os.environ.get("HARDBATCH_API_TOKEN") == token_before
    assert json.loads((tmp_path / "faults.json").read_text())["quick"] is True
    kill = r["worker_kill"]
    assert set(kill) >= {"finished", "records_expected", "records_applied", "final_accuracy"}
    assert kill["finished"], kill
    assert kill["resumed_at_epochs"], "the group did not resume from a checkpoint"
    assert kill["superseded_records"] > 0, "nothing was trained twice: the fault came too late"
    assert kill["records_applied"] == kill["records_expected"], kill
    # The workers' own count, not a formula: it can only fall short of the plans' slots.
    assert 0 < kill["records_expected"] <= kill["records_slots"], kill
    assert 0.0 <= kill["final_accuracy"] <= 1.0
    assert r["many_runs"]["requests"] == 200
    assert r["many_runs_5xx"] == 0, r["many_runs"]
    assert r["healthz_p99_ms_redis_stalled"] < 50, r["healthz_redis_stalled"]

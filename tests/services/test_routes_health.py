"""/healthz, /readyz and /metrics on a live service."""

from __future__ import annotations

import httpx


def test_healthz(service):
    r = httpx.get(service.url + "/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_readyz_lists_loaded_runs(service, filled):
    run, _ = filled
    r = httpx.get(service.url + "/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["ready"] and body["redis"] and body["runs"][run] == "ready"


def test_metrics_exposes_ingest_plans_and_hardness(service, filled):
    run, table = filled
    with service.client() as c:
        c.post(f"/v1/runs/{run}/plans", json={"rank": 0, "world_size": 1, "round": 900,
                                               "batches": 1, "batch_size": 8})
        text = c.get("/metrics").text
    assert f'hardbatch_ingest_records_total{{run="{run}"}} {table.applied}' in text
    assert f'hardbatch_ingest_lag_records{{run="{run}"}} 0' in text
    assert 'hardbatch_plan_latency_seconds_bucket{run="demo",le="+Inf"}' in text
    assert f'hardbatch_hardness_quantile{{run="{run}",quantile="0.5"}}' in text
    assert "hardbatch_ingest_rate_records_per_second" in text
    kept = [ln for ln in text.splitlines() if ln.startswith("hardbatch_kept_fraction{")]
    expected = table.kept.sum() / table.seen.sum()
    assert kept and abs(float(kept[0].split()[-1]) - expected) < 1e-9

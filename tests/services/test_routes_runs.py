"""/v1/runs and /v1/runs/{run} (and its plan config) on a live service."""

from __future__ import annotations

import httpx


def test_list_runs(service, filled):
    run, table = filled
    body = httpx.get(service.url + "/v1/runs").json()
    (mine,) = [r for r in body["runs"] if r["run"] == run]
    assert mine["num_samples"] == table.size and mine["ready"]
    assert mine["records"] == table.applied and mine["lag_records"] == 0


def test_run_detail_has_counters_and_stats(service, filled):
    run, table = filled
    with service.client() as c:
        c.post(f"/v1/runs/{run}/plans", json={"rank": 1, "world_size": 2, "round": 7,
                                               "batches": 2, "batch_size": 16})
        d = c.get(f"/v1/runs/{run}").json()
    assert d["num_samples"] == 5000 and d["ready"]
    assert d["records"] == table.applied == d["applied_records"]
    assert d["lag_records"] == 0 and d["rejected_records"] == 0
    assert d["seen_samples"] == int((table.seen > 0).sum())
    assert abs(d["kept_fraction"] - table.kept.sum() / table.seen.sum()) < 1e-9
    assert d["world_size"] == 2 and d["round"] == 7
    listed = httpx.get(service.url + "/v1/runs").json()["runs"]
    assert {"run": run, "world_size": 2, "round": 7}.items() <= next(
        r for r in listed if r["run"] == run).items()
    assert set(d["hardness_quantiles"]) == {"0.5", "0.9", "0.99"}
    assert d["plan_config"]["alpha"] == 1.0


def test_unknown_and_malformed_runs(service):
    assert httpx.get(service.url + "/v1/runs/no-such-run").status_code == 404
    r = httpx.get(service.url + "/v1/runs/bad%20name!")
    assert r.status_code == 422


def test_plan_config_roundtrip(service, filled, store, fill):
    fill(store, "cfgrun", 100, batches=1, per_batch=10)
    service.wait_ready(runs=("cfgrun",))
    with service.client() as c:
        assert c.get("/v1/runs/cfgrun/plan-config").json()["lam"] == 0.1
        new = {"alpha": 2.0, "lam": 0.2, "beta": 0.5, "anneal_frac": 0.25, "total_rounds": 40,
               "size_factor": 4.0, "size_mass": 0.8, "size_min": 0.1}
        r = c.put("/v1/runs/cfgrun/plan-config", json=new)
        assert r.status_code == 200, r.text
        got = c.get("/v1/runs/cfgrun/plan-config").json()
        assert {k: got[k] for k in new} == new
        # Cross-field rule from PlanConfig: annealing needs total_rounds.
        bad = c.put("/v1/runs/cfgrun/plan-config", json={"anneal_frac": 0.5})
        assert bad.status_code == 422 and "total_rounds" in bad.json()["detail"]
        assert c.put("/v1/runs/cfgrun/plan-config", json={"alpha": -1}).status_code == 422
        assert c.put("/v1/runs/nope/plan-config", json={}).status_code == 404
    # The config lives in Redis: a new service process sees it.
    assert store.client.hget("hb:{cfgrun}:plan_config", "alpha") == b"2.0"

"""Per-sample hardness routes against a live service, checked against an in-process table."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from hardbatch.sampler.hardness import HardnessTable, suspect_reference
from hardbatch.sampler.plans import PlanConfig
from hardbatch.sampler.records import pack
from hardbatch.services.client import SamplerClient
from hardbatch.services.store import LossStore


def test_one_sample_matches_the_table(service, filled):
    run, table = filled
    seen_id = int(np.flatnonzero(table.seen)[0])
    unseen_id = int(np.flatnonzero(table.seen == 0)[0])
    with service.client() as c:
        rec = c.get(f"/v1/runs/{run}/samples/{seen_id}").json()
        assert rec == {
            "id": seen_id, "seen": int(table.seen[seen_id]), "kept": int(table.kept[seen_id]),
            "last_loss": float(table.last_loss[seen_id]), "ema": float(table.ema[seen_id]),
            "last_step": int(table.last_step[seen_id]),
            "last_round": int(table.last_round[seen_id]),
            "suspect": False,
        }
        rec = c.get(f"/v1/runs/{run}/samples/{unseen_id}").json()
        assert rec == {"id": unseen_id, "seen": 0, "kept": 0, "last_loss": None, "ema": None,
                       "last_step": None, "last_round": None, "suspect": False}


@pytest.mark.parametrize("path", ["samples/5000", "samples/-1", "samples/abc",
                                  "samples/99999999999999999999999"])
def test_bad_sample_ids_are_4xx(service, filled, path):
    run, _ = filled
    r = httpx.get(f"{service.url}/v1/runs/{run}/{path}")
    assert r.status_code in (404, 422), r.text
    assert r.json()["detail"]


@pytest.mark.parametrize(("order", "by"), [("hardest", "ema"), ("easiest", "ema"),
                                           ("hardest", "last_loss")])
def test_top_k(service, filled, order, by):
    run, table = filled
    body = httpx.get(f"{service.url}/v1/runs/{run}/samples",
                     params={"order": order, "limit": 25, "by": by}).json()
    values = getattr(table, by)
    seen = np.flatnonzero(table.seen)
    ranked = sorted(values[seen].tolist(), reverse=order == "hardest")[:25]
    got = [s[by] for s in body["samples"]]
    assert got == pytest.approx(ranked)
    assert [values[s["id"]] for s in body["samples"]] == pytest.approx(got)


def test_top_k_bounds(service, filled):
    run, _ = filled
    base = f"{service.url}/v1/runs/{run}/samples"
    assert httpx.get(base, params={"limit": 10_001}).status_code == 422
    assert httpx.get(base, params={"limit": 0}).status_code == 422
    assert httpx.get(base, params={"order": "middle"}).status_code == 422
    # More than were scored: all scored samples, no error.
    body = httpx.get(base, params={"limit": 10_000}).json()
    assert len(body["samples"]) == int((filled[1].seen > 0).sum())


def test_lookup_many(service, filled):
    run, table = filled
    ids = [0, 4999, 17, 17, 1234]
    with service.client() as c:
        body = c.post(f"/v1/runs/{run}/samples/lookup", json={"ids": ids}).json()
        assert body["ids"] == ids
        assert body["seen"] == table.seen[ids].tolist()
        for j, i in enumerate(ids):
            expect = float(table.ema[i]) if table.seen[i] else None
            assert body["ema"][j] == expect
        r = c.post(f"/v1/runs/{run}/samples/lookup", json={"ids": [1, 5000, -3]})
        assert r.status_code == 422 and "outside [0, 5000)" in r.json()["detail"]
        assert c.post(f"/v1/runs/{run}/samples/lookup", json={"ids": []}).status_code == 422
        assert c.post(f"/v1/runs/{run}/samples/lookup", json={"x": 1}).status_code == 422
        assert c.post(f"/v1/runs/{run}/samples/lookup", content=b"{not json").status_code == 422


def test_histogram(service, filled):
    run, table = filled
    body = httpx.get(f"{service.url}/v1/runs/{run}/histogram", params={"bins": 7}).json()
    seen = table.seen > 0
    counts, edges = np.histogram(table.ema[seen], bins=7,
                                 range=(table.ema[seen].min(), table.ema[seen].max()))
    assert body["counts"] == counts.tolist()
    assert body["edges"] == pytest.approx(edges.tolist())
    assert body["seen"] == int(seen.sum()) and body["unseen"] == int((~seen).sum())
    bad = httpx.get(f"{service.url}/v1/runs/{run}/histogram", params={"bins": 10**6})
    assert bad.status_code == 422


def test_unknown_run_everywhere_is_404(service):
    for path in ["samples/1", "samples", "histogram"]:
        assert httpx.get(f"{service.url}/v1/runs/ghost/{path}").status_code == 404


# -- the noise guard ------------------------------------------------------------------------

def _fill_noisy(store: LossStore, run: str) -> tuple[HardnessTable, set[int]]:
    """1000 samples over 6 rounds: most are learned (loss falls), ids 0..49 stay high (the
    "flipped labels"), 50..69 stay high but are scored only 3 times, 70..79 stay high and fall
    in the last round. Returns the table and the ids that must be suspect."""
    n = 1000
    store.register_run(run, n)
    table = HardnessTable(n)
    rng = np.random.default_rng(5)
    seq = 0
    for rnd in range(6):
        ids = np.arange(n) if rnd < 3 else np.setdiff1d(np.arange(n), np.arange(50, 70))
        losses = (2.0 * 0.3 ** rnd * rng.uniform(0.5, 1.5, len(ids))).astype(np.float32)
        high = (ids < 80) & ~((ids >= 70) & (rnd == 5))
        losses[high] = rng.uniform(2.5, 4.0, int(high.sum()))
        for part in np.array_split(np.arange(len(ids)), 2):
            store.ingest_records(run, 0, seq, pack(ids[part], losses[part], np.ones(len(part),
                                                   dtype=bool), 10 * rnd, rnd, 0))
            table.apply(ids[part], losses[part], np.ones(len(part), dtype=bool), 10 * rnd, rnd)
            seq += 1
    return table, set(range(50))


def _settled_suspects(service, run: str, limit: int, want_total: int) -> dict:
    # The threshold is recomputed on the service's refresh; wait for it to see every record.
    deadline = time.monotonic() + 30
    while True:
        body = httpx.get(f"{service.url}/v1/runs/{run}/suspects", params={"limit": limit})
        assert body.status_code == 200, body.text
        if body.json()["total"] == want_total or time.monotonic() > deadline:
            return body.json()
        time.sleep(0.2)


def test_suspects_listing_and_flag(service, store):
    table, truth = _fill_noisy(store, "noisy")
    service.wait_ready(runs=("noisy",))
    rule = PlanConfig().suspect_rule()
    assert rule is not None
    threshold = rule.threshold(suspect_reference(table.ema, table.seen))
    expected = set(np.flatnonzero(
        rule.mask(table.seen, table.ema, table.last_loss, threshold, table.last_round)).tolist())
    assert expected == truth  # the fixture really has the intended suspects
    body = _settled_suspects(service, "noisy", 100, len(truth))
    assert body["total"] == 50 and body["min_scorings"] == rule.min_scorings
    assert body["threshold"] == pytest.approx(threshold, rel=1e-6)
    got = [s["id"] for s in body["samples"]]
    assert set(got) == truth and all(s["suspect"] for s in body["samples"])
    hardness = [s["ema"] for s in body["samples"]]
    assert hardness == sorted(hardness, reverse=True)  # hardest first
    assert [s["id"] for s in _settled_suspects(service, "noisy", 5, 50)["samples"]] == got[:5]
    with service.client() as c:
        assert c.get("/v1/runs/noisy/samples/3").json()["suspect"] is True
        assert c.get("/v1/runs/noisy/samples/55").json()["suspect"] is False  # too few scorings
        assert c.get("/v1/runs/noisy/samples/75").json()["suspect"] is False  # fell at last
        assert c.get("/v1/runs/noisy/samples/500").json()["suspect"] is False  # learned
        top = c.get("/v1/runs/noisy/samples", params={"limit": 80, "by": "last_loss"}).json()
        assert {s["id"] for s in top["samples"] if s["suspect"]} <= truth
    with SamplerClient(service.url) as client:
        assert [s["id"] for s in client.suspects("noisy", limit=100)["samples"]] == got


def test_suspects_in_plans_get_weight_zero(service, store):
    _settled_suspects(service, "noisy", 1, 50)
    with service.client() as c:
        body = c.post("/v1/runs/noisy/plans", json={
            "rank": 0, "world_size": 1, "round": 40, "batches": 10, "batch_size": 90,
            "with_weights": True}).json()
    ids, w = np.array(body["ids"]).ravel(), np.array(body["weights"]).ravel()
    assert np.all(w[ids < 50] == 0.0) and np.all(w[ids >= 50] > 0.0)
    assert np.sum(ids < 50) <= 10  # at most the floor rate, 0.1 * 900 / 1000 * 50 -> ~4-5


def test_suspects_bounds_and_guard_off(service, store):
    base = f"{service.url}/v1/runs/noisy/suspects"
    assert httpx.get(base, params={"limit": 0}).status_code == 422
    assert httpx.get(base, params={"limit": 10_001}).status_code == 422
    assert httpx.get(f"{service.url}/v1/runs/nope/suspects").status_code == 404
    with service.client() as c:
        # 50 of 1000 scored samples (5%) stay high: below a 6% share the guard stands down.
        assert c.put("/v1/runs/noisy/plan-config",
                     json={"suspect_min_share": 0.06}).status_code == 200
        assert c.get("/v1/runs/noisy/suspects").json()["total"] == 0
        assert c.get("/v1/runs/noisy/samples/3").json()["suspect"] is False
        assert c.put("/v1/runs/noisy/plan-config", json={"suspect_min_share": 1.5}).status_code \
            == 422
        assert c.put("/v1/runs/noisy/plan-config",
                     json={"suspect_min_share": 0.05}).status_code == 200
        assert c.get("/v1/runs/noisy/suspects").json()["total"] == 50
        r = c.put("/v1/runs/noisy/plan-config", json={"suspect_factor": 0.0})
        assert r.status_code == 200, r.text
        body = c.get("/v1/runs/noisy/suspects").json()
        assert body == {"run": "noisy", "total": 0, "threshold": None, "min_scorings": None,
                        "samples": []}
        assert c.get("/v1/runs/noisy/samples/3").json()["suspect"] is False
        assert c.put("/v1/runs/noisy/plan-config", json={"suspect_factor": -1}).status_code \
            == 422

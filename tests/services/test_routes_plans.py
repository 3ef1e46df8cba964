"""POST /v1/runs/{run}/plans on a live service: disjoint ranks, determinism, restarts, Arrow."""

from __future__ import annotations

import httpx
import numpy as np
import pyarrow as pa
import pytest
from hardbatch.sampler.hardness import suspect_reference
from hardbatch.sampler.plans import PlanConfig, PrioritySnapshot, compose_round
from hardbatch.services.live_runs import run_seed

ARROW = "application/vnd.apache.arrow.stream"


def _plan(c: httpx.Client, run: str, **body) -> httpx.Response:
    req = {"rank": 0, "world_size": 1, "round": 0, "batches": 2, "batch_size": 8} | body
    return c.post(f"/v1/runs/{run}/plans", json=req)


def test_ranks_get_disjoint_equal_plans(service, filled):
    run, _ = filled
    with service.client() as c:
        parts = [_plan(c, run, rank=r, world_size=4, round=1, batches=3, batch_size=50).json()
                 for r in range(4)]
    ids = np.array([p["ids"] for p in parts])
    assert ids.shape == (4, 3, 50)
    assert len(np.unique(ids)) == ids.size and ids.min() >= 0 and ids.max() < 5000
    assert all(p["round"] == 1 and p["world_size"] == 4 and p["weights"] is None for p in parts)


def test_unseen_samples_come_first(service, filled):
    run, table = filled
    unseen = set(np.flatnonzero(table.seen == 0).tolist())
    with service.client() as c:
        p = _plan(c, run, round=2, batches=4, batch_size=100, with_losses=True).json()
    ids = np.array(p["ids"]).ravel()
    assert set(ids.tolist()) <= unseen  # more unseen than the round needs
    assert all(x is None for row in p["losses"] for x in row)


def test_same_round_same_plan_across_restarts(service_factory, store, fill):
    fill(store, "restart", 3000, batches=20, per_batch=400, seed=3)
    body = {"rank": 1, "world_size": 2, "round": 5, "batches": 4, "batch_size": 64,
            "with_weights": True}
    first = service_factory()
    first.wait_ready(runs=("restart",))
    with first.client() as c:
        a = c.post("/v1/runs/restart/plans", json=body).json()
        again = c.post("/v1/runs/restart/plans", json=body).json()
    first.stop()
    # The table changes between the two services: the round must not.
    fill(store, "restart", 3000, batches=0, per_batch=0)
    second = service_factory()
    second.wait_ready(runs=("restart",))
    with second.client() as c:
        b = c.post("/v1/runs/restart/plans", json=body).json()
    assert a == again == b
    keys = list(store.client.scan_iter(match="hb:{restart}:round:*:2:5"))
    assert len(keys) == 1 and store.client.ttl(keys[0]) > 0


def test_round_is_reproducible_from_seed_round_world(service, filled):
    # The service's table equals the in-process one bit for bit, so composing here with the
    # run's seed gives exactly the service's round.
    run, table = filled
    with service.client() as c:
        parts = [_plan(c, run, rank=r, world_size=2, round=11, batches=3, batch_size=800,
                       with_weights=True).json() for r in range(2)]
    cfg = PlanConfig()
    rule = cfg.suspect_rule()
    assert rule is not None
    threshold = rule.threshold(suspect_reference(table.ema, table.seen))
    snap = PrioritySnapshot.build(table.ema, table.seen, cfg,
                                  suspect=rule.mask(table.seen, table.ema, table.last_loss,
                                                    threshold, table.last_round))
    local = compose_round(snap, seed=run_seed(run), round_=11, world_size=2, batches=3,
                          batch_size=800)
    assert np.array_equal(np.array([p["ids"] for p in parts]), local.ids)
    assert np.allclose(np.array([p["weights"] for p in parts]), local.weights)


def test_arrow_body_with_weights_and_losses(service, filled):
    run, table = filled
    with service.client() as c:
        req = {"rank": 0, "world_size": 2, "round": 3, "batches": 2, "batch_size": 300,
               "with_weights": True, "with_losses": True}
        r = c.post(f"/v1/runs/{run}/plans", json=req, headers={"Accept": ARROW})
        j = c.post(f"/v1/runs/{run}/plans", json=req).json()
    assert r.headers["content-type"] == ARROW
    t = pa.ipc.open_stream(r.content).read_all()
    assert t.column_names == ["batch", "id", "weight", "loss"]
    assert t.schema.metadata[b"round"] == b"3" and t.schema.metadata[b"world_size"] == b"2"
    ids = t.column("id").to_numpy()
    assert ids.tolist() == np.array(j["ids"]).ravel().tolist()
    assert t.column("batch").to_numpy().tolist() == [0] * 300 + [1] * 300
    loss = t.column("loss").to_pylist()
    for i, value in zip(ids, loss, strict=True):
        assert value == (float(table.last_loss[i]) if table.seen[i] else None)
    assert np.allclose(t.column("weight").to_numpy(), 1.0)  # beta = 0 by default


def test_shape_conflict_is_409(service, filled):
    run, _ = filled
    with service.client() as c:
        assert _plan(c, run, round=20, batches=2, batch_size=8).status_code == 200
        r = _plan(c, run, round=20, batches=3, batch_size=8)
    assert r.status_code == 409 and "2 batches x 8" in r.json()["detail"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"rank": 2, "world_size": 2}, "rank must be in [0, world_size=2)"),
        ({"batches": 5000}, "batches must be <= 4096"),
        ({"batch_size": 100_000}, "batch_size must be <= 65536"),
        ({"world_size": 2, "batches": 100, "batch_size": 100}, "needs 20000 distinct ids"),
        ({"round": -1}, "greater than or equal to 0"),
        ({"batches": 0}, "greater than or equal to 1"),
        ({"batches": "many"}, "valid integer"),
    ],
)
def test_bad_plan_requests_are_422(service, filled, body, needle):
    run, _ = filled
    with service.client() as c:
        r = _plan(c, run, **body)
    assert r.status_code == 422, r.text
    assert needle in r.text


def test_plan_body_limits(service, filled):
    run, _ = filled
    with service.client() as c:
        huge = b'{"rank": 0, "pad": "' + b"x" * (2 << 20) + b'"}'
        r = c.post(f"/v1/runs/{run}/plans", content=huge,
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        # No Content-Length (chunked): counted while reading.
        r = c.post(f"/v1/runs/{run}/plans", content=iter([huge[:1 << 20], huge[1 << 20:]]),
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert c.post(f"/v1/runs/{run}/plans", content=b"nope").status_code == 422
        ghost = c.post("/v1/runs/ghost/plans", json={"rank": 0, "world_size": 1, "round": 0,
                                                     "batches": 1, "batch_size": 1})
        assert ghost.status_code == 404


def test_weights_follow_the_run_config(service, store, fill):
    fill(store, "weighted", 2000, batches=30, per_batch=400, seed=9)
    service.wait_ready(runs=("weighted",))
    with service.client() as c:
        c.put("/v1/runs/weighted/plan-config", json={"alpha": 1.0, "lam": 0.1, "beta": 1.0})
        p = _plan(c, "weighted", round=4, batches=2, batch_size=100, with_weights=True).json()
    w = np.array(p["weights"])
    # Inverse inclusion probabilities scaled so a round's weights average 1: some above 1.
    assert w.shape == (2, 100) and np.all(w > 0) and w.std() > 0 and w.max() > 1
    assert 0.5 < w.mean() < 2.0
    with service.client() as c:
        c.put("/v1/runs/weighted/plan-config", json={"alpha": 1.0, "lam": 0.1, "beta": 0.0})
        p = _plan(c, "weighted", round=5, batches=2, batch_size=100, with_weights=True).json()
    assert np.all(np.array(p["weights"]) == 1.0)


def test_a_run_registered_again_gets_new_rounds(service, store, fill):
    import time

    fill(store, "reborn", 1000, batches=2, per_batch=100)
    service.wait_ready(runs=("reborn",))
    with service.client() as c:
        assert _plan(c, "reborn", batches=4, batch_size=100).status_code == 200
        store.delete_run("reborn")
        fill(store, "reborn", 300, batches=1, per_batch=50, seed=5)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = c.get("/v1/runs/reborn").json()
            if info.get("ready") and info.get("applied_records") == 50:
                break
            time.sleep(0.1)
        r = _plan(c, "reborn", batches=2, batch_size=100)
    assert r.status_code == 200, r.text
    ids = np.array(r.json()["ids"])
    assert ids.max() < 300 and len(np.unique(ids)) == 200


def test_adaptive_plans_mark_the_slots_not_to_train(service, store, fill):
    fill(store, "adaptive", 2000, batches=30, per_batch=400, seed=9)
    service.wait_ready(runs=("adaptive",))
    with service.client() as c:
        r = c.put("/v1/runs/adaptive/plan-config",
                  json={"alpha": 1.0, "beta": 0.0, "size_factor": 0.5, "packed": False})
        assert r.status_code == 200, r.text
        p = _plan(c, "adaptive", round=4, batches=2, batch_size=100, with_weights=True).json()
        share = c.get("/v1/runs/adaptive").json()["plan_share"]
        r = c.put("/v1/runs/adaptive/plan-config",
                  json={"alpha": 1.0, "beta": 0.0, "size_factor": 0.5, "packed": True})
        assert r.status_code == 200, r.text
        packed = _plan(c, "adaptive", round=5, batches=2, batch_size=100, with_weights=True)
        again = _plan(c, "adaptive", round=5, batches=3, batch_size=100, with_weights=True)
    ids, w = np.array(p["ids"]), np.array(p["weights"])
    assert 0.05 <= share <= 0.5
    trained = w >= 0
    # At most half the round trains; the rest are distinct ids marked -1, never weights.
    assert 2 <= trained.sum() <= 100 and np.all(w[~trained] == -1.0)
    assert abs(int(trained[0].sum()) - int(trained[1].sum())) <= 1
    assert len(np.unique(ids)) == ids.size
    # Packed: as many trained ids in one batch of the two asked for (the batch is short, not
    # the round long), and the round keeps the shape it was asked for (another is a conflict).
    assert packed.status_code == 200, packed.text
    pj = packed.json()
    assert pj["batches"] == len(pj["ids"]) == 1
    assert (np.array(pj["weights"]) >= 0).sum() == trained.sum()
    assert again.status_code == 409 and "for 2 batches" in again.json()["detail"]

"""Per-sample hardness routes against a live service, checked against an in-process table."""

from __future__ import annotations

import httpx
import numpy as np
import pytest


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
        }
        rec = c.get(f"/v1/runs/{run}/samples/{unseen_id}").json()
        assert rec == {"id": unseen_id, "seen": 0, "kept": 0, "last_loss": None, "ema": None,
                       "last_step": None}


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

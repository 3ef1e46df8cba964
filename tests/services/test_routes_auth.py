"""Bearer-token checks: state-changing endpoints always, reads when auth_reads is on."""

from __future__ import annotations

import httpx
import pytest

PLAN = {"rank": 0, "world_size": 1, "round": 0, "batches": 1, "batch_size": 4}
READS = ["/v1/runs", "/v1/runs/demo", "/v1/runs/demo/samples/1", "/v1/runs/demo/samples",
         "/v1/runs/demo/histogram", "/v1/runs/demo/plan-config", "/metrics"]
BAD_AUTH = ["", "Bearer wrong", "Basic {token}", "{token}", "Bearer {token}x", "Bearer"]


@pytest.mark.parametrize("auth", BAD_AUTH)
def test_writes_need_the_token(service, filled, auth):
    headers = {"Authorization": auth.format(token=service.token)} if auth else {}
    r = httpx.post(f"{service.url}/v1/runs/demo/plans", json=PLAN, headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer" and "token" in r.json()["detail"]
    r = httpx.put(f"{service.url}/v1/runs/demo/plan-config", json={}, headers=headers)
    assert r.status_code == 401


def test_writes_pass_with_the_token(service, filled):
    r = httpx.post(f"{service.url}/v1/runs/demo/plans", json=PLAN, headers=service.auth)
    assert r.status_code == 200


def test_reads_are_open_by_default(service, filled):
    for path in READS:
        assert httpx.get(service.url + path).status_code == 200, path


def test_auth_reads_closes_reads_but_not_probes(service_factory, filled):
    svc = service_factory(auth_reads="true")
    svc.wait_ready(runs=("demo",))
    for path in READS:
        assert httpx.get(svc.url + path).status_code == 401, path
        assert httpx.get(svc.url + path, headers=svc.auth).status_code == 200, path
    r = httpx.post(f"{svc.url}/v1/runs/demo/samples/lookup", json={"ids": [1]})
    assert r.status_code == 401
    for probe in ["/healthz", "/readyz"]:
        assert httpx.get(svc.url + probe).status_code == 200


def test_no_token_configured_means_open(service_factory, filled):
    svc = service_factory(token=None)
    svc.wait_ready(runs=("demo",))
    r = httpx.post(f"{svc.url}/v1/runs/demo/plans", json=PLAN | {"round": 1})
    assert r.status_code == 200

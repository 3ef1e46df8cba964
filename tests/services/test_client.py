"""trainer/client.py and the `hardbatch hardness` / `hardbatch top` commands, on a live service."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from hardbatch.services.client import SamplerClient, SamplerError
from hardbatch.services.redis_server import free_port

from hardbatch.cli import main


@pytest.fixture
def client(service, filled):
    with SamplerClient(service.url, token=service.token) as c:
        yield c


def test_plan_over_arrow_matches_json(client, service, filled):
    run, table = filled
    plan = client.plan(run, rank=1, world_size=2, round=40, batches=3, batch_size=50,
                       with_weights=True, with_losses=True)
    with service.client() as c:
        j = c.post(f"/v1/runs/{run}/plans", json={"rank": 1, "world_size": 2, "round": 40,
                                                   "batches": 3, "batch_size": 50}).json()
    assert plan.ids.shape == (3, 50) and plan.ids.tolist() == j["ids"]
    assert plan.round == 40 and plan.rank == 1 and plan.world_size == 2
    assert plan.weights is not None and np.all(plan.weights == 1.0)
    assert plan.losses is not None
    seen = table.seen[plan.ids] > 0
    assert np.array_equal(np.isnan(plan.losses), ~seen)
    assert np.array_equal(plan.losses[seen], table.last_loss[plan.ids][seen])


def test_unreachable_service_is_a_sampler_error():
    with SamplerClient(f"http://127.0.0.1:{free_port()}", timeout_s=2) as c, \
            pytest.raises(SamplerError) as err:
        c.sample("x", 1)
    assert err.value.status is None and "unreachable" in str(err.value)


def test_wrong_token_is_401(service, filled):
    with SamplerClient(service.url, token="nope") as c, pytest.raises(SamplerError) as err:
        c.plan(filled[0], rank=0, world_size=1, round=0, batches=1, batch_size=1)
    assert err.value.status == 401


def test_hardness_queries(client, filled):
    run, table = filled
    i = int(np.flatnonzero(table.seen)[3])
    assert client.sample(run, i)["ema"] == float(table.ema[i])
    cols = client.samples(run, np.array([i, 0, 1]))
    assert cols["ids"] == [i, 0, 1] and cols["seen"] == table.seen[[i, 0, 1]].tolist()
    top = client.top(run, k=5)
    assert [r["ema"] for r in top] == sorted(table.ema[table.seen > 0].tolist(), reverse=True)[:5]
    assert client.top(run, k=3, order="easiest")[0]["ema"] == float(table.ema[table.seen > 0].min())
    hist = client.histogram(run, bins=5)
    assert sum(hist["counts"]) == int((table.seen > 0).sum())
    assert any(r["run"] == run for r in client.runs())
    assert client.run_info(run)["num_samples"] == table.size
    with pytest.raises(SamplerError) as err:
        client.sample(run, table.size)
    assert err.value.status == 404


def test_cli_hardness_and_top(service, filled):
    run, table = filled
    i = int(np.flatnonzero(table.seen)[0])
    runner = CliRunner()
    r = runner.invoke(main, ["hardness", run, str(i), "--service", service.url])
    assert r.exit_code == 0, r.output
    assert f'"id": {i}' in r.output and '"ema"' in r.output
    r = runner.invoke(main, ["top", run, "-k", "4", "--service", service.url])
    assert r.exit_code == 0, r.output
    rows = r.output.strip().splitlines()
    assert len(rows) == 5 and rows[0].split()[:2] == ["id", "ema"]
    hardest = int(table.hardest(1)[0])
    assert rows[1].split()[0] == str(hardest)
    r = runner.invoke(main, ["hardness", "ghost", "1", "--service", service.url])
    assert r.exit_code != 0 and "404" in r.output
    r = runner.invoke(main, ["hardness", run, "-5", "--service", service.url])
    assert r.exit_code == 2

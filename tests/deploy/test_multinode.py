"""A real two-node Ray cluster on this machine, through network namespaces.

The `head` namespace (10.200.0.1) runs Redis, the sampler service and the Ray head; the
`worker` namespace (10.200.0.2) runs a Ray worker node; a veth pair named `hb0` at both ends
joins them. Every process is started by the same deploy/ entrypoint that docker-compose runs
(tests/deploy/test_manifests.py checks that the two lists agree), and the run is submitted by
deploy/train-job.sh as a Ray job: 2 workers with STRICT_SPREAD, so one rank per node, training
the built-in task on the service's plans. Then the store must hold losses from both ranks,
the ranks must have run on both nodes, and the hardness REST must answer for their samples.

Needs root and iproute2. CI (CI=true) fails rather than skips when either is missing.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.netns import (
    IFNAME,
    Host,
    Network,
    Service,
    list_namespaces,
    missing_requirements,
    remove_stale,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
# The entrypoints this test runs; test_manifests checks compose runs the same ones.
ENTRYPOINTS = ("redis.sh", "sampler.sh", "ray-head.sh", "ray-worker.sh", "train-job.sh")
RUN = "multinode"
# The environment variables the processes inherit from this one (OpenBLAS settings matter:
# some processors need them, see the environment notes).
PASS_ENV = ("HOME", "LANG", "LC_ALL", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "HARDBATCH_CACHE")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    reason = missing_requirements()
    if reason is not None:
        if _in_ci():
            pytest.fail(f"the multi-node test must run in CI, but {reason}")
        pytest.skip(f"multi-node namespace test needs root and iproute2: {reason}")
    remove_stale()
    # Short: Ray's unix socket paths live under it and must stay under 108 characters.
    workdir = Path(tmp_path_factory.mktemp("mn"))
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env.update({
        # The interpreter running pytest is the project's virtualenv: its tools come first.
        "PATH": f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                "/usr/bin:/sbin:/bin",
        # A cluster token of our own, so ~/.ray/auth_token of other clusters never matters.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        # The sampler needs a token for plans, as in compose: workers must send it.
        "HARDBATCH_API_TOKEN": secrets.token_hex(16),
        # Gloo picks the interface named here in every namespace.
        "GLOO_SOCKET_IFNAME": IFNAME,
        "PYTHONUNBUFFERED": "1",
        # Every worker log line reaches the job's output (the placement check reads them).
        "RAY_DEDUP_LOGS": "0",
    })
    net = Network(workdir, env)
    try:
        yield net
    finally:
        names = [h.name for h in net.hosts.values()]
        net.close()
        left = set(names) & set(list_namespaces())
        assert not left, f"namespaces left behind: {left}"


def _logs(net: Network) -> str:
    return "\n".join(f"----- {s.name} (exit {s.process.poll()}) -----\n{s.tail()}"
                     for s in net.services)


def _wait_healthy(net: Network, host: Host, what: str, env: dict[str, str],
                  watch: list[Service], limit_s: float = 120) -> None:
    """Polls deploy/healthcheck.sh WHAT until it passes; fails early if a service died."""
    deadline = time.monotonic() + limit_s
    while True:
        r = net.run(host, [str(DEPLOY / "healthcheck.sh"), what], env, timeout_s=30)
        if r.returncode == 0:
            return
        dead = [s.name for s in watch if s.process.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"exited: {', '.join(dead)}" if dead else "timeout"
            pytest.fail(f"{what} not healthy ({why}): {r.stdout[-800:]}{r.stderr[-800:]}\n"
                        f"{_logs(net)}")
        time.sleep(1)


def test_two_node_job_trains_on_service_plans(network: Network) -> None:
    net = network
    head, worker = net.add_pair("head", "worker")
    work = net.workdir
    redis_url = f"redis://{head.ip}:6380/0"
    service_url = f"http://{head.ip}:8000"
    node = {"HARDBATCH_NUM_CPUS": "1", "HARDBATCH_OBJECT_STORE_BYTES": str(100 << 20),
            "HARDBATCH_RAY_PORT": "6379"}
    # As deploy/make-env.sh writes it: Redis refuses a public bind without one.
    secret = {"HARDBATCH_REDIS_PASSWORD": "multinode-test-password"}
    redis_env = {"HARDBATCH_REDIS_BIND": head.ip, "HARDBATCH_REDIS_DATA": str(work / "redis"),
                 **secret}
    sampler_env = {**secret, "HARDBATCH_HOST": head.ip, "HARDBATCH_PORT": "8000",
                   "HARDBATCH_REDIS_URL": redis_url, "HARDBATCH_REFRESH_S": "0.5",
                   # No snapshot, so the log keeps every record with its rank for the checks.
                   "HARDBATCH_SNAPSHOT_INTERVAL_S": "3600"}
    head_env = {**node, **secret, "HARDBATCH_NODE_IP": head.ip,
                "HARDBATCH_RAY_TEMP_DIR": str(work / "rh")}

    started = [
        net.start("redis", head, [str(DEPLOY / "redis.sh")], redis_env),
        net.start("sampler", head, [str(DEPLOY / "sampler.sh")], sampler_env),
        net.start("ray-head", head, [str(DEPLOY / "ray-head.sh")], head_env),
        net.start("ray-worker", worker, [str(DEPLOY / "ray-worker.sh")], {
            **node, "HARDBATCH_NODE_IP": worker.ip, "HARDBATCH_RAY_HEAD": f"{head.ip}:6379",
            "HARDBATCH_RAY_TEMP_DIR": str(work / "rw")}),
    ]
    _wait_healthy(net, head, "redis", redis_env, started)
    _wait_healthy(net, head, "sampler", sampler_env, started)
    _wait_healthy(net, head, "ray-head", head_env, started)

    # The job waits for the worker node itself: STRICT_SPREAD cannot place 2 ranks on 1 node.
    job = net.run(head, [str(DEPLOY / "train-job.sh")], {
        **secret,
        "HARDBATCH_JOB_ADDRESS": f"http://{head.ip}:8265",
        "HARDBATCH_SERVICE_URL": service_url,
        "HARDBATCH_REDIS_URL": redis_url,
        "HARDBATCH_RUN": RUN,
        "HARDBATCH_WORKERS": "2",
        "HARDBATCH_PLACEMENT": "STRICT_SPREAD",
        "HARDBATCH_STORAGE": str(work / "storage"),
        "HARDBATCH_OUT": str(work / "out"),
        "HARDBATCH_TRAIN_ARGS": "--num-samples 2000 --epochs 2 --width 16 --batch-size 128",
    }, timeout_s=240)
    output = job.stdout + job.stderr
    assert job.returncode == 0, f"train job failed:\n{output[-6000:]}\n{_logs(net)}"

    # Each rank says where it runs: one rank on each node's address.
    placed = {int(rank): ip for rank, ip in
              re.findall(r"hardbatch: rank (\d+) of 2 on node ([\d.]+)", output)}
    assert placed, f"no worker placement in the job's output:\n{output[-4000:]}"
    assert sorted(placed) == [0, 1] and set(placed.values()) == {head.ip, worker.ip}, placed

    metrics = json.loads((work / "out" / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]

    probe = net.run(head, [sys.executable, str(REPO / "tests" / "deploy" / "probe.py"),
                           "--redis", redis_url, "--service", service_url, "--run", RUN],
                    secret, timeout_s=60)
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout)

    # Losses from both ranks, hence both nodes; ranks take equal steps, so equal counts.
    assert set(found["batches_by_rank"]) == {"0", "1"}, found["batches_by_rank"]
    by_rank = found["records_by_rank"]
    assert set(by_rank) == {"0", "1"} and by_rank["0"] == by_rank["1"] > 0, by_rank
    run = found["run"]
    assert run["records"] == sum(by_rank.values()), run
    assert run["lag_records"] == 0 and run["applied_records"] == run["records"], run
    assert run["rejected_records"] == 0 and run["malformed_batches"] == 0, run
    # Plans were composed for this 2-rank world, up to the last round.
    assert run["world_size"] == 2 and run["round"] >= 1, run
    assert run["seen_samples"] > 0

    # The hardness REST answers for samples each node's rank scored.
    samples = found["samples"]
    for rank in ("0", "1"):
        mine = {k: v for k, v in samples.items() if k.startswith(f"{rank}:")}
        assert mine, f"no sample looked up for rank {rank}"
        for key, s in mine.items():
            assert s["status"] == 200, (key, s)
            assert s["id"] == int(key.split(":")[1]) and s["seen"] >= 1, (key, s)
            assert s["last_loss"] is not None and s["ema"] is not None, (key, s)

    # Redis kept an append-only file: a restart would not lose the table.
    assert list((work / "redis").glob("appendonly*")), "redis wrote no AOF"

    # Stopping each node by its PID stops that node only; the namespaces go with close().
    for svc in reversed(started):
        net.stop(svc)
        assert svc.process.poll() is not None, f"{svc.name} still running"

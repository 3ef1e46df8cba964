"""`hardbatch bench plan`: time to compose one rank's plan (64 batches x 256) from a big table.

Two measurements, each over many fresh rounds (every request composes a new round, nothing is
served from a cache):

- `compose`: `hardbatch.sampler.plans.compose_round` in-process, world size 1, importance
  weights on, from a 10M-sample table (1M with --quick) where all but 5,000 samples were scored
  (so the unseen-first path and the priority sampling both run). This is the bar's figure:
  `p50_ms`, `p99_ms`. Also: the once-per-table-version priority build, and a round for 8 ranks
  at once.
- `http`: the same through the running service (`POST /v1/runs/RUN/plans`, Arrow body, weights
  and last losses), from a real run of that size in Redis: compose + serialization + HTTP.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from hardbatch.sampler.plans import PlanConfig, PrioritySnapshot, compose_round

from benchmarks.live_service import live_service

FULL: dict[str, int] = {
    "table_size": 10_000_000, "rounds": 300, "http_rounds": 200, "http_table": 10_000_000,
}
QUICK: dict[str, int] = {
    "table_size": 1_000_000, "rounds": 30, "http_rounds": 20, "http_table": 200_000,
}
BATCHES, BATCH_SIZE = 64, 256
UNSEEN = 5_000


def _pcts(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "max_ms": float(a.max()), "n": len(ms)}


def bench_compose(size: int, rounds: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    hardness = rng.exponential(size=size).astype(np.float32)
    seen = np.ones(size, dtype=np.uint32)
    seen[rng.choice(size, UNSEEN, replace=False)] = 0
    cfg = PlanConfig(alpha=1.0, lam=0.1, beta=0.5)
    builds = []
    for _ in range(3):
        t = time.perf_counter()
        snap = PrioritySnapshot.build(hardness, seen, cfg)
        builds.append(1e3 * (time.perf_counter() - t))
    times = []
    for r in range(rounds):
        t = time.perf_counter()
        plan = compose_round(snap, seed=1, round_=r, world_size=1, batches=BATCHES,
                             batch_size=BATCH_SIZE)
        ids, weights = plan.for_rank(0)
        times.append(1e3 * (time.perf_counter() - t))
        assert ids.shape == (BATCHES, BATCH_SIZE) and weights.shape == ids.shape
    world8 = []
    for r in range(max(5, rounds // 20)):
        t = time.perf_counter()
        compose_round(snap, seed=1, round_=10_000 + r, world_size=8, batches=BATCHES,
                      batch_size=BATCH_SIZE)
        world8.append(1e3 * (time.perf_counter() - t))
    return {**_pcts(times), "priority_build_ms": float(np.median(builds)),
            "world8_round_p50_ms": float(np.median(world8))}


def bench_http(size: int, rounds: int) -> dict[str, Any]:
    with live_service(size, seen_fraction=1.0) as svc, httpx.Client(
        base_url=svc.url, headers={"Authorization": f"Bearer {svc.token}"}, timeout=60
    ) as client:
        def ask(r: int, arrow: bool) -> float:
            body = {"rank": 0, "world_size": 1, "round": r, "batches": BATCHES,
                    "batch_size": BATCH_SIZE, "with_weights": True, "with_losses": True}
            headers = {"Accept": "application/vnd.apache.arrow.stream"} if arrow else {}
            t = time.perf_counter()
            resp = client.post(f"/v1/runs/{svc.run}/plans", json=body, headers=headers)
            ms = 1e3 * (time.perf_counter() - t)
            resp.raise_for_status()
            return ms

        ask(0, True)  # priorities built, connection open
        arrow = [ask(r, True) for r in range(1, rounds + 1)]
        json_ms = [ask(r, False) for r in range(rounds + 1, rounds + 1 + max(5, rounds // 5))]
    return {**_pcts(arrow), "json_p50_ms": float(np.median(json_ms)),
            "json_p99_ms": float(np.percentile(json_ms, 99)), "table_size": size}


def run(quick: bool, out: Path) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    compose = bench_compose(sizes["table_size"], sizes["rounds"])
    http = bench_http(sizes["http_table"], sizes["http_rounds"])
    result = {
        "table_size": sizes["table_size"], "batches": BATCHES, "batch_size": BATCH_SIZE,
        "world_size": 1, "unseen": UNSEEN, "config": {"alpha": 1.0, "lam": 0.1, "beta": 0.5},
        "p50_ms": compose["p50_ms"], "p99_ms": compose["p99_ms"],
        "compose": compose, "http": http, "bar_p99_ms": 100.0,
        "meets_bar": compose["p99_ms"] <= 100.0, "quick": quick,
    }
    print(f"plan: one rank, {BATCHES} x {BATCH_SIZE}, table {sizes['table_size']:,}")
    print(f"{'measure':<34}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"{'compose (in-process)':<34}{compose['p50_ms']:>10.2f}{compose['p99_ms']:>10.2f}")
    print(f"{'HTTP, Arrow, table ' + format(http['table_size'], ','):<34}"
          f"{http['p50_ms']:>10.2f}{http['p99_ms']:>10.2f}")
    print(f"{'HTTP, JSON':<34}{http['json_p50_ms']:>10.2f}{http['json_p99_ms']:>10.2f}")
    print(f"priority build per table version: {compose['priority_build_ms']:.0f} ms; "
          f"a whole 8-rank round: {compose['world8_round_p50_ms']:.1f} ms (p50)")
    return result

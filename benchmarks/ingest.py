"""`hardbatch bench ingest`: sample-losses per second from a producer to the materialized table.

A producer process plays a training worker: it walks epochs of shuffled sample ids in batches
of `batch_size` and hands each batch to a `LossReporter` (which packs it and ships it from its
own thread). This process runs the `Materializer` that reads the run's log and applies it to the
in-memory hardness table. Both talk to one embedded Redis over a unix socket.

The figure is records / (time the last record is applied - time the first report() began).
The loss values and id permutations are made before the clock starts. A second figure replays
the same log into a fresh table (what a restarted consumer does).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import numpy as np
from hardbatch.services.materializer import Materializer
from hardbatch.services.redis_server import EmbeddedRedis
from hardbatch.services.store import LossStore

FULL = dict(num_samples=10_000_000, epochs=2, batch_size=1024)
QUICK = dict(num_samples=500_000, epochs=2, batch_size=1024)
BAR = 2_000_000


def _producer(url: str, run: str, num_samples: int, epochs: int, batch_size: int,
              ready: Any, go: Any, out: Any) -> None:
    from hardbatch.trainer.reporter import LossReporter

    rng = np.random.default_rng(0)
    plans = [rng.permutation(num_samples) for _ in range(epochs)]
    losses = rng.gamma(2.0, 1.0, num_samples).astype(np.float32)
    kept = rng.random(num_samples) < 0.3
    rep = LossReporter(url, run, rank=0)
    ready.set()
    go.wait()
    t0 = time.monotonic()
    step = 0
    for epoch, ids in enumerate(plans):
        for start in range(0, num_samples, batch_size):
            sl = slice(start, start + batch_size)
            rep.report(ids[sl], losses[sl], kept[sl], step, epoch)
            step += 1
    t_reported = time.monotonic()
    report = rep.close(600)
    out.put({"t0": t0, "t_reported": t_reported, "t_delivered": time.monotonic(),
             "ok": report.ok, "delivered": report.delivered_records,
             "batches": report.delivered_batches})


def run(quick: bool, out: Path) -> dict[str, Any]:
    cfg = QUICK if quick else FULL
    n, epochs, bs = cfg["num_samples"], cfg["epochs"], cfg["batch_size"]
    total = n * epochs
    ctx = mp.get_context("spawn")
    with EmbeddedRedis() as server:
        store = LossStore.from_url(server.url)
        store.register_run("ingest", n)
        m = Materializer(store, "ingest", read_count=16)
        ready, go, results = ctx.Event(), ctx.Event(), ctx.Queue()
        proc = ctx.Process(target=_producer,
                           args=(server.url, "ingest", n, epochs, bs, ready, go, results))
        proc.start()
        if not ready.wait(300):
            raise RuntimeError("producer did not start")
        go.set()
        while m.stats().consumed_records < total:
            m.poll(block_ms=100)
            if not proc.is_alive() and results.empty():
                raise RuntimeError(f"producer died (exit code {proc.exitcode})")
        t_applied = time.monotonic()
        prod = results.get(timeout=60)
        proc.join(60)
        st = m.stats()
        assert st.applied_records == total and int(m.table.seen.sum()) == total

        replay = Materializer(store, "ingest", read_count=16, publish=False)
        t = time.monotonic()
        replay.catch_up(600)
        replay_s = time.monotonic() - t
        assert replay.table.equals(m.table)
        info = store.run_info("ingest")

    elapsed = t_applied - prod["t0"]
    result: dict[str, Any] = {
        "sample_losses_per_s": total / elapsed,
        "bar_sample_losses_per_s": BAR,
        "passes": total / elapsed >= BAR,
        "records": total,
        "num_samples": n,
        "batch_size": bs,
        "seconds_end_to_end": elapsed,
        "report_calls_per_s": (total / bs) / (prod["t_reported"] - prod["t0"]),
        "producer_records_per_s": total / (prod["t_reported"] - prod["t0"]),
        "log_entries": info.entries,
        "replay_records_per_s": total / replay_s,
        "quick": quick,
    }
    print(f"ingest: {total:,} records, {n:,} samples, batches of {bs}")
    print(f"  {'producer -> materialized table':34s} {result['sample_losses_per_s']:>14,.0f} /s"
          f"   (bar >= {BAR:,})")
    print(f"  {'report() calls':34s} {result['report_calls_per_s']:>14,.0f} /s")
    replay_rate = result["replay_records_per_s"]
    print(f"  {'replay of the log into a new table':34s} {replay_rate:>14,.0f} /s")
    print(f"  log entries {info.entries}, end to end {elapsed:.2f} s")
    return result

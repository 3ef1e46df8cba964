"""`hardbatch bench store-memory`: Redis memory per sample of a run's hardness table.

A run of `num_samples` samples gets one loss record per sample (an epoch, in batches as a
worker would send them); a materializer applies them and snapshots the table, which trims the
log. The figure is Redis's `used_memory` after that, minus before the run was registered,
divided by the number of samples: everything the run leaves in Redis (table chunks, meta,
per-rank sequence numbers, the trimmed log). It is read after Redis's housekeeping has had two
seconds to shrink client buffers, and cross-checked with the sum of `MEMORY USAGE` over the
run's keys. The peak while the log was still untrimmed is reported too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from hardbatch.sampler.records import pack
from hardbatch.services.materializer import Materializer
from hardbatch.services.redis_server import EmbeddedRedis
from hardbatch.services.store import LossStore

FULL = dict(num_samples=10_000_000)
QUICK = dict(num_samples=1_000_000)
BATCH = 65_536
BAR = 24.0


def run(quick: bool, out: Path) -> dict[str, Any]:
    n = (QUICK if quick else FULL)["num_samples"]
    with EmbeddedRedis() as server:
        store = LossStore.from_url(server.url)
        client = store.client
        mem: Any = client.info("memory")
        before = int(mem["used_memory"])
        store.register_run("memory", n)
        rng = np.random.default_rng(0)
        ids = rng.permutation(n)
        losses = rng.gamma(2.0, 1.0, n).astype(np.float32)
        kept = rng.random(n) < 0.3
        m = Materializer(store, "memory", read_count=16)
        for seq, start in enumerate(range(0, n, BATCH)):
            sl = slice(start, start + BATCH)
            store.ingest_records("memory", seq % 8, seq,
                                 pack(ids[sl], losses[sl], kept[sl], seq, 0, seq % 8))
        with_log = int(client.info("memory")["used_memory"]) - before
        m.catch_up(600)
        m.snapshot()
        info = store.run_info("memory")
        assert info.log_entries == 0 and int(m.table.seen.sum()) == n
        time.sleep(2.5)  # clientsCron shrinks the query buffers that carried the chunks
        used = int(client.info("memory")["used_memory"]) - before
        keys = list(client.scan_iter(match="hb:{memory}:*")) + ["hb:runs"]
        key_bytes = sum(int(client.memory_usage(k, samples=0) or 0) for k in keys)
    result: dict[str, Any] = {
        "bytes_per_sample": used / n,
        "bar_bytes_per_sample": BAR,
        "passes": used / n <= BAR,
        "num_samples": n,
        "used_memory_bytes": used,
        "key_bytes_per_sample": key_bytes / n,
        "keys": len(keys),
        "table_bytes_per_sample": 20,
        "peak_bytes_per_sample_with_untrimmed_log": with_log / n,
        "quick": quick,
    }
    print(f"store-memory: {n:,} samples, one record each, snapshot taken, log trimmed")
    print(f"  Redis used_memory per sample   {result['bytes_per_sample']:7.3f} B   (bar <= {BAR})")
    print(f"  MEMORY USAGE of its {len(keys)} keys   {result['key_bytes_per_sample']:7.3f} B")
    peak = result["peak_bytes_per_sample_with_untrimmed_log"]
    print(f"  with the untrimmed log         {peak:7.3f} B")
    return result

"""`hardbatch bench lookup-load`: hardness lookups against the running service under load.

A real Redis holds a run (1M samples, 80% scored; 100k with --quick) and `hardbatch serve`
answers for it on loopback. The load generator runs in this process, the service in its own:
`connections` keep-alive HTTP/1.1 connections (plain asyncio streams, so the generator costs
little CPU next to the server), each sending `GET /v1/runs/RUN/samples/ID` for random ids,
back to back. Bounded by a request count and a time limit, whichever comes first. Every
response must be a 200 with the right id; anything else (status, timeout, reset) is an error.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from benchmarks.live_service import live_service

FULL: dict[str, Any] = {
    "size": 1_000_000, "requests": 60_000, "time_limit_s": 60.0, "connections": 16,
    "warmup": 2_000,
}
QUICK: dict[str, Any] = {
    "size": 100_000, "requests": 3_000, "time_limit_s": 15.0, "connections": 8, "warmup": 300,
}
TIMEOUT_S = 5.0


async def _worker(host: str, port: int, paths: list[tuple[int, bytes]], deadline: float,
                  lat_ms: list[float], errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for sample_id, request in paths:
            if time.monotonic() > deadline:
                return
            t = time.perf_counter()
            try:
                writer.write(request)
                status, body = await asyncio.wait_for(_read_response(reader), TIMEOUT_S)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            lat_ms.append(1e3 * (time.perf_counter() - t))
            if status != 200:
                errors.append(f"status {status}: {body[:200]!r}")
            elif json.loads(body)["id"] != sample_id:
                errors.append(f"wrong record for id {sample_id}")
    finally:
        writer.close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        if line.lower().startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    body = await reader.readexactly(length)
    return status, body


async def _load(url: str, run: str, size: int, requests: int, connections: int,
                time_limit_s: float, seed: int) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, size, requests).tolist()
    reqs = [(i, (f"GET /v1/runs/{run}/samples/{i} HTTP/1.1\r\nHost: {host}\r\n\r\n").encode())
            for i in ids]
    shards = [reqs[c::connections] for c in range(connections)]
    lat: list[float] = []
    errors: list[str] = []
    t0 = time.monotonic()
    deadline = t0 + time_limit_s
    await asyncio.gather(*[_worker(host, port, s, deadline, lat, errors) for s in shards])
    elapsed = time.monotonic() - t0
    done = len(lat)
    return {
        "requests": done, "elapsed_s": elapsed, "requests_per_s": done / elapsed,
        "p50_ms": float(np.percentile(lat, 50)) if lat else None,
        "p99_ms": float(np.percentile(lat, 99)) if lat else None,
        "max_ms": float(max(lat)) if lat else None,
        "errors": len(errors), "first_errors": errors[:5],
        "hit_time_limit": done + len(errors) < requests,
    }


def run(quick: bool, out: Path) -> dict[str, Any]:
    p = QUICK if quick else FULL
    with live_service(p["size"], seen_fraction=0.8) as svc:
        asyncio.run(_load(svc.url, svc.run, svc.num_samples, p["warmup"], 4, 30.0, seed=1))
        r = asyncio.run(_load(svc.url, svc.run, svc.num_samples, p["requests"],
                              p["connections"], p["time_limit_s"], seed=2))
    result = {
        "requests_per_s": r["requests_per_s"], "p99_ms": r["p99_ms"], "errors": r["errors"],
        "p50_ms": r["p50_ms"], "max_ms": r["max_ms"], "requests": r["requests"],
        "elapsed_s": r["elapsed_s"], "connections": p["connections"],
        "table_size": p["size"], "hit_time_limit": r["hit_time_limit"],
        "first_errors": r["first_errors"], "quick": quick,
        "bar": {"requests_per_s": 1000, "p99_ms": 50, "errors": 0},
        "meets_bar": r["requests_per_s"] >= 1000 and (r["p99_ms"] or 1e9) <= 50
        and r["errors"] == 0,
    }
    print(f"lookup-load: GET /v1/runs/RUN/samples/ID, {p['connections']} connections, "
          f"table {p['size']:,}")
    print(f"{'requests':>9}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'errors':>8}")
    print(f"{r['requests']:>9}{r['requests_per_s']:>10.0f}{r['p50_ms'] or 0:>9.2f}"
          f"{r['p99_ms'] or 0:>9.2f}{r['max_ms'] or 0:>9.2f}{r['errors']:>8}")
    return result

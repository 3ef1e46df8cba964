"""The background Redis probe behind /readyz, against a real server and a closed port."""

from __future__ import annotations

import time

from hardbatch.services.readiness import RedisProbe
from hardbatch.services.redis_server import free_port


def test_probe_reports_a_live_redis_as_ok(redis_url: str) -> None:
    probe = RedisProbe(redis_url, timeout_s=0.5, interval_s=0.1).start()
    try:
        assert probe.status() == (True, None)
    finally:
        probe.stop()


def test_probe_reports_a_closed_port_at_once_with_the_reason() -> None:
    probe = RedisProbe(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5, interval_s=0.1)
    t0 = time.monotonic()
    probe.start()
    try:
        ok, reason = probe.status()
        assert not ok and reason is not None and reason.startswith("redis: ConnectionError")
        assert time.monotonic() - t0 < 1.0
    finally:
        probe.stop()

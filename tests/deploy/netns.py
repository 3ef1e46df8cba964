"""Network namespaces joined by veth pairs: a multi-machine network on one Linux host.

Each `Host` is a namespace with one interface named `hb0` (the same name everywhere, so one
GLOO_SOCKET_IFNAME fits every host) holding an address in 10.200.0.0/24. Processes started in
a host get their own process group; `Network.close()` stops them by group and by PID, then
deletes the namespaces and (with them) the veth pairs. Every name carries this process's PID,
so concurrent runs never collide, and namespaces left by a run that was SIGKILLed are removed
by the next one (`remove_stale`).

Only root can do this; `missing_requirements()` says why not, when it cannot.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.200.0"
IFNAME = "hb0"
PREFIX = "hbt"
_NAME = re.compile(rf"^{PREFIX}-(\d+)-\w+$")


def missing_requirements() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          timeout=30)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "delete", probe)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def list_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def _pids_in(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    return [int(p) for p in out.stdout.split() if p.isdigit()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_namespace(ns: str) -> None:
    """Kills what still runs inside `ns` (by PID: they are all ours) and deletes it."""
    for pid in _pids_in(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _pids_in(ns) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(subprocess.CalledProcessError):
        _ip("netns", "delete", ns)


def remove_stale() -> list[str]:
    """Deletes namespaces of earlier runs whose process is gone; returns their names."""
    gone = []
    for ns in list_namespaces():
        m = _NAME.match(ns)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            _delete_namespace(ns)
            gone.append(ns)
    return gone


@dataclass
class Host:
    """One namespace: `name` for `ip netns`, `ip` its address on the shared subnet."""

    name: str
    ip: str

    def argv(self, command: Sequence[str]) -> list[str]:
        """`command` run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *command]


@dataclass
class Service:
    """A process started in a host, in its own process group, logging to `log`."""

    name: str
    host: Host
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


@dataclass
class Network:
    """Hosts on one point-to-point or star network of veth pairs, and what runs in them.

    Args:
        workdir: folder for process logs.
        env: base environment of every process started here.
    """

    workdir: Path
    env: Mapping[str, str]
    hosts: dict[str, Host] = field(default_factory=dict)
    services: list[Service] = field(default_factory=list)

    def add_pair(self, a: str, b: str) -> tuple[Host, Host]:
        """Two new namespaces `a` and `b` joined by a veth pair (10.200.0.1 and .2)."""
        pid = os.getpid()
        hosts = (Host(f"{PREFIX}-{pid}-{a}", f"{SUBNET}.1"),
                 Host(f"{PREFIX}-{pid}-{b}", f"{SUBNET}.2"))
        for h, key in zip(hosts, (a, b), strict=True):
            _ip("netns", "add", h.name)
            self.hosts[key] = h
        # Both ends are created in this namespace, so they need distinct names until moved.
        ends = (f"{PREFIX}a{pid}"[:15], f"{PREFIX}b{pid}"[:15])
        _ip("link", "add", ends[0], "type", "veth", "peer", "name", ends[1])
        for h, end in zip(hosts, ends, strict=True):
            _ip("link", "set", end, "netns", h.name)
            _ip("-n", h.name, "link", "set", end, "name", IFNAME)
            _ip("-n", h.name, "addr", "add", f"{h.ip}/24", "dev", IFNAME)
            _ip("-n", h.name, "link", "set", "lo", "up")
            _ip("-n", h.name, "link", "set", IFNAME, "up")
        return hosts

    def start(self, name: str, host: Host, command: Sequence[str],
              env: Mapping[str, str] | None = None) -> Service:
        """Starts `command` in `host` in a new session (its own process group)."""
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(host.argv(command), env={**self.env, **(env or {})},
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        svc = Service(name, host, proc, log)
        self.services.append(svc)
        return svc

    def run(self, host: Host, command: Sequence[str], env: Mapping[str, str] | None = None,
            timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """Runs `command` in `host` to completion, capturing its output."""
        return subprocess.run(host.argv(command), env={**self.env, **(env or {})},
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout_s, start_new_session=True)

    def stop(self, svc: Service, grace_s: float = 15) -> None:
        """SIGTERM to the service's process group, then SIGKILL to what is left of it."""
        pgid = svc.process.pid  # the session leader's PID is its group's id
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            svc.process.wait(grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            svc.process.wait(5)

    def close(self) -> None:
        """Stops every service (last started first) and deletes every namespace."""
        for svc in reversed(self.services):
            self.stop(svc)
        self.services.clear()
        for h in self.hosts.values():
            _delete_namespace(h.name)
        self.hosts.clear()

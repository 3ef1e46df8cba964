"""The driver's own sampler service: a child process, gone with the driver."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import httpx
import psutil
import pytest
from hardbatch.trainer.driver import local_service


def _services(parent: psutil.Process) -> list[psutil.Process]:
    return [p for p in parent.children(recursive=True)
            if "hardbatch.cli" in p.cmdline() and "serve" in p.cmdline()]


def test_the_local_service_runs_in_a_child_process_and_stops_with_the_context(redis_url):
    with local_service(redis_url) as url:
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        (child,) = _services(psutil.Process())  # a child, not a thread: no GIL shared
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=2)


def test_the_local_service_dies_with_a_killed_driver(redis_url):
    driver = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from hardbatch.trainer.driver import local_service
        with local_service({redis_url!r}) as url:
            print(url, flush=True)
            time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)
    url = driver.stdout.readline().strip()  # type: ignore[union-attr]
    assert httpx.get(f"{url}/healthz").status_code == 200
    (child,) = _services(psutil.Process(driver.pid))
    driver.kill()
    driver.wait()
    psutil.wait_procs([child], timeout=20)
    assert not child.is_running()

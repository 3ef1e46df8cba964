"""Child processes and temp folders that do not outlive the process that made them.

SIGTERM and atexit cannot help when the owner is SIGKILLed (OOM killer, `kill -9`, a crashed
container runtime), so two things cover that case:

- `die_with_parent()`: a `preexec_fn` asking Linux to signal the child when its parent dies
  (`prctl(PR_SET_PDEATHSIG)`).
- `claim(folder, child_pid)` records who owns a temp folder; `reap(parent, pattern)`, run
  when a new owner starts, removes the folders whose owner is gone, and kills a child of
  theirs still running (one forked where the death signal could not be set).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

OWNER_FILE = "owner.pid"
CHILD_FILE = "child.pid"
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that has the child get `sig` when this process dies; None where it cannot.

    Linux sends the signal when the *thread* that forked exits, not the process: so this is
    None off the main thread, where a worker thread's end would kill a healthy child (`reap`
    then covers the child); `die_with_this_thread` is for a thread that lives as long as the
    child.
    """
    return _pdeathsig(sig) if threading.current_thread() is threading.main_thread() else None


def _pdeathsig(sig: int) -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig))
        # The parent may have died between fork and prctl: then no signal would ever come.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def die_with_this_thread(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """As `die_with_parent`, from any thread: for a thread that lives as long as the child."""
    return _pdeathsig(sig)


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux): kill(0) is all we know
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def claim(folder: Path, child_pid: int | None = None) -> None:
    """Records this process (and its child in `folder`, if given) as the folder's owner."""
    for name, pid in ((OWNER_FILE, os.getpid()), (CHILD_FILE, child_pid)):
        if pid is None:
            continue
        # Written whole then renamed: a reaper never reads half a pid (another live pid).
        tmp = folder / f".{name}.tmp"
        tmp.write_text(str(pid))
        os.replace(tmp, folder / name)


def reap(parent: Path, pattern: str) -> list[Path]:
    """Removes the folders matching `pattern` in `parent` whose recorded owner is gone.

    Folders without an owner file (being made right now, or by an older version) and those of
    other users are left alone. A recorded child still running is killed only if its command
    line names the folder (its pid may have been reused by an unrelated process).

    Returns:
        The folders removed.
    """
    removed = []
    for folder in sorted(parent.glob(pattern)):
        try:
            if folder.stat().st_uid != os.getuid():
                continue
            owner = int((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if pid_alive(owner):
            continue
        _kill_child(folder)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _kill_child(folder: Path) -> None:
    try:
        child = int((folder / CHILD_FILE).read_text())
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if str(folder).encode() in cmdline and pid_alive(child):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)

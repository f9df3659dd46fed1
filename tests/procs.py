"""Helpers for executor tests: process liveness via /proc (no psutil)."""
from __future__ import annotations

import os
import time


def proc_state(pid: int) -> str | None:
    """The /proc state letter of `pid` (R, S, T, Z, ...), or None if no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(")") + 2]


def is_gone(pid: int) -> bool:
    """True when the process no longer exists at all (exited and reaped: no zombie)."""
    return proc_state(pid) is None


def wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    """Wait until every pid is gone; return those still present."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if not is_gone(p)]
        if not left:
            return []
        time.sleep(0.02)
    return [p for p in pids if not is_gone(p)]


def describe(pids: list[int]) -> list[str]:
    """pid: command line of each (for a failure message naming what was left behind)."""
    out = []
    for p in pids:
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            out.append(f"{p}: {cmd[:200]}")
        except OSError:
            out.append(f"{p}: gone")
    return out


def children_of(pid: int) -> list[int]:
    """Direct children of `pid` (scans /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            out.append(int(name))
    return out


def spawned_since(before: set[int]) -> list[int]:
    """Children of this process not in `before`, except multiprocessing's resource tracker
    (started at this process's first spawn, it lives as long as the process does)."""
    return [p for p in sorted(set(children_of(os.getpid())) - before) if "resource_tracker" not in describe([p])[0]]

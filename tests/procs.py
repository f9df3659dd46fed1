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

"""The descendants of a process, from Linux /proc (no psutil on the GPU host)."""

from __future__ import annotations

import os


def descendants(pid: int) -> list[int]:
    """Children, grandchildren, ... of ``pid``, forked by any of its threads (a DataLoader's
    decode workers are forked by whichever thread made the loader: /proc/PID/task/TID/children
    lists only what thread TID forked)."""
    kids = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return kids + [g for k in kids for g in descendants(k)]

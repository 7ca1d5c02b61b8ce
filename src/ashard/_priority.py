"""Running below the caller: a worker and ashard's own helper threads let the caller's
event loop have a CPU first when every CPU is busy (`Pool(worker_nice=)`,
`ashard._shm.COPY_NICE`). Linux keeps a nice value per thread, so it is set per thread."""

from __future__ import annotations

import os

__all__ = ["MAX_NICE", "lower"]

MAX_NICE = 19
"""The lowest priority a process or thread can have (Linux and macOS)."""


def lower(tid: int, by: int) -> None:
    """Make thread `tid` (a Linux thread id; 0: the calling process's, elsewhere) `by`
    steps nicer, `MAX_NICE` at most. A thread that ended meanwhile, or a system that
    refuses, leaves it as it is."""
    try:
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(now + by, MAX_NICE))
    except OSError:
        pass

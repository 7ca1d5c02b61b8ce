"""The health monitor: one thread per pool that reads every worker's memory on a
schedule, kills a worker past the hard memory limit at once, and lets idle workers
go after `idle_timeout`.

A thread rather than a task: it must run while no call is active (idle exit) and
while the caller's event loop is busy, and a pool outlives any one event loop
(Jupyter cells, `anyio.run` after `anyio.run`). It touches the scheduler only
through `Scheduler.health_targets` and `Scheduler.reap_idle`, which take its lock.
"""

from __future__ import annotations

import signal
import threading
import time
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ashard._scheduler import Scheduler

__all__ = ["Monitor"]


class Monitor:
    """Runs `check` every `Scheduler.check_interval()` seconds until stopped."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = weakref.ref(scheduler)  # a dropped pool ends its monitor
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ashard-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def _run(self) -> None:
        while True:
            scheduler = self._scheduler()
            if scheduler is None or scheduler.closed:
                return
            interval = scheduler.check_interval()
            del scheduler
            if self._stop.wait(interval):
                return
            scheduler = self._scheduler()
            if scheduler is None:
                return
            check(scheduler)
            del scheduler


def check(scheduler: Scheduler) -> None:
    """One round: read memory, kill runaways, let expired idle workers go."""
    policy = scheduler.policy
    for w in scheduler.health_targets():
        rss = w.read_rss()
        w.observe(rss)
        if policy.over_hard_cap(rss) and w.end_reason is None:
            w.end_reason = "mem_hard"
            w.signal(signal.SIGKILL)  # its shards are retried; the drive sees EOF
    for w in scheduler.reap_idle(time.monotonic()):
        w.channel.close()  # EOF: the worker exits
        if not w.reap(2.0):
            w.signal(signal.SIGKILL)
            w.reap(5.0)

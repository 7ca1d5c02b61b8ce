"""Worker health: the policy (memory caps, drift recycling, task limits, idle exit,
profiles) and the monitor thread that applies it between and during calls.

A worker's memory is its *private* resident memory (RSS minus shared pages): shared
inputs mapped by every worker exist once on the machine and are not charged to any
of them. It is read two ways: each worker reports it with every finished chunk (a
check between chunks at no cost to the parent), and the monitor reads every worker
with psutil each `health_check_interval` seconds, so a shard that allocates without
end is killed mid-shard, long before it takes the machine down.

The monitor is a thread rather than a task: it must run while no call is active (idle
exit) and while the caller's event loop is busy, and a pool outlives any one event
loop (Jupyter cells, `anyio.run` after `anyio.run`). It sees the pool only through
the `Watched` protocol and each worker through `Gauged`.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Literal, Protocol

__all__ = [
    "PROFILES",
    "EndReason",
    "Gauged",
    "HealthPolicy",
    "Monitor",
    "Profile",
    "RecycleReason",
    "Watched",
]

RecycleReason = Literal["mem_cap", "drift", "max_tasks", "pause_timeout", "all_paused", "hygiene"]
"""Why a healthy worker is replaced once its current work is done."""
EndReason = Literal[RecycleReason, "mem_hard", "idle", "crashed", "timed out", "protocol", "exited"]
"""Why a worker ended: recycled, killed past the hard memory limit, idle past
`idle_timeout`, crashed, killed past a timeout, killed for sending what is not a valid
message ("protocol"), or exited with the pool."""


PAUSE_HYSTERESIS = 0.05
"""A paused worker resumes below ``(mem_pause - PAUSE_HYSTERESIS) * mem_cap``."""


@dataclass(frozen=True, slots=True)
class Profile:
    """How hard a call watches its workers (R shard's profiles).

    `interval`: factor on `health_check_interval`; `drift`: factor on the drift
    threshold; `floor`: growth in bytes below which drift never recycles; `chunk`:
    factor on the work per chunk (fewer, larger chunks mean fewer checks between them).
    """

    interval: float
    drift: float
    floor: int
    chunk: float


PROFILES = {
    "default": Profile(interval=1.0, drift=1.0, floor=100 * 2**20, chunk=1.0),
    "memory": Profile(interval=0.25, drift=0.5, floor=25 * 2**20, chunk=0.25),
    "speed": Profile(interval=4.0, drift=2.0, floor=400 * 2**20, chunk=4.0),
}


class Gauged(Protocol):
    """A worker as health sees it (`ashard._handle.WorkerHandle`)."""

    def notice_exit(self) -> bool: ...
    def read_rss(self) -> int: ...
    def observe(self, rss: int) -> None: ...
    def kill_for(self, reason: EndReason) -> None: ...


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """A pool's limits. `mem_cap` in bytes (soft: recycle between shards); past
    ``mem_cap * hard_factor`` a worker is killed at once. `drift`: recycle when
    private memory grows by this fraction over its post-`init` baseline (None: off)."""

    mem_cap: int | None = None
    hard_factor: float = 1.5
    drift: float | None = 0.5
    interval: float = 1.0
    max_tasks: int | None = None
    idle_timeout: float | None = None
    min_workers: int | None = None  # None: the pool's size (it never scales down)
    mem_pause: float = 0.8  # with mem_cap: above this share of it a worker takes no work
    pause_timeout: float = 10.0  # seconds paused before it is recycled
    mem_budget: int | Literal["auto"] | None = None  # see `ashard._budget`
    hygiene: Literal["check", "recycle", "off"] = "check"  # see `ashard._worker.hygiene`

    def pause_change(self, rss: int, paused: bool) -> bool | None:
        """Should a worker holding `rss` bytes pause (True) or resume (False), being
        `paused` now? None: it stays as it is. It resumes a little below where it paused."""
        if self.mem_cap is None:
            return None
        if not paused and rss > self.mem_pause * self.mem_cap:
            return True
        if paused and rss < (self.mem_pause - PAUSE_HYSTERESIS) * self.mem_cap:
            return False
        return None

    @property
    def hard_cap(self) -> int | None:
        return None if self.mem_cap is None else int(self.mem_cap * self.hard_factor)

    def over_hard_cap(self, rss: int) -> bool:
        hard = self.hard_cap
        return hard is not None and rss > hard

    def near_memory_limit(self, rss: int) -> bool:
        """Was a worker holding `rss` bytes close to a limit (its hard cap, or without
        one half the machine's memory), so that an outside SIGKILL was likely the
        out-of-memory killer's?"""
        limit = self.hard_cap if self.hard_cap is not None else _physical_memory() // 2
        return limit > 0 and rss >= 0.8 * limit

    def soft_reason(
        self, tasks: int, rss: int, baseline: int, profile: Profile
    ) -> RecycleReason | None:
        """Why a worker that ran `tasks` and holds `rss` bytes of private memory (`baseline`
        after start-up) should be replaced once its current work is done, if it should."""
        if self.max_tasks is not None and tasks >= self.max_tasks:
            return "max_tasks"
        if self.mem_cap is not None and rss > self.mem_cap:
            return "mem_cap"
        if self.drift is not None and baseline:
            growth = rss - baseline
            if growth > max(self.drift * profile.drift * baseline, profile.floor):
                return "drift"
        return None

    def hard_limit_note(self, peak_rss: int) -> str:
        """Why a worker killed past the hard limit ended, for its shard's error."""
        hard = self.hard_cap or 0
        reached = f"reached {peak_rss / 2**20:.0f} MiB," if peak_rss > hard else "went"
        return (
            f"killed by ashard: its private memory {reached} past the hard limit of "
            f"{hard / 2**20:.0f} MiB (mem_cap x {self.hard_factor})"
        )


class Watched(Protocol):
    """What the monitor needs of a pool's worker set (`ashard._workers.WorkerSet`);
    every method is safe to call from the monitor's thread."""

    @property
    def policy(self) -> HealthPolicy: ...
    @property
    def closed(self) -> bool: ...
    def check_interval(self) -> float: ...
    def health_targets(self) -> list[Gauged]: ...
    def gauged(self, w: Any) -> None: ...
    def reap_idle(self, now: float) -> None: ...


class Monitor:
    """Runs `check` every `Watched.check_interval()` seconds until stopped."""

    def __init__(self, watched: Watched) -> None:
        self._watched = weakref.ref(watched)  # a dropped pool ends its monitor
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
            watched = self._watched()
            if watched is None or watched.closed:
                return
            interval = watched.check_interval()
            del watched
            if self._stop.wait(interval):
                return
            watched = self._watched()
            if watched is None:
                return
            check(watched)
            del watched


def check(watched: Watched) -> None:
    """One round: see workers gone, read memory, kill runaways, let expired idle
    workers go."""
    policy = watched.policy
    for w in watched.health_targets():
        if w.notice_exit():
            continue
        rss = w.read_rss()
        w.observe(rss)
        if policy.over_hard_cap(rss):
            w.kill_for("mem_hard")  # its shards are retried; the drive sees EOF
        watched.gauged(w)
    watched.reap_idle(time.monotonic())


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0

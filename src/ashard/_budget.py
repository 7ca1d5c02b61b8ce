"""A pool's memory budget: what its running shards may use together (DESIGN 2.5).

Each worker a job leases holds a reservation: the largest footprint among the chunks it
has in hand (it runs them one at a time). A chunk is sent when the other workers'
reservations plus its worker's fit the budget, or when no other worker has work in
hand: a shard larger than the whole budget runs alone, so admission never deadlocks.
A chunk without a footprint reserves nothing; it waits instead while the memory the
workers were last measured at is over the budget (again, never when it would be alone).

Jobs that wait for room are told (`wait_for_room`) when a reservation shrinks or a worker
puts its work down. The budget belongs to the pool, so concurrent calls share it. What
one call saw of memory (the budget, its waits, pauses, memory recycling, footprints) is
its `MemoryLog`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from ashard.results import MemoryDiagnostics

__all__ = ["Budget", "MemoryLog"]


class Budget:
    """`total` bytes for the running shards of one pool; `source` says where the figure
    came from ("given", "host" or "cgroup")."""

    def __init__(self, total: int, source: str) -> None:
        self.total = total
        self.source = source
        self.peak = 0  # the most reserved at once
        self._held: dict[Hashable, int] = {}  # a worker with work in hand -> bytes
        self._reserved = 0
        self._waiting: list[Callable[[], None]] = []

    @property
    def reserved(self) -> int:
        return self._reserved

    def holders(self) -> Iterable[Hashable]:
        """The workers (their keys) with work in hand."""
        return self._held.keys()

    def fits(self, key: Hashable, nbytes: int | None, measured: int) -> bool:
        """May worker `key` take a chunk of footprint `nbytes` (None: unknown), the pool's
        workers measured at `measured` bytes in all?"""
        mine = self._held.get(key)
        if len(self._held) - (mine is not None) == 0:
            return True  # alone: whatever it needs, it runs
        if nbytes is None:
            return measured <= self.total
        others = self._reserved - (mine or 0)
        return others + max(mine or 0, nbytes) <= self.total

    def hold(self, key: Hashable, nbytes: int) -> None:
        """Worker `key` has work in hand whose largest footprint is `nbytes`."""
        before = self._held.get(key, 0)
        self._held[key] = nbytes
        self._reserved += nbytes - before
        self.peak = max(self.peak, self._reserved)
        if nbytes < before:
            self._room_made()

    def put_down(self, key: Hashable) -> None:
        """Worker `key` has no work in hand any more (or never had: a worker leased
        for a waiting job that goes back unused leaves room too)."""
        nbytes = self._held.pop(key, None)
        if nbytes is not None:
            self._reserved -= nbytes
        self._room_made()

    def wait_for_room(self, notify: Callable[[], None]) -> None:
        """Call `notify` once, the next time room is made."""
        self._waiting.append(notify)

    def _room_made(self) -> None:
        waiting, self._waiting = self._waiting, []
        for notify in waiting:
            notify()


_MEMORY_RECYCLE = {
    "mem_cap": "mem_cap", "mem_hard": "hard_cap", "pause_timeout": "pause_timeout",
    "all_paused": "all_paused",
}  # fmt: skip
"""A worker's end reason -> the name `MemoryDiagnostics.recycled` counts it under."""


@dataclass
class MemoryLog:
    """What a backend saw of memory during one call (`MemoryDiagnostics`, when done)."""

    cap: int | None = None  # the pool's mem_cap: chunks shrink as workers near it
    budget: int | None = None  # set by the backend when the call is held to one
    budget_source: str | None = None
    footprint_per_shard: int | None = None  # given, the largest a callable gave, or learned
    oversized: list[tuple[int, int]] = field(default_factory=list)  # (shard, bytes)
    peak_reserved: int = 0  # `admitted`
    waiting_since: float | None = None  # work waits for room since (`waits`)
    admission_waits: int = 0  # waits ended by an admission
    admission_wait_s: float = 0.0
    pauses: int = 0  # told by the worker set (`CallRecord.scaled`)
    recycled: Counter[str] = field(default_factory=Counter)  # `stopped`

    def waits(self) -> None:
        """A chunk found no room in the budget."""
        if self.waiting_since is None:
            self.waiting_since = time.monotonic()

    def admitted(self, reserved: int) -> None:
        """A chunk got room; the budget holds `reserved` bytes now."""
        self.peak_reserved = max(self.peak_reserved, reserved)
        if self.waiting_since is not None:
            self.admission_waits += 1
            self.admission_wait_s += time.monotonic() - self.waiting_since
            self.waiting_since = None

    def stopped(self, ended: str | None) -> None:
        """A worker left the pool while the call ran, for `ended`."""
        if ended in _MEMORY_RECYCLE:
            self.recycled[_MEMORY_RECYCLE[ended]] += 1

    def learned(self, peak: int) -> None:
        """A chunk's memory rose `peak` bytes at most (`footprint="learn"`): the estimate
        per shard is the largest seen."""
        self.footprint_per_shard = max(self.footprint_per_shard or 0, peak)

    def report(self) -> MemoryDiagnostics:
        return MemoryDiagnostics(
            self.budget, self.budget_source, self.peak_reserved, self.admission_waits,
            self.admission_wait_s, self.pauses, dict(self.recycled), self.footprint_per_shard,
        )  # fmt: skip

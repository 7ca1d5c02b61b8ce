"""The worker set of one pool: membership, the idle list, fair leases, spawning with
backoff, retiring and recycling, and the pool's counters.

A worker is leased to one tenant at a time: a job, or the pool's calls (which may queue
several on one worker: `pass_slot`). `acquire` hands out an idle worker (most recently
used first), starts a new one while the pool is below its size, or waits; `release`
gives a settled worker to the waiting tenant that holds the fewest leases (so concurrent
calls share the pool fairly), else back to the idle list. A worker that should be
recycled leaves on release instead; a dead one is `discard`ed and a replacement started.

The idle list and the membership are shared with the health monitor's thread (through
the `ashard._health.Watched` protocol) under one lock; everything else runs on the
event loop of whichever call is active.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import TYPE_CHECKING

import anyio

from ashard._health import PROFILES as _PROFILES
from ashard._health import Gauged, HealthPolicy, Monitor
from ashard._log import logger, worker_event
from ashard._memory import oom_kills
from ashard._outcomes import Loss, describe_exit, first_error
from ashard.errors import WorkerStartError
from ashard.results import PoolStats

if TYPE_CHECKING:
    from ashard._handle import WorkerHandle

__all__ = ["BACKOFF_MAX", "IDLE_TIMEOUT", "START_ATTEMPTS", "Scaled", "WorkerSet", "spawn_delay"]

BACKOFF_FREE_CRASHES = 2
"""Crashes in a row that are replaced at once; after that, spawns back off."""
BACKOFF_MAX = 0.5
"""Seconds: the longest pause before spawning a replacement in a crash storm."""
START_ATTEMPTS = 5
"""Failed starts in a row after which a worker cannot be had."""
DUMP_WAIT = 0.5
"""Seconds a worker hung past its timeout gets to dump its stacks before it is killed."""
IDLE_TIMEOUT = 15.0
"""Seconds an idle worker above `min_workers` stays, when `idle_timeout` is not given."""

Tenant = Hashable
"""Whatever holds leases: a job, or a token for one call (compared by identity)."""
Scaled = Callable[[int, int, str, str | None], None]
"""Told of each worker start and stop: (workers before, workers after, reason, and for a
stop the worker's end reason); and of each pause: (n, n, "paused", None)."""
_STOP_REASON = {
    "idle": "idle", "mem_cap": "memory", "mem_hard": "memory", "pause_timeout": "pause_timeout",
    "all_paused": "all_paused",
}  # fmt: skip
"""A worker's end reason -> the reason a scaling event gives; others are "recycle"."""


def spawn_delay(streak: int) -> float:
    """Pause before a spawn after `streak` worker deaths with no result in between:
    none for the first few, then doubling from 50 ms up to `BACKOFF_MAX`."""
    if streak <= BACKOFF_FREE_CRASHES:
        return 0.0
    return min(BACKOFF_MAX, 0.05 * 2.0 ** (streak - BACKOFF_FREE_CRASHES - 1))


@dataclass(eq=False)
class _Waiter:
    tenant: Tenant
    event: anyio.Event = field(default_factory=anyio.Event)
    worker: WorkerHandle | None = None
    spawn: bool = False
    shared: bool = False  # `worker` is a call slot on a busy worker (`pass_slot`)
    order: int = 0


_NO_SCOPE = contextlib.nullcontext()


class _WaitQueue:
    """The waiters, by tenant, each tenant's in the order they came: the fairest (the
    tenant with the fewest leases, then the one waiting longest) is found in time
    proportional to the tenants, not the waiters."""

    def __init__(self) -> None:
        self._by: dict[Tenant, deque[_Waiter]] = {}
        self._count = 0
        self._order = itertools.count()

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[_Waiter]:
        return (w for q in list(self._by.values()) for w in list(q))

    def __contains__(self, waiter: _Waiter) -> bool:
        q = self._by.get(waiter.tenant)
        return q is not None and waiter in q

    def append(self, waiter: _Waiter) -> None:
        waiter.order = next(self._order)
        self._by.setdefault(waiter.tenant, deque()).append(waiter)
        self._count += 1

    def remove(self, waiter: _Waiter) -> None:
        q = self._by[waiter.tenant]
        q.remove(waiter)
        self._count -= 1
        if not q:
            del self._by[waiter.tenant]

    def tenants(self) -> Iterable[Tenant]:
        return self._by.keys()

    def fairest(self, leases: dict[Tenant, int]) -> _Waiter:
        tenant = min(self._by, key=lambda t: (leases.get(t, 0), self._by[t][0].order))
        return self._by[tenant][0]


@dataclass
class _Counters:
    started: int = 0
    crashed: int = 0
    timed_out: int = 0
    shards_done: int = 0
    pauses: int = 0
    recycled_by: Counter[str] = field(default_factory=Counter)  # reason -> workers


class WorkerSet:
    """The worker processes of one pool, and who holds them. `start_worker` starts one
    (the backend says how: `WorkerHandle.start` with its config); the set decides when."""

    def __init__(
        self,
        size: int,
        start_worker: Callable[[], Awaitable[WorkerHandle]],
        policy: HealthPolicy,
    ) -> None:
        self.size = size
        self._start = start_worker
        self.policy = policy
        self.closed = False
        self._owner = os.getpid()  # a forked child must not use the parent's workers
        self._counts = _Counters()
        self._lock = threading.Lock()  # _idle and _workers, shared with the monitor
        self._monitor: Monitor | None = None
        self._profiles: Counter[str] = Counter()  # profiles of the calls running now
        self._crash_streak = 0
        self._workers: set[WorkerHandle] = set()
        self._starting = 0
        self._idle: list[WorkerHandle] = []
        self._waiters = _WaitQueue()
        self._retired: list[WorkerHandle] = []
        self._leaving: set[WorkerHandle] = set()  # idle past idle_timeout, being stopped
        self._leases: dict[Tenant, int] = {}  # workers each tenant holds (absent: none)
        self.slot_unused: Callable[[WorkerHandle], None] | None = None  # see `pass_slot`
        self._listeners: list[Scaled] = []  # the calls running now (`listening`)
        self._oom_seen: int | None = None  # the cgroups' OOM kills when last read

    # -- what it holds ----------------------------------------------------------------

    def stats(self) -> PoolStats:
        c = self._counts
        with self._lock:
            alive = sum(1 for w in (*self._workers, *self._leaving) if w.alive)
            paused = sum(1 for w in self._workers if w.paused)
        recycled = sum(c.recycled_by.values())
        return PoolStats(
            alive, c.started, c.crashed, c.timed_out, recycled, c.shards_done,
            dict(c.recycled_by), paused,
        )  # fmt: skip

    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        return sorted(w.pid for w in self._workers if w.alive)

    def preload(self, modules: Sequence[str]) -> None:
        """Ask every live worker to import `modules` now (`WorkerHandle.preload`)."""
        with self._lock:
            members = list(self._workers)
        for w in members:
            if w.alive:
                w.preload(modules)

    def measured_bytes(self) -> int:
        """The private memory of the live workers, as last read, in all."""
        return sum(w.rss for w in self._workers)

    def leases(self, tenant: Tenant) -> int:
        """How many workers `tenant` holds."""
        return self._leases.get(tenant, 0)

    def check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this ashard.Pool is closed")
        if os.getpid() != self._owner:
            raise RuntimeError(
                f"this ashard.Pool belongs to process {self._owner}, and this is its forked "
                f"child {os.getpid()}: its workers are the parent's. Make a Pool in the child "
                "(ashard's module-level functions use a default pool of the child's own)"
            )

    @property
    def min_workers(self) -> int:
        """The fewest workers kept alive (idle ones above it leave after `idle_limit`)."""
        fewest = self.policy.min_workers
        return self.size if fewest is None else min(fewest, self.size)

    @property
    def idle_limit(self) -> float | None:
        """Seconds an idle worker above `min_workers` stays; None: it stays."""
        if self.policy.idle_timeout is not None:
            return self.policy.idle_timeout
        return IDLE_TIMEOUT if self.min_workers < self.size else None

    def _capacity(self) -> int:
        return self.size - len(self._workers) - self._starting

    def _may_start(self) -> bool:
        """Is there room for a new worker, and is it its turn? About one start at a time
        per live worker: a burst of work on an empty pool is no storm of starts."""
        return self._capacity() > 0 and self._starting < max(1, len(self._workers))

    @contextmanager
    def listening(self, scaled: Scaled) -> Iterator[None]:
        """Meanwhile, `scaled` is told of every worker start and stop (from the event
        loop, or from the health monitor's thread for idle workers leaving)."""
        with self._lock:
            self._listeners.append(scaled)
        try:
            yield
        finally:
            with self._lock:
                self._listeners.remove(scaled)

    def _scaled(self, before: int, after: int, reason: str, ended: str | None = None) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for tell in listeners:
            tell(before, after, reason, ended)

    def _stopped(self, w: WorkerHandle, reason: str | None = None) -> None:
        """`w` just left the membership: a scaling event."""
        why = reason or _STOP_REASON.get(w.end_reason or "", "recycle")
        n = len(self._workers)
        self._scaled(n + 1, n, why, w.end_reason)

    # -- events from the drives ------------------------------------------------------

    def heard_back(self, shards: int, timed_out: int = 0) -> None:
        """Workers answered (with `shards` finished, `timed_out` of them stopped by their
        timeout in Python): a crash storm, if any, is over."""
        self._counts.shards_done += shards
        self._counts.timed_out += timed_out
        self._crash_streak = 0

    def count_death(self, w: WorkerHandle, *, timed_out: bool) -> None:
        """`w` died, or was killed past a timeout, with work in hand."""
        if w.stopped_over_memory:
            w.mark_ended("mem_hard")
        if timed_out:
            self._counts.timed_out += 1
            w.mark_ended("timed out")
            worker_event(WARNING, f"worker {w.pid} killed: it ran past its timeout", w.pid,
                         reason="timed out")  # fmt: skip
        elif w.end_reason == "mem_hard":
            self._counts.recycled_by["mem_hard"] += 1
            worker_event(WARNING, f"worker {w.pid} killed: past its hard memory limit", w.pid,
                         reason="mem_hard")  # fmt: skip
        else:
            self._counts.crashed += 1
            w.mark_ended("crashed")
            loss = self.loss_of(w)
            how = describe_exit(w.pid, loss.exitcode, loss.signal, loss.memory_tight)
            note = f"; {loss.note}" if loss.note else ""
            worker_event(WARNING, f"{how}{note}", w.pid, reason="crashed",
                         exitcode=loss.exitcode, signal=loss.signal)  # fmt: skip
        self._crash_streak += 1

    def loss_of(self, w: WorkerHandle) -> Loss:
        """How `w` ended, for the errors of the work it held."""
        exitcode, signum = w.exit_info()
        note = None
        if w.end_reason == "mem_hard":
            note = self.policy.hard_limit_note(w.peak_rss)
        elif w.violation is not None:
            note = f"killed by ashard: it broke the channel protocol (it sent {w.violation})"
        tight = self.policy.near_memory_limit(w.peak_rss)
        killed = signum == signal.SIGKILL
        oom = w.end_reason == "mem_hard" or (killed and (tight or w.oom_counted))
        return Loss(w.pid, exitcode, signum, note, tight, oom, w.hang_stack)

    @contextmanager
    def watching(self, profile: str) -> Iterator[None]:
        """A call with health `profile` runs meanwhile (the monitor adapts its pace)."""
        self._profiles[profile] += 1
        try:
            yield
        finally:
            self._profiles[profile] -= 1

    # -- leasing ----------------------------------------------------------------------

    def _unlease(self, tenant: Tenant) -> None:
        left = self._leases.get(tenant, 0) - 1
        if left > 0:
            self._leases[tenant] = left
        else:
            self._leases.pop(tenant, None)

    def _fairest(self) -> _Waiter:
        waiter = self._waiters.fairest(self._leases)
        self._waiters.remove(waiter)
        return waiter

    async def acquire(self, tenant: Tenant) -> WorkerHandle:
        """A worker for `tenant`: an idle one, a new one, or the next one released.
        Paused workers are not handed out; when every live worker is paused, the largest
        is recycled at once, so that no call stalls on them."""
        while True:
            self.check_open()
            if not self._waiters:
                w = self._pop_idle()
                if w is not None:
                    self._leases[tenant] = self._leases.get(tenant, 0) + 1
                    return w
                if self._may_start():
                    return await self._spawn_for(tenant)
            if self._recycle_largest_if_all_paused():
                continue  # a place for a new worker (a waiter may have been woken to start it)
            waiter = _Waiter(tenant)
            self._waiters.append(waiter)
            # a paused idle worker may resume, or time out, on the monitor's thread:
            # look again every round of it
            try:  # no cancel scope otherwise: it costs about as much as the rest of the wait
                recheck = self._paused_idle()
                with anyio.move_on_after(self.check_interval()) if recheck else _NO_SCOPE:
                    await waiter.event.wait()
                if not waiter.event.is_set():
                    self._waiters.remove(waiter)
                    continue
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.worker is not None and waiter.shared:
                    assert self.slot_unused is not None
                    self.slot_unused(waiter.worker)
                elif waiter.worker is not None:
                    self.release(waiter.worker, tenant)
                elif waiter.spawn:
                    self._wake_for_capacity()
                raise
            if waiter.worker is not None:
                return waiter.worker
            if waiter.spawn and self._may_start():
                return await self._spawn_for(tenant)

    def release(self, w: WorkerHandle, tenant: Tenant) -> None:
        """Give a settled worker back: to the fairest waiter, else to the idle list."""
        self._unlease(tenant)
        if w.recycle_reason is not None and not self.closed:
            self._recycle(w)
            return
        if self.closed or len(self._workers) > self.size:
            self._retire(w)
            return
        if self._waiters and not w.paused:  # a paused one waits, idle, to resume or go
            waiter = self._fairest()
            waiter.worker = w
            self._leases[waiter.tenant] = self._leases.get(waiter.tenant, 0) + 1
            waiter.event.set()
            return
        w.mark_idle()
        with self._lock:
            self._idle.append(w)
        if w.paused and self._waiters:  # perhaps the last to pause: no waiter waits for a check
            self._recycle_largest_if_all_paused()

    def pass_slot(self, w: WorkerHandle, tenant: Tenant) -> bool:
        """A worker `tenant` holds can take one more of its calls: hand it, shared, to
        the fairest waiter if that waiter is `tenant`'s (True). A waiter cancelled
        before it takes the slot gives it back through `slot_unused`."""
        if not self._waiters:
            return False
        waiter = self._waiters.fairest(self._leases)
        if waiter.tenant is not tenant:
            return False
        self._waiters.remove(waiter)
        waiter.worker, waiter.shared = w, True
        waiter.event.set()
        return True

    def waiting(self) -> bool:
        """Does any tenant wait for a worker?"""
        return bool(self._waiters)

    def can_lease_now(self) -> bool:
        """Would `acquire` hand out an idle or new worker without waiting?"""
        return not self._waiters and (any(not w.paused for w in self._idle) or self._may_start())

    def gauged(self, w: WorkerHandle) -> None:
        """`w`'s memory was just read (the loop's thread or the monitor's): pause or
        resume it, and mark it for recycling once it was paused `pause_timeout`."""
        if self.policy.mem_cap is None:  # no pauses without a cap: nothing to do, per chunk
            return
        now = time.monotonic()
        change = self.policy.pause_change(w.rss, w.paused)
        if change is not None:
            w.set_paused(change, now)
            mib = w.rss / 2**20
            if change:
                self._counts.pauses += 1
                n = len(self._workers)
                self._scaled(n, n, "paused")
                worker_event(INFO, f"worker {w.pid} paused: {mib:.0f} MiB is over mem_pause",
                             w.pid, reason="paused")  # fmt: skip
            else:
                worker_event(INFO, f"worker {w.pid} resumed: {mib:.0f} MiB", w.pid,
                             reason="resumed")  # fmt: skip
        if w.paused and w.paused_for(now) >= self.policy.pause_timeout:
            w.recycle_for("pause_timeout")

    def _paused_idle(self) -> bool:
        return self.policy.mem_cap is not None and any(w.paused for w in self._idle)

    def _recycle_largest_if_all_paused(self) -> bool:
        """Every live worker is paused and the pool is full: recycle the largest, at once
        if it is idle (True), else once its work is done. One at a time: not while a
        worker starts or there is room for one."""
        if self.policy.mem_cap is None or self._capacity() > 0 or self._starting:
            return False
        with self._lock:
            members = list(self._workers)
        if not members or not all(w.paused for w in members):
            return False
        largest = max(members, key=lambda w: w.rss)
        largest.recycle_for("all_paused")
        with self._lock:
            idle = largest in self._idle
            if idle:
                self._idle.remove(largest)
        if idle:
            self._recycle(largest)
        return idle

    async def bury(self, w: WorkerHandle, *, hung: bool, violation: str | None) -> None:
        """Make sure a lost worker is dead and count it (`hung`: past a timeout;
        `violation`: what it sent that broke the protocol)."""
        if violation is not None:
            w.broke_protocol(violation)
        if hung:  # where it hangs, before it goes: every thread's stack, if it can say
            w.hang_stack = await w.dump_stack(DUMP_WAIT)
        if hung or violation is not None or await w.wait_exit(1.0) is None:
            await w.kill()
        if self._oom_seen is not None:  # did the kernel's OOM killer count a kill since?
            seen, self._oom_seen = self._oom_seen, await anyio.to_thread.run_sync(oom_kills)
            w.oom_counted = self._oom_seen > seen
        self.count_death(w, timed_out=hung)

    def discard(self, w: WorkerHandle, tenant: Tenant) -> None:
        """Forget a dead worker (closing its end of the channel, and any descriptor it
        sent that nothing claimed); a waiter may start a replacement."""
        self._unlease(tenant)
        with self._lock:
            member = w in self._workers
            self._workers.discard(w)
        if member:
            self._stopped(w, "crash")
        w.close_channel()
        w.output.close(cut_short=True)  # what it said as it died goes to the call that lost it
        self._wake_for_capacity()

    def should_yield(self, tenant: Tenant) -> bool:
        """Is another tenant waiting with fewer workers than `tenant` holds?"""
        if not self._waiters:
            return False
        held = self._leases.get(tenant, 0)
        return any(
            t is not tenant and self._leases.get(t, 0) < held for t in self._waiting_tenants()
        )

    def _waiting_tenants(self) -> Iterable[Tenant]:
        return self._waiters.tenants()

    def _wake_for_capacity(self) -> None:
        if self._waiters and self._may_start():
            waiter = self._fairest()
            waiter.spawn = True
            waiter.event.set()

    def _pop_idle(self) -> WorkerHandle | None:
        """The idle worker used last that is not paused (a dead one found is counted)."""
        while True:
            with self._lock:
                ready = [i for i, w in enumerate(self._idle) if not w.paused]
                if not ready:
                    return None
                w = self._idle.pop(ready[-1])
            if w.alive:
                return w
            with self._lock:
                self._workers.discard(w)
            w.close_channel()
            self.count_death(w, timed_out=False)
            self._stopped(w, "crash")

    # -- spawning, recycling, retiring ------------------------------------------------

    async def _spawn_for(self, tenant: Tenant, reason: str = "backlog") -> WorkerHandle:
        self._starting += 1  # before any wait: `_may_start` counts it from now on
        try:
            if self._oom_seen is None:  # where out-of-memory kills are counted from
                self._oom_seen = await anyio.to_thread.run_sync(oom_kills)
            w = await self._start_worker()
        finally:
            self._starting -= 1
            self._wake_for_capacity()  # one more live worker: one more start may go
        if self.closed:  # meanwhile; a cancelled caller (the job ended) stops it too
            with anyio.CancelScope(shield=True):
                await w.stop(1.0)
            self.check_open()
        with self._lock:
            self._workers.add(w)
        n = len(self._workers)
        self._scaled(n - 1, n, reason)
        self._counts.started += 1
        self._leases[tenant] = self._leases.get(tenant, 0) + 1
        self._ensure_monitor()
        return w

    async def _start_worker(self) -> WorkerHandle:
        """A new, ready worker. A start that fails is a crash and is tried again with the
        crash backoff; only a failure that repeats (the same `init` error twice, or
        `START_ATTEMPTS` failures in a row) is raised."""
        failed: list[WorkerStartError] = []
        while True:
            delay = spawn_delay(self._crash_streak)
            if delay:
                await anyio.sleep(delay)  # workers keep dying: no hot respawn loop
            try:
                with anyio.CancelScope(shield=True):
                    w = await self._start()
            except WorkerStartError as exc:
                self._counts.crashed += 1
                self._crash_streak += 1
                logger.warning("a worker failed to start: %s", exc, extra={"reason": "start"})
                if self.closed or len(failed) + 1 >= START_ATTEMPTS or _repeats(exc, failed):
                    raise
                failed.append(exc)
            else:
                if self.policy.pause_change(w.rss, False):
                    with anyio.CancelScope(shield=True):  # reaped, even if a sibling failed
                        await w.stop(1.0)
                    raise WorkerStartError(self._too_large(w))
                worker_event(INFO, f"worker {w.pid} is ready", w.pid)
                return w

    def _too_large(self, w: WorkerHandle) -> str:
        """Why a worker that holds more than `mem_pause` of `mem_cap` before it runs
        anything cannot work: paused at once, like every worker after it (the pool
        would crawl, one recycled worker at a time)."""
        cap = self.policy.mem_cap or 0
        return (
            f"worker {w.pid} holds {w.rss / 2**20:.1f} MiB of private memory before it runs "
            f"anything (after init), over mem_pause x mem_cap "
            f"({self.policy.mem_pause * cap / 2**20:.1f} MiB): it would take no work. "
            "Raise mem_cap well above what an idle worker holds"
        )

    async def replenish(self) -> None:
        """Start a replacement for a worker that died, so the pool stays at its size. A
        replacement that cannot start is left to the next `acquire`, which says why."""
        if self.closed or self._capacity() <= 0:
            return
        token = object()
        with contextlib.suppress(WorkerStartError):
            self.release(await self._spawn_for(token, "crash"), token)

    async def start_all(self, up_to: int | None = None) -> None:
        """Bring the pool up to its size, or to `up_to` workers (for a warm
        `async with Pool(...)`), all at once. The room is counted as starting at once,
        so a call that comes before these starts have begun starts none of its own."""
        token = object()
        room = self._capacity()
        if up_to is not None:
            room = min(room, up_to - len(self._workers) - self._starting)
        if room <= 0:
            return
        unclaimed = room
        self._starting += room

        async def start_one() -> None:
            nonlocal unclaimed
            unclaimed -= 1
            self._starting -= 1  # `_spawn_for` counts it again, with no wait between
            self.release(await self._spawn_for(token), token)

        try:
            async with anyio.create_task_group() as tg:
                for _ in range(room):
                    tg.start_soon(start_one)
        except BaseExceptionGroup as group:
            first = first_error(group)
            raise first from first.__cause__
        finally:
            if unclaimed:  # cancelled before some starts began
                self._starting -= unclaimed
                self._wake_for_capacity()

    def _recycle(self, w: WorkerHandle) -> None:
        """Replace `w` (clean, nothing in flight): it exits, a new one starts on demand."""
        reason = w.recycle_reason
        assert reason is not None
        self._counts.recycled_by[reason] += 1
        w.mark_ended(reason)
        worker_event(INFO, f"worker {w.pid} recycled ({reason})", w.pid, reason=reason)
        self._retire(w)
        self._stopped(w)
        self._wake_for_capacity()

    def _retire(self, w: WorkerHandle) -> None:
        """Let a worker go without waiting: closing its channel makes it exit."""
        with self._lock:
            self._workers.discard(w)
        w.close_channel()
        self._retired.append(w)
        for r in self._retired:
            if r.poll() is not None:
                r.output.close()
        self._retired = [r for r in self._retired if r.proc.returncode is None]

    def resize(self, size: int) -> None:
        """Grow or shrink the pool; extra workers leave as they become idle."""
        self.size = size
        while len(self._workers) > size and self._idle:
            with self._lock:
                w = self._idle.pop()
            self._retire(w)
        self._wake_for_capacity()

    async def aclose(self, grace: float = 2.0) -> None:
        """Stop every worker: idle ones are asked to exit, busy ones are killed (the
        calls using them fail with "pool is closed")."""
        self.closed = True
        if os.getpid() != self._owner:  # a forked child's copy: the workers are the parent's
            return
        if self._monitor is not None:
            self._monitor.stop()
        for waiter in self._waiters:
            waiter.event.set()
        with self._lock:
            idle = self._idle
            busy = [w for w in self._workers if w not in idle]
            retired = self._retired
            self._idle, self._retired = [], []
            self._workers.clear()
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for w in idle + retired:
                    tg.start_soon(w.stop, grace)
                for w in busy:
                    tg.start_soon(w.kill)
        for w in idle + busy:
            worker_event(INFO, f"worker {w.pid} exited (pool closed)", w.pid, reason="closed")

    # -- what the health monitor sees (its thread) ------------------------------------

    def _ensure_monitor(self) -> None:
        if self._monitor is None or not self._monitor.running:
            self._monitor = Monitor(self)

    def check_interval(self) -> float:
        """Seconds between the monitor's rounds: the pool's interval, scaled by the
        most watchful profile among the calls running now."""
        factors = [_PROFILES[p].interval for p, n in self._profiles.items() if n > 0]
        return self.policy.interval * min(factors, default=1.0)

    def health_targets(self) -> list[Gauged]:
        """Workers the monitor should read."""
        with self._lock:
            return [w for w in self._workers if w.proc.returncode is None]

    def reap_idle(self, now: float) -> None:
        """Stop the workers idle past `idle_limit`, the longest idle first, down to
        `min_workers` (blocking: the monitor's thread). They leave the pool at once (a
        new worker may start in their place) but count as alive until reaped."""
        limit = self.idle_limit
        if self.closed:
            return
        with self._lock:
            expired: list[WorkerHandle] = []
            if limit is not None:
                expired = [w for w in self._idle if w.idle_for(now) >= limit]
                expired.sort(key=lambda w: w.idle_for(now), reverse=True)
                del expired[max(0, len(self._workers) - self.min_workers) :]
            expired += [w for w in self._idle if w.recycle_reason and w not in expired]
            expired = [w for w in expired if not w.has_control]
            for w in expired:
                reason = w.recycle_reason or "idle"
                self._idle.remove(w)
                self._workers.discard(w)
                w.mark_ended(reason)
                self._counts.recycled_by[reason] += 1
                worker_event(INFO, f"worker {w.pid} recycled ({reason})", w.pid, reason=reason)
            self._leaving.update(expired)
        n = len(self._workers) + len(expired)
        for i, w in enumerate(expired):
            reason = w.recycle_reason or "idle"
            self._scaled(n - i, n - i - 1, _STOP_REASON.get(reason, "recycle"), reason)
        for w in expired:
            w.stop_blocking()
        with self._lock:
            self._leaving.difference_update(expired)


def _repeats(exc: WorkerStartError, earlier: list[WorkerStartError]) -> bool:
    """Did `init` fail with the same error before (a failure that will not go away)?"""
    cause = exc.__cause__
    return cause is not None and any(
        type(e.__cause__) is type(cause) and str(e.__cause__) == str(cause) for e in earlier
    )

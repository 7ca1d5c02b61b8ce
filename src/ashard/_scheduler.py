"""The supervisor: leases workers to jobs and drives chunks through them.

::

    caller task ── Scheduler.run(job) ── task group ──┬── lease loop: acquire workers
                                                      ├── drive(worker 1) ─┐
                                                      └── drive(worker N) ─┤
                        Job (bookkeeping) <── deliver / worker_lost ───────┘
                                                           ⇅ Channel (socketpair)
                                                      worker process

A worker is leased to one job (or one `call`) at a time, so a channel only ever
carries one job's chunks and its stream can be settled on its own. A drive keeps a
small window of chunks in flight on its worker, reads results, and refills. When a
job of another caller waits with fewer workers than this job holds, the drive lets
its window drain and hands the worker over: workers are shared fairly.

No task outlives the call that started it, and nothing here belongs to an event loop:
a pool's workers can serve one loop after another (Jupyter, pytest, `anyio.run`).

On the way out (job done, aborted, or the caller cancelled) each drive *settles* its
worker, shielded: a worker still running chunks is told to drop them (CANCEL, then
SIGUSR1 to interrupt the running shard) and killed if it does not within
`CANCEL_GRACE`. A worker goes back to the pool only with an empty, clean channel.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.abc

from ashard._channel import ChannelClosed, RawFrame, encode, encode_many
from ashard._handle import WorkerConfig, WorkerHandle
from ashard._health import PROFILES, HealthPolicy
from ashard._job import Job
from ashard._monitor import Monitor
from ashard._protocol import (
    CALL,
    CANCEL,
    INTERRUPTED,
    JOB,
    RAISED,
    RESULT,
    RUN,
    SEGMENTS,
    TIMEOUT,
)
from ashard._serialize import decode_exception, dumps_named
from ashard.errors import RemoteTraceback, ShardTimeout, WorkerCrashed, describe_exit

CANCEL_GRACE = 1.0
"""Seconds a worker gets to stop a cancelled shard before it is killed."""
KILL_GRACE = 0.5
"""Past `timeout`, seconds the parent waits for the worker's own timer before killing."""
ENCODE_INLINE_SECONDS = 0.002
"""Chunks that took longer than this to pickle are pickled off the event loop next time."""
BACKOFF_FREE_CRASHES = 2
"""Crashes in a row that are replaced at once; after that, spawns back off."""
BACKOFF_MAX = 0.5
"""Seconds: the longest pause before spawning a replacement in a crash storm."""


def spawn_delay(streak: int) -> float:
    """Pause before a spawn after `streak` worker deaths with no result in between:
    none for the first few, then doubling from 50 ms up to `BACKOFF_MAX`."""
    if streak <= BACKOFF_FREE_CRASHES:
        return 0.0
    return min(BACKOFF_MAX, 0.05 * 2.0 ** (streak - BACKOFF_FREE_CRASHES - 1))


class Tenant(Protocol):
    """Whatever holds leases: a `Job`, or one `call`."""

    leased: int


@dataclass(eq=False)
class _CallTenant:
    leased: int = 0


@dataclass(eq=False)
class _Waiter:
    tenant: Tenant
    event: anyio.Event = field(default_factory=anyio.Event)
    worker: WorkerHandle | None = None
    spawn: bool = False


class _Hung(Exception):
    """The worker said nothing for longer than the timeout allows."""


@dataclass
class SchedulerStats:
    started: int = 0
    crashed: int = 0
    timed_out: int = 0
    shards_done: int = 0
    recycled_by: Counter[str] = field(default_factory=Counter)  # reason -> workers

    @property
    def recycled(self) -> int:
        return sum(self.recycled_by.values())


class Scheduler:
    """Owns the worker processes of one `Pool`; runs jobs and calls on them."""

    def __init__(self, size: int, config: WorkerConfig, policy: HealthPolicy | None = None) -> None:
        self.size = size
        self.config = config
        self.policy = policy or HealthPolicy()
        self.stats = SchedulerStats()
        self.closed = False
        self._lock = threading.Lock()  # _idle and _workers, shared with the monitor
        self._monitor: Monitor | None = None
        self._profiles: Counter[str] = Counter()  # profiles of the jobs running now
        self._crash_streak = 0
        self._workers: set[WorkerHandle] = set()
        self._starting = 0
        self._idle: list[WorkerHandle] = []
        self._waiters: list[_Waiter] = []
        self._retired: list[WorkerHandle] = []
        self._seq = itertools.count()
        self.keys = itertools.count()

    # -- leasing ----------------------------------------------------------------------

    @property
    def workers(self) -> list[WorkerHandle]:
        return list(self._workers)

    def _capacity(self) -> int:
        return self.size - len(self._workers) - self._starting

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this ashard.Pool is closed")

    def _retire(self, w: WorkerHandle) -> None:
        """Let a worker go without waiting: closing its channel makes it exit."""
        with self._lock:
            self._workers.discard(w)
        w.channel.close()
        self._retired.append(w)
        self._retired = [r for r in self._retired if r.proc.poll() is None]

    def _pop_idle(self) -> WorkerHandle | None:
        while True:
            with self._lock:
                if not self._idle:
                    return None
                w = self._idle.pop()
            if w.alive:
                return w
            with self._lock:
                self._workers.discard(w)
            self._count_death(w, timed_out=False)

    def _count_death(self, w: WorkerHandle, *, timed_out: bool) -> None:
        if timed_out:
            self.stats.timed_out += 1
            w.end_reason = w.end_reason or "timed out"
        elif w.end_reason == "mem_hard":
            self.stats.recycled_by["mem_hard"] += 1
        else:
            self.stats.crashed += 1
            w.end_reason = "crashed"
        self._crash_streak += 1

    def _recycle(self, w: WorkerHandle, tenant: Tenant) -> None:
        """Replace `w` (clean, nothing in flight): it exits, a new one starts on demand."""
        tenant.leased -= 1
        reason = w.recycle_reason or "recycled"
        self.stats.recycled_by[reason] += 1
        w.end_reason = reason
        self._retire(w)
        self._wake_for_capacity()

    # -- health -----------------------------------------------------------------------

    def check_interval(self) -> float:
        """Seconds between the monitor's rounds: the pool's interval, scaled by the
        most watchful profile among the calls running now."""
        factors = [PROFILES[p].interval for p, n in self._profiles.items() if n > 0]
        return self.policy.interval * min(factors, default=1.0)

    def health_targets(self) -> list[WorkerHandle]:
        """Workers the monitor should read (called from its thread)."""
        with self._lock:
            return [w for w in self._workers if w.proc.returncode is None]

    def reap_idle(self, now: float) -> list[WorkerHandle]:
        """Take idle workers past `idle_timeout` out of the pool (monitor thread); the
        caller closes and reaps them."""
        limit = self.policy.idle_timeout
        if limit is None or self.closed:
            return []
        with self._lock:
            expired = [w for w in self._idle if now - w.idle_since >= limit and not w.drops]
            for w in expired:
                self._idle.remove(w)
                self._workers.discard(w)
                w.end_reason = "idle"
                self.stats.recycled_by["idle"] += 1
        return expired

    def _ensure_monitor(self) -> None:
        if self._monitor is None or not self._monitor.running:
            self._monitor = Monitor(self)

    async def acquire(self, tenant: Tenant) -> WorkerHandle:
        """A worker for `tenant`: an idle one, a new one, or the next one released."""
        while True:
            self._check_open()
            if not self._waiters:
                w = self._pop_idle()
                if w is not None:
                    tenant.leased += 1
                    return w
                if self._capacity() > 0:
                    return await self._spawn_for(tenant)
            waiter = _Waiter(tenant)
            self._waiters.append(waiter)
            try:
                await waiter.event.wait()
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.worker is not None:
                    self.release(waiter.worker, tenant)
                elif waiter.spawn:
                    self._wake_for_capacity()
                raise
            if waiter.worker is not None:
                return waiter.worker
            if waiter.spawn and self._capacity() > 0:
                return await self._spawn_for(tenant)

    async def _spawn_for(self, tenant: Tenant) -> WorkerHandle:
        self._starting += 1
        try:
            delay = spawn_delay(self._crash_streak)
            if delay:
                await anyio.sleep(delay)  # workers keep dying: no hot respawn loop
            with anyio.CancelScope(shield=True):
                w = await WorkerHandle.start(self.config)
        finally:
            self._starting -= 1
        if self.closed:
            await w.stop(1.0)
            self._check_open()
        with self._lock:
            self._workers.add(w)
        self.stats.started += 1
        tenant.leased += 1
        self._ensure_monitor()
        return w

    async def replenish(self) -> None:
        """Start a replacement for a worker that died, so the pool stays at its size."""
        if self.closed or self._capacity() <= 0:
            return
        tenant = _CallTenant()
        self.release(await self._spawn_for(tenant), tenant)

    async def start_all(self) -> None:
        """Bring the pool up to size (for a warm `async with Pool(...)`)."""
        tenant = _CallTenant()
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(self._capacity()):
                    tg.start_soon(self._start_one, tenant)
        except BaseExceptionGroup as group:
            first = _first_error(group)
            raise first from first.__cause__

    async def _start_one(self, tenant: Tenant) -> None:
        w = await self._spawn_for(tenant)
        self.release(w, tenant)

    def release(self, w: WorkerHandle, tenant: Tenant) -> None:
        """Give a settled worker back: to the fairest waiter, else to the idle list."""
        if w.recycle_reason is not None and not self.closed:
            self._recycle(w, tenant)
            return
        tenant.leased -= 1
        if self.closed or len(self._workers) > self.size:
            self._retire(w)
            return
        if self._waiters:
            waiter = min(self._waiters, key=lambda wt: wt.tenant.leased)
            self._waiters.remove(waiter)
            waiter.worker = w
            waiter.tenant.leased += 1
            waiter.event.set()
            return
        w.idle_since = time.monotonic()
        with self._lock:
            self._idle.append(w)

    def discard(self, w: WorkerHandle, tenant: Tenant) -> None:
        """Forget a dead worker; a waiter may start a replacement."""
        tenant.leased -= 1
        with self._lock:
            self._workers.discard(w)
        self._wake_for_capacity()

    def _wake_for_capacity(self) -> None:
        if self._waiters and self._capacity() > 0:
            waiter = min(self._waiters, key=lambda wt: wt.tenant.leased)
            self._waiters.remove(waiter)
            waiter.spawn = True
            waiter.event.set()

    def should_yield(self, tenant: Tenant) -> bool:
        """Is another caller waiting with fewer workers than `tenant` holds?"""
        return any(
            w.tenant is not tenant and w.tenant.leased < tenant.leased for w in self._waiters
        )

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

    # -- jobs -------------------------------------------------------------------------

    async def run(self, job: Job) -> None:
        """Run `job` until every position is resolved, it aborts, or the caller cancels."""
        self._profiles[job.opts.profile] += 1
        try:
            async with anyio.create_task_group() as tg:
                lease_scope = anyio.CancelScope()
                tg.start_soon(self._lease_loop, job, tg, lease_scope)
                while not job.over:
                    await job.wait_change()
                lease_scope.cancel()
                if not job.finished:
                    tg.cancel_scope.cancel()
        except BaseException:
            job.abort()
            raise
        finally:
            self._profiles[job.opts.profile] -= 1
            if job.progress is not None:
                job.progress.close()

    async def _lease_loop(
        self, job: Job, tg: anyio.abc.TaskGroup, scope: anyio.CancelScope
    ) -> None:
        with scope:
            try:
                while not job.over:
                    if job.has_work() and job.leased < self.size:
                        w = await self.acquire(job)
                        await tg.start(self._drive, job, w)
                    else:
                        await job.wait_change()
            except Exception as exc:  # no worker could be had: the job cannot go on
                job.abort(exc)

    async def _drive(
        self, job: Job, w: WorkerHandle, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        started = False
        lost: bool | None = None  # None: worker fine; False: died; True: hung past timeout
        job.handles[w.pid] = w
        try:
            try:
                await self._fill(job, w)
                task_status.started()
                started = True
                while True:
                    if w.inflight:
                        self._handle(job, w, await self._receive(job, w))
                    if not self.should_yield(job):
                        await self._fill(job, w)
                    if not w.inflight:
                        break
            except ChannelClosed:
                lost = False
            except _Hung:
                lost = True
        finally:
            if not started:
                task_status.started()
            with anyio.CancelScope(shield=True):
                if lost is None:
                    await self._settle(job, w)
                else:
                    await self._lose(job, w, timed_out=lost)

    async def _fill(self, job: Job, w: WorkerHandle) -> None:
        """Top up `w`'s window with `job`'s chunks, in one send."""
        msgs = w.take_control()
        fds: list[int] = []
        was_idle = not w.inflight
        window = 0 if w.recycle_reason else job.window()
        max_tasks = self.policy.max_tasks
        while len(w.inflight) < window:
            limit = None if max_tasks is None else max_tasks - w.tasks
            if limit is not None and limit <= 0:
                break
            chunk = job.take_chunk(next(self._seq), limit)
            if chunk is None:
                break
            w.tasks += chunk.count
            if job.key not in w.jobs:
                w.jobs.add(job.key)
                job.registered.add(w)
                fds += _segments_for(job, w, msgs)
                msgs.append((JOB, job.key, job.spec))
            msgs.append(
                (RUN, job.key, chunk.seq, chunk.first, chunk.count, chunk.attempts, chunk.items)
            )
            w.inflight.append(chunk)
        if not msgs:
            return
        if was_idle:
            w.last_heard = time.monotonic()
        await w.channel.send(await self._encode(job, msgs), fds)

    async def _encode(self, job: Job, msgs: list[Any]) -> list[Any]:
        if job.encode_in_thread:
            return await anyio.to_thread.run_sync(encode_many, msgs)
        t0 = time.perf_counter()
        parts = encode_many(msgs)
        if time.perf_counter() - t0 > ENCODE_INLINE_SECONDS:
            job.encode_in_thread = True
        return parts

    async def _receive(self, job: Job, w: WorkerHandle) -> list[Any]:
        timeout = job.opts.timeout
        if timeout is None:
            return await _receive(w)
        wait = w.last_heard + timeout + KILL_GRACE - time.monotonic()
        with anyio.move_on_after(max(wait, 0.0)):
            return await _receive(w)
        raise _Hung

    def _handle(self, job: Job, w: WorkerHandle, msgs: list[Any]) -> None:
        w.last_heard = time.monotonic()
        for msg in msgs:
            if msg[0] != RESULT:
                raise RuntimeError(f"ashard internal error: unexpected message {msg[0]!r}")
            _, seq, k0, values, errors, elapsed, final, writes, rss = msg
            chunk = w.inflight[0]
            if chunk.seq != seq:
                raise RuntimeError("ashard internal error: results out of order")
            busy = job.deliver(chunk, k0, values, errors, elapsed, final, w.pid, writes)
            n = len(values)
            w.shards_done += n
            w.busy += busy
            self.stats.shards_done += n
            if final:
                w.inflight.popleft()
                w.observe(rss)
                if w.recycle_reason is None:
                    w.recycle_reason = self.policy.soft_reason(w, PROFILES[job.opts.profile])
        if msgs:
            self._crash_streak = 0

    async def _settle(self, job: Job, w: WorkerHandle) -> None:
        """Make `w` clean (nothing in flight) and give it back; kill it if it won't be."""
        if w.inflight and not w.channel.broken:
            job.abort()
            try:
                await w.channel.send(encode((CANCEL, job.key)))
                w.interrupt()
                with anyio.move_on_after(CANCEL_GRACE):
                    while w.inflight:
                        self._handle(job, w, await _receive(w))
            except ChannelClosed:
                pass
        if w.inflight or not w.alive:
            w.inflight.clear()
            await w.kill()
            self.discard(w, job)
            return
        self.release(w, job)

    async def _lose(self, job: Job, w: WorkerHandle, *, timed_out: bool) -> None:
        """`w` died or hung: account for its chunks and forget it."""
        if timed_out or await w.wait_exit(1.0) is None:
            await w.kill()
        self._count_death(w, timed_out=timed_out)
        chunks = list(w.inflight)
        w.inflight.clear()
        job.worker_lost(
            chunks,
            pid=w.pid,
            timed_out=timed_out,
            exit_info=w.exit_info(),
            reason=self._memory_note(w),
        )
        self.discard(w, job)
        await self.replenish()

    def _memory_note(self, w: WorkerHandle) -> str | None:
        if w.end_reason != "mem_hard":
            return None
        hard = self.policy.hard_cap or 0
        return (
            f"killed by ashard: its private memory reached {w.peak_rss / 2**20:.0f} MiB, "
            f"past the hard limit of {hard / 2**20:.0f} MiB (mem_cap x {self.policy.hard_factor})"
        )

    def forget(self, job: Job) -> None:
        """The job is over: workers that loaded it drop its fn and borrow, and the
        shared memory made for it alone is let go."""
        for w in job.registered:
            w.jobs.discard(job.key)
            w.forget.append(job.key)
        if job.exported is not None:
            job.exported.close()  # tells holders to DROP what this call shared
        for w in job.registered:
            w.flush_control()
        job.registered.clear()

    # -- one-shot calls ---------------------------------------------------------------

    async def call(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` on a worker; raise what it raises."""
        seq = next(self._seq)
        try:
            parts = encode((CALL, seq, fn, args, kwargs, timeout))
        except Exception:
            _name_unpicklable(fn, args, kwargs)
            raise
        tenant = _CallTenant()
        w = await self.acquire(tenant)
        if w.forget or w.drops:
            parts = encode_many(w.take_control()) + parts
        msg = None
        lost: bool | None = None
        w.tasks += 1
        try:
            try:
                w.last_heard = time.monotonic()
                await w.channel.send(parts)
                msg = await self._receive_call(w, timeout)
                w.observe(msg[8])
                self._crash_streak = 0
                if w.recycle_reason is None:
                    w.recycle_reason = self.policy.soft_reason(w, PROFILES["default"])
            except ChannelClosed:
                lost = False
            except _Hung:
                lost = True
        finally:
            if lost is None and msg is not None:
                self.release(w, tenant)  # the common case: no shielded scope to pay for
            else:
                with anyio.CancelScope(shield=True):
                    if lost is not None:
                        await self._lose_call(w, tenant, lost)
                    else:
                        await self._settle_call(w, tenant)
        if lost is not None:
            raise self._call_lost_error(w, timeout, lost)
        assert msg is not None
        return _call_outcome(msg, timeout)

    async def _receive_call(self, w: WorkerHandle, timeout: float | None) -> Any:
        if timeout is None:
            return (await _receive(w, wait_first=True))[0]
        with anyio.move_on_after(timeout + KILL_GRACE):
            return (await _receive(w, wait_first=True))[0]
        raise _Hung

    async def _settle_call(self, w: WorkerHandle, tenant: Tenant) -> None:
        """The caller was cancelled mid-call: interrupt, wait briefly, else kill."""
        if not w.channel.broken and w.alive:
            w.interrupt()
            with anyio.move_on_after(CANCEL_GRACE):
                try:
                    await _receive(w)
                except ChannelClosed:
                    pass
                else:
                    self.release(w, tenant)
                    return
        await w.kill()
        self.discard(w, tenant)

    async def _lose_call(self, w: WorkerHandle, tenant: Tenant, timed_out: bool) -> None:
        if timed_out or await w.wait_exit(1.0) is None:
            await w.kill()
        self._count_death(w, timed_out=timed_out)
        self.discard(w, tenant)
        await self.replenish()

    def _call_lost_error(
        self, w: WorkerHandle, timeout: float | None, timed_out: bool
    ) -> Exception:
        if timed_out:
            return ShardTimeout(f"call ran past its timeout of {timeout} s", shard=None, attempts=1)
        exitcode, signum = w.exit_info()
        note = self._memory_note(w)
        return WorkerCrashed(
            f"call: {describe_exit(w.pid, exitcode, signum)}" + (f"; {note}" if note else ""),
            shard=None,
            attempts=1,
            exitcode=exitcode,
            signal=signum,
        )


def _segments_for(job: Job, w: WorkerHandle, msgs: list[Any]) -> list[int]:
    """Queue SEGMENTS messages for the shared memory of `job` that `w` lacks (a new or
    replacement worker); return the fds to send with them."""
    if job.exported is None:
        return []
    new = [seg for seg in job.exported.segments if seg.id not in w.segments]
    if not new:
        return []
    msgs.append((SEGMENTS, [seg.id for seg in new]))
    for seg in new:
        w.segments.add(seg.id)
        seg.holders.add(w)
    return [seg.fd for seg in new]


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The first real error in a task group's failure (the others are its echoes)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_error(exc)
        if not isinstance(exc, anyio.get_cancelled_exc_class()):
            return exc
    return group


async def _receive(w: WorkerHandle, *, wait_first: bool = False) -> list[Any]:
    """Messages from `w`; large frames are unpickled off the event loop."""
    msgs = await w.channel.receive(wait_first=wait_first)
    for i, m in enumerate(msgs):
        if isinstance(m, RawFrame):
            msgs[i] = await anyio.to_thread.run_sync(m.decode)
    return msgs


def _name_unpicklable(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise a `TypeError` naming the first part of a call that cannot be pickled."""
    dumps_named(fn, "fn", [])
    for i, arg in enumerate(args):
        dumps_named(arg, f"argument {i} of the call", [])
    for name, value in kwargs.items():
        dumps_named(value, f"keyword argument {name!r} of the call", [])


def _call_outcome(msg: Any, timeout: float | None) -> Any:
    values, errors = msg[3], msg[4]
    if not errors:
        return values[0]
    _, kind, detail = errors[0]
    if kind == RAISED:
        exc = decode_exception(detail)
        if exc.__cause__ is None:
            exc.__cause__ = RemoteTraceback(detail[3])
        raise exc
    if kind == TIMEOUT:
        raise ShardTimeout(f"call ran past its timeout of {timeout} s", shard=None, attempts=1)
    assert kind == INTERRUPTED
    raise RuntimeError("ashard internal error: call interrupted without cancellation")

"""The local backend: drives the chunks of jobs through leased worker processes.

::

    Pool ── Scheduler.run(job) ── export borrow/out (thread) ── task group ──┐
                                                                              │
        lease loop: WorkerSet.acquire ──> drive(lease 1) ─┐                   │
                                          drive(lease N) ─┤ take_chunk        │
                                                          ▼                   │
        Job (bookkeeping) <── deliver / worker_lost ── _Lease: chunks in flight
                                                          ⇅ Channel (socketpair)
                                                   worker process (ashard._worker)

A worker is leased to one job at a time (or to the pool's `call`s: `ashard._lanes`), so
a channel only ever carries one job's chunks and its stream can be settled on its own. A
drive keeps a small window of chunks in flight on its worker (the lease holds them),
reads results, and refills. When a job of another caller waits with fewer workers than
this job holds, the drive lets its window drain and hands the worker over: workers are
shared fairly (`ashard._workers.WorkerSet`). A window is the worker's own queue: near
the end of a job, when a worker has nothing left to take while another has said nothing
for `STALL_SECONDS` with single shards queued behind the one it runs, the lease loop asks
for those back (RECALL): the worker answers each as never run when its turn comes, and
they are queued again, uncharged, for whichever worker is free first.

No task outlives the call that started it, and nothing here belongs to an event loop:
a pool's workers can serve one loop after another (Jupyter, pytest, `anyio.run`).

On the way out (job done, aborted, or the caller cancelled) each drive *settles* its
worker, shielded: a worker still running chunks is told to drop them (CANCEL, then
SIGUSR1 to interrupt the running shard) and killed if it does not within
`CANCEL_GRACE`. A worker goes back to the pool only with an empty, clean channel.
A worker that dies or hangs is *lost*: its chunks go back to the job
(`Job.worker_lost`), it is counted and replaced.
"""

from __future__ import annotations

import functools
import itertools
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel

from ashard._backend import (
    CallWork,
    Chunk,
    JobPort,
    JobWork,
    OneLoop,
    load_supervisor,
    on_one_loop,
)
from ashard._budget import Budget
from ashard._framing import (
    Buffer,
    ChannelClosed,
    encode,
    encode_many,
)
from ashard._handle import WorkerConfig, WorkerHandle
from ashard._health import PROFILES, HealthPolicy
from ashard._lanes import CANCEL_GRACE, KILL_GRACE, CallLanes, Hung, LaneLost
from ashard._log import logger, warn_user
from ashard._memory import available_bytes
from ashard._outcomes import (
    CRASHED,
    call_outcome,
    failure,
    interrupt_in,
    unreadable_result,
    warn_hygiene,
)
from ashard._positions import CUT_FROM, Cut
from ashard._protocol import (
    CALL,
    CANCEL,
    INTERRUPTED,
    JOB,
    RECALL,
    RUN,
    SEGMENTS,
    TIMEOUT,
    JobSpec,
    Payload,
    ProtocolViolation,
    Result,
    SharedCall,
    split_result,
)
from ashard._reports import Report, pump_output, receive, receive_until
from ashard._serialize import (
    MAX_BUFFERS,
    Joined,
    dumps_named,
    holds_shared_arrays,
    pack,
    pickle_payload,
    uncopied,
    uncopied_items,
)
from ashard._sources import with_sources
from ashard._workers import DUMP_WAIT, WorkerSet
from ashard.errors import ShardError, ShardTimeout
from ashard.results import PoolStats

if TYPE_CHECKING:
    from ashard._borrowed import BorrowCache
    from ashard._export import Exported
    from ashard._shm import Segment

__all__ = ["Scheduler"]

MAX_UNDELIVERED = 5
"""Times in a row a call is sent again because its worker had ended before it could take
it (those sends cost no attempt); past that it fails as a crash."""
DELIVER_SECONDS = 0.0002
"""Time one step of a drive spends delivering what a worker reported, at most: the rest
is delivered after the event loop had its turn. Each worker's drive takes such a step in
the same turn of the loop, so this is well under the millisecond a turn may take."""
PUMP_AFTER_SECONDS = 0.05
"""A job's worker output is written by tasks of their own (they pump it as it comes)
once the job has run this long on the worker; before, the job's drive writes it when
it wakes for it. Most jobs end sooner, and the pumping tasks would cost a short job a
quarter of its time on the loop."""
AUTO_BUDGET_SHARE = 0.85
"""`mem_budget="auto"`: this share of the memory the process may still use."""
ENCODE_INLINE_SECONDS = 0.002
"""Chunks that took longer than this to pickle are pickled off the event loop..."""
SLOW_ENCODES = 3
"""...once this many sends in a row did (the clock is the wall's: on a busy machine the
OS pauses the caller for milliseconds at a time, and one paused send says nothing)."""
APART_FROM = 1 << 13
"""Chunks that list this many items between them are pickled in a loop step of their
own, after the one that took them (each can take half a millisecond at 32k items)."""
FEW_ITEMS = 64
"""A chunk of at most this many items (a map's chunks are this short when its items are
large) has its long lists and tuples among them pickled a piece per loop step."""
PIECE_SECONDS = 0.0004
"""A long shard's items are pickled a piece per loop step, each piece sized to take about
this long (from `FIRST_PIECE` items, within `MIN_PIECE` and `MAX_PIECE`)."""
FIRST_PIECE, MIN_PIECE, MAX_PIECE = 4096, 1024, 1 << 16
STALL_SECONDS = 0.002
"""A worker silent this long with single shards queued behind the one it runs, while
the job has nothing left for an idle worker, is asked to give the queued ones back."""


@dataclass(eq=False)
class _Run:
    """A job as this backend runs it: its key on the workers, what they receive, the
    shared memory made for it, and the workers that loaded it."""

    job: JobPort
    work: JobWork
    key: int
    spec: JobSpec
    exported: Exported | None
    loaded_on: set[WorkerHandle] = field(default_factory=set)
    encode_in_thread: bool = False
    slow_encodes: int = 0  # sends in a row that took over ENCODE_INLINE_SECONDS
    deliver_spent: float = 0.0  # seconds spent delivering, older steps weighing less
    deliver_done: float = 0.0  # the positions delivered in them, weighed alike
    acquiring: int = 0  # workers being leased for it now
    budget: Budget | None = None  # the pool's memory budget, if the job is held to it
    blocked: bool = False  # a chunk found no room in the budget; none was made since

    def delivered(self, n: int, seconds: float) -> None:
        """One step delivered `n` positions in `seconds`."""
        self.deliver_spent = 0.5 * self.deliver_spent + seconds
        self.deliver_done = 0.5 * self.deliver_done + n

    def deliver_cost(self) -> float:
        """Seconds a position takes to deliver, as learned (0.0: not yet). Weighed by
        positions, not by steps: a step's own fixed cost, paid by the first reports of
        one position each, must not make every later position look that dear."""
        return self.deliver_spent / self.deliver_done if self.deliver_done else 0.0


@dataclass(eq=False, slots=True)
class _Lease:
    """One worker driven for one run: the chunks it holds, oldest first, and when it
    last said anything (for timeouts)."""

    run: _Run
    worker: WorkerHandle
    inflight: deque[Chunk] = field(default_factory=deque)
    pending: deque[Report] = field(default_factory=deque)  # read, not yet delivered
    last_heard: float = 0.0
    recalled: set[int] = field(default_factory=set)  # seqs of chunks asked back (RECALL)


@dataclass(frozen=True, slots=True)
class _Sent:
    """A call as each attempt sends it: its seq, its CALL frames, and the segments it
    maps (`SharedCall`)."""

    seq: int
    parts: list[Buffer]
    segments: Sequence[Segment] = ()


@dataclass(frozen=True, slots=True)
class _Lost:
    """A call whose worker died or hung, or that ran past its timeout, and the error
    that says so. `delivered` False: the call never started (the worker was dead
    before it could take it, or died running a call queued before it)."""

    error: ShardError
    delivered: bool = True


class Scheduler:
    """Runs jobs and calls on the worker processes of one `Pool` (a `Backend`)."""

    def __init__(
        self, size: int, config: WorkerConfig, policy: HealthPolicy, keep_borrowed: bool = True
    ) -> None:
        self.workers = WorkerSet(size, functools.partial(WorkerHandle.start, config), policy)
        self.one_loop = OneLoop()
        self.policy = policy
        self.lanes = CallLanes(self.workers, policy)
        self.borrowed: BorrowCache | None = None  # made on the first borrow, if it keeps
        self.budget: Budget | None = None  # made for the first job held to one
        self._keep_borrowed = keep_borrowed
        self._seq = itertools.count()
        self._keys = itertools.count()
        self._leases: dict[WorkerHandle, _Lease] = {}  # the workers jobs drive now

    # -- the pool ---------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.workers.size

    @property
    def closed(self) -> bool:
        return self.workers.closed

    def resize(self, size: int) -> None:
        self.workers.resize(size)

    @on_one_loop
    async def start(self, up_to: int | None = None) -> None:
        await self.workers.start_all(up_to)

    @on_one_loop
    async def aclose(self) -> None:
        if self.borrowed is not None:
            self.borrowed.close()
        await self.workers.aclose()

    def stats(self) -> PoolStats:
        return self.workers.stats()

    def pids(self) -> list[int]:
        return self.workers.pids()

    @on_one_loop
    async def stacks(self) -> dict[int, tuple[int | None, str | None]]:
        """Every busy worker's stack now, by pid, with the position it runs (the first of
        its oldest chunk not yet reported; None for a `call`): its faulthandler dumps
        every thread from a signal handler, and the shard goes on undisturbed. The
        text is None where the worker could not answer within `DUMP_WAIT`."""
        busy: dict[WorkerHandle, int | None] = {}
        for w, lease in list(self._leases.items()):
            if lease.inflight and w.alive:
                chunk = lease.inflight[0]
                busy[w] = chunk.first + min(chunk.done, chunk.count - 1)
        for w in self.lanes.busy():
            busy.setdefault(w, None)
        found: dict[int, tuple[int | None, str | None]] = {}

        async def ask(w: WorkerHandle, pos: int | None) -> None:
            found[w.pid] = (pos, await w.dump_stack(DUMP_WAIT))

        async with anyio.create_task_group() as tg:
            for w, pos in busy.items():
                tg.start_soon(ask, w, pos)
        return dict(sorted(found.items()))

    # -- jobs -------------------------------------------------------------------------

    @on_one_loop
    async def run(
        self, job: JobPort, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run `job` until every position is resolved, it aborts, or the caller cancels."""
        run = await self._prepare(job)
        task_status.started()  # the job is accepted (the pool may resize for it now)
        job.served_by(self.size)
        try:
            with self.workers.watching(run.work.opts.profile), self.workers.listening(job.scaled):
                async with anyio.create_task_group() as tg:
                    lease_scope = anyio.CancelScope()
                    tg.start_soon(self._lease_loop, run, tg, lease_scope)
                    while not job.over:
                        await job.wait_change()
                    lease_scope.cancel()
                    if not job.finished:
                        tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            job.abort()
            interrupt = interrupt_in(group)
            if interrupt is not None:
                raise interrupt from None  # Ctrl-C in the caller: as itself, not in a group
            raise
        except BaseException:
            job.abort()
            raise
        finally:
            self._forget(run)
            _warn_oversized(run)

    async def _prepare(self, job: JobPort) -> _Run:
        """Share or pickle the job's borrow and out, and share the large arrays its `fn`
        captured, off the event loop; nothing leaks if that fails or is cancelled."""
        work = job.work()
        exported = None
        fn_arrays = holds_shared_arrays(work.fn[1])
        if work.borrow or work.out or fn_arrays:
            modules = _imports_for((*work.borrow.values(), *work.out.values()))
            if modules:
                self.workers.preload(modules)  # while the data is copied, not after
            given = work.borrow
            if _any_long(given.values()):  # pickled in a thread, they would hold the GIL
                joined = await _long_ones_in_pieces(given.values())
                given = {name: joined.get(id(v), v) for name, v in given.items()}
            fn = work.fn if fn_arrays else None
            exported = await self._export(given, work.out, work.opts.cow, fn)
        opts = work.opts
        borrow = exported.kwargs if exported else None
        fn = work.fn if exported is None or exported.fn is None else exported.fn
        spec = JobSpec(work.kind, fn, borrow, opts.timeout, opts.seed, work.layout,
                       work.sys_path, work.results, opts.footprint == "learn",
                       opts.shard_concurrency)  # fmt: skip
        run = _Run(job, work, next(self._keys), spec, exported)
        job.memory.cap = self.policy.mem_cap
        if self.policy.mem_budget is not None or opts.footprint is not None:
            run.budget = await self._budget()
            job.memory.budget, job.memory.budget_source = run.budget.total, run.budget.source
        return run

    async def _export(
        self,
        borrow: Mapping[str, Any],
        out: Mapping[str, Any],
        cow: str,
        fn: Payload | None,
    ) -> Exported:
        """`ashard._export.export` of these, in a thread (loaded first: 15 ms, once), with
        the pool's cache of borrowed arrays if it keeps one; nothing leaks if that fails
        or is cancelled."""
        await load_supervisor("ashard._borrowed", "ashard._export")
        from ashard._borrowed import BorrowCache  # loaded just now, off the loop
        from ashard._export import export

        if self._keep_borrowed and self.borrowed is None:
            self.borrowed = BorrowCache()
        made: list[Exported] = []

        def share() -> Exported:
            made.append(export(borrow, out, cow, self.borrowed, fn))
            return made[-1]

        try:
            return await anyio.to_thread.run_sync(share)
        except BaseException:
            for e in made:
                e.close()
            raise

    async def _budget(self) -> Budget:
        """The pool's memory budget, made on first use: `mem_budget` bytes, or ("auto",
        or a `footprint=` without `mem_budget`) a share of what this process may still
        use, read off the event loop."""
        if self.budget is None:
            given = self.policy.mem_budget
            if isinstance(given, int):
                budget = Budget(given, "given")
            else:
                room, source = await anyio.to_thread.run_sync(available_bytes)
                budget = Budget(max(1, int(AUTO_BUDGET_SHARE * room)), source)
            if self.budget is None:  # no other call made it meanwhile
                self.budget = budget
        return self.budget

    def _forget(self, run: _Run) -> None:
        """The job is over: workers that loaded it drop its fn and borrow, and the
        shared memory made for it alone is let go."""
        for w in run.loaded_on:
            w.forget_job(run.key)
        if run.exported is not None:
            run.exported.close()  # tells holders to DROP what this call shared
        for w in run.loaded_on:
            w.flush_control()
        run.loaded_on.clear()

    async def _lease_loop(
        self, run: _Run, tg: anyio.abc.TaskGroup, scope: anyio.CancelScope
    ) -> None:
        """Lease workers while the job has work: as many at a time as it holds (so a
        job on an empty elastic pool doubles its workers as they come, and a small job
        does not ask for workers it will not use)."""
        job = run.job
        with scope:
            async with anyio.create_task_group() as acquiring:
                while not job.over:
                    held = self.workers.leases(job)
                    if (
                        job.has_work()
                        and not run.blocked
                        and self._room_for_another(run)
                        and held + run.acquiring < self.workers.size
                        and run.acquiring < max(1, held)
                    ):
                        run.acquiring += 1
                        acquiring.start_soon(self._lease, run, tg)
                    elif self._may_recall(run, held):
                        with anyio.move_on_after(STALL_SECONDS):
                            await job.wait_change()
                        self._recall_stalled(run)
                    else:
                        await job.wait_change()

    def _may_recall(self, run: _Run, held: int) -> bool:
        """Could a worker of `run` be holding shards another worker would run sooner?
        Only near the end: the job has nothing left to hand out, a worker could take
        more of it, and some worker holds single shards queued behind the one it runs."""
        if run.job.has_work() or held + run.acquiring >= self.workers.size:
            return False
        return any(_recallable(lease) for lease in self._leases.values() if lease.run is run)

    def _recall_stalled(self, run: _Run) -> None:
        """Ask each worker of `run` that has said nothing for `STALL_SECONDS`, with single
        shards queued behind the one it runs, to give those back (RECALL): they are
        queued again, uncharged, for whichever worker is free first. A worker's queue is
        its own, so without this a slow shard would hold the ones behind it while other
        workers stand idle at the end of a call."""
        now = time.monotonic()
        for lease in list(self._leases.values()):
            if lease.run is not run or not _recallable(lease):
                continue
            if now - lease.last_heard < STALL_SECONDS:
                continue
            queued = list(lease.inflight)[1:]
            if lease.worker.channel.post(encode((RECALL, run.key, queued[0].seq))):
                lease.recalled.update(c.seq for c in queued)

    async def _lease(self, run: _Run, tg: anyio.abc.TaskGroup) -> None:
        """One worker for the job, driven in `tg`."""
        job = run.job
        try:
            w = await self.workers.acquire(job)
        except Exception as exc:  # no worker could be had: the job cannot go on
            job.abort(exc)
            return
        finally:
            run.acquiring -= 1
            job.notify()
        await tg.start(self._drive, run, w, tg)

    async def _drive(
        self,
        run: _Run,
        w: WorkerHandle,
        tg: anyio.abc.TaskGroup,
        *,
        task_status: anyio.abc.TaskStatus[None],
    ) -> None:
        lease = _Lease(run, w)
        self._leases[w] = lease
        job = run.job
        job.ran_on(w)
        started = False
        lost: Exception | None = None  # why the worker is lost: it died, hung or misbehaved
        pump = anyio.CancelScope()  # writes the worker's output as it comes, for this job
        pump_at: float | None = time.monotonic() + PUMP_AFTER_SECONDS  # None: it pumps
        try:
            try:
                await self._fill(lease)
                task_status.started()
                started = True
                while True:
                    if pump_at is not None and time.monotonic() >= pump_at:
                        tg.start_soon(pump_output, w, pump)
                        pump_at = None
                    if lease.pending:  # what the last step left: after the loop's turn
                        await w.channel.checkpoint()
                        self._handle(lease, DELIVER_SECONDS)
                    elif lease.inflight and await self._receive(lease, pump_at):
                        self._handle(lease, DELIVER_SECONDS)  # (False: woken for the pump)
                    if not self.workers.should_yield(job):
                        await self._fill(lease)
                    if not lease.inflight:
                        break
            except (ChannelClosed, Hung, ProtocolViolation) as exc:
                lost = exc
        finally:
            self._leases.pop(w, None)
            if not started:
                task_status.started()
            if pump_at is None:
                pump.cancel()
            if run.budget is not None:
                run.budget.put_down(lease)
            with anyio.CancelScope(shield=True):
                if lost is None:
                    await self._settle(lease)
                    w.output.drain(final=True)  # all of the job's lines, before it returns
                else:
                    await self._lose(lease, lost)
            job.notify()  # a worker less: another may hold what this one could run

    async def _fill(self, lease: _Lease) -> None:
        """Top up the lease's window with its job's chunks, in one send."""
        run, w = lease.run, lease.worker
        job = run.job
        msgs = w.take_control()
        was_idle = not lease.inflight
        shut = w.recycle_reason is not None or w.paused
        limit = None if self.policy.max_tasks is None else self.policy.max_tasks - w.tasks
        chunks: list[Chunk] = []
        taken = 0
        # the window as it is after each chunk: a smaller chunk may make it wider
        while (
            not shut
            and len(lease.inflight) + len(chunks) < job.window()
            and (limit is None or limit > 0)
        ):
            chunk = job.take_chunk(next(self._seq), limit)
            if chunk is None:
                break
            if run.budget is not None and not self._admit(lease, chunks, chunk):
                break
            chunks.append(chunk)
            taken += chunk.count
            if limit is not None:
                limit -= chunk.count
        fds: list[int] = []
        if chunks:
            if w.hand(run.key, taken):
                run.loaded_on.add(w)
                fds = _segments_for(run, w, msgs)
                msgs.append((JOB, run.key, run.spec))
            lease.inflight.extend(chunks)
        if not msgs and not chunks:
            return
        if was_idle:
            lease.last_heard = time.monotonic()
        parts, unsendable, sizes = await self._encode(run, msgs, chunks)
        for chunk, size in zip(chunks, sizes, strict=True):
            job.sent(chunk, size)
        for chunk, exc in unsendable:
            lease.inflight.remove(chunk)
            job.unsendable(chunk, exc)
        if parts:
            try:
                await w.channel.send(parts, fds)
            except ChannelClosed:  # the worker ended: these chunks never reached it
                fresh = [c for c in chunks if c in lease.inflight]
                for chunk in fresh:
                    lease.inflight.remove(chunk)
                job.undelivered(fresh)
                raise

    def _admit(self, lease: _Lease, adding: list[Chunk], chunk: Chunk) -> bool:
        """Reserve room in the budget for `chunk` on the lease's worker (which holds its
        in-flight chunks and `adding`); if there is none, the job gets it back, and is
        told when room is made."""
        run = lease.run
        budget, memory = run.budget, run.job.memory
        assert budget is not None
        need = chunk.footprint
        if need is None and run.work.opts.footprint == "learn":
            need = budget.total  # nothing learned yet: it runs alone
        if not budget.fits(lease, need, self.workers.measured_bytes()):
            run.job.put_back(chunk)
            _wait_for_room(run)
            return False
        if need is not None and need > budget.total and chunk.footprint is not None:
            memory.oversized.append((chunk.first, need))
        held = max((c.footprint or 0 for c in (*lease.inflight, *adding)), default=0)
        budget.hold(lease, max(held, need or 0))
        memory.admitted(budget.reserved)
        return True

    def _room_for_another(self, run: _Run) -> bool:
        """Could one more worker get a chunk of this job within the budget, beside those
        being leased for it? (So that a pool held to one starts no worker it could not
        use.) Footprints known only once a chunk is formed (callables) are left to
        admission."""
        budget = run.budget
        if budget is None:
            return True
        given = run.work.opts.footprint
        if isinstance(given, int):
            need = given
        elif given == "learn":
            need = run.job.memory.footprint_per_shard or budget.total
        else:
            return True
        leased = self.workers.leases(run.job)  # some may not have reserved yet
        reserving = leased - sum(1 for key in budget.holders() if getattr(key, "run", None) is run)
        coming = run.acquiring + reserving + 1
        if not budget.reserved and coming == 1:
            return True  # the first runs, whatever it needs
        if budget.reserved + need * coming <= budget.total:
            return True
        _wait_for_room(run)
        return False

    def _rehold(self, lease: _Lease) -> None:
        """The lease's worker finished a chunk: its reservation is what it still holds."""
        budget = lease.run.budget
        if budget is None:
            return
        if lease.inflight:
            budget.hold(lease, max(c.footprint or 0 for c in lease.inflight))
        else:
            budget.put_down(lease)

    async def _encode(
        self, run: _Run, msgs: list[Any], chunks: list[Chunk]
    ) -> tuple[list[Buffer], list[tuple[Chunk, Exception]], list[int]]:
        """The frames of `msgs` and of a RUN per chunk (its items pickled on their own),
        the chunks whose items cannot be pickled, and each chunk's pickled items' size;
        off the event loop once that got slow."""
        wire: list[Any] = [c.items for c in chunks]
        listed = 0
        for i, c in enumerate(chunks):
            items = c.items
            if type(items) is list and items:
                listed += len(items)
                if type(items[0]) is Cut:  # a layout's shards are all long, or none
                    wire[i] = await _in_pieces(items)
                elif len(items) <= FEW_ITEMS and _any_long(items):  # a map of long items
                    joined = await _long_ones_in_pieces(items)
                    wire[i] = [joined.get(id(x), x) for x in items]
        if listed >= APART_FROM:
            await anyio.lowlevel.checkpoint()  # the loop's turn between taking and pickling
        if run.encode_in_thread:
            return await anyio.to_thread.run_sync(_encode_run, run.key, msgs, chunks, wire)
        t0 = time.perf_counter()
        encoded = _encode_run(run.key, msgs, chunks, wire)
        if time.perf_counter() - t0 <= ENCODE_INLINE_SECONDS:
            run.slow_encodes = 0
        else:  # a pickle is slow, or the OS paused this one: slow several times in a row
            run.slow_encodes += 1
            run.encode_in_thread = run.slow_encodes >= SLOW_ENCODES
        return encoded

    async def _receive(self, lease: _Lease, pump_at: float | None = None) -> bool:
        """Add what the lease's worker reports next to its pending reports; False if
        `pump_at` (monotonic: when the pump starts) came first, or if the worker printed
        before then: the drive writes that itself, so that a worker that prints more
        than a pipe holds is not left blocked until the pump runs. No frame here keeps
        the reports (their values): once delivered and handed on, the caller alone
        holds them."""
        w = lease.worker
        timeout = lease.run.work.opts.timeout
        until = None if timeout is None else lease.last_heard + timeout + KILL_GRACE
        output = None if pump_at is None else w.output.fileno()
        if pump_at is not None and (until is None or pump_at < until):
            reports = await receive_until(w, pump_at, wake=output)
        else:
            reports = await receive_until(w, until, wake=output)
            if reports is None:
                raise Hung
        if not reports:
            if reports is not None:  # woken by its output
                w.output.drain()
            return False
        lease.pending.extend(reports)
        return True

    def _handle(self, lease: _Lease, budget: float | None = None) -> None:
        """Deliver the lease's pending reports: for about `budget` seconds at most (the
        rest waits for the next step, cut where the time ran out), or all of them."""
        lease.last_heard = t0 = time.monotonic()
        w, run = lease.worker, lease.run
        job, pending = run.job, lease.pending
        profile = PROFILES[run.work.opts.profile]
        done = timed_out = 0
        heard = bool(pending)
        while pending:
            report, values = pending.popleft()
            t1 = time.monotonic()
            if budget is not None and report.n > 1 and not isinstance(values, Exception):
                cost = run.deliver_cost()
                room = max(1, int((budget - (t1 - t0)) / cost)) if cost else report.n
                if room < report.n:
                    head, tail = split_result(report, room)
                    pending.appendleft((tail, values[room:]))
                    report, values = head, values[:room]
            chunk = lease.inflight[0] if lease.inflight else None
            if chunk is None or chunk.seq != report.seq or chunk.done != report.k0:
                raise ProtocolViolation("a result for work it was not running")
            if report.k0 + report.n > chunk.count or (report.final and not _ends(report, chunk)):
                raise ProtocolViolation("a result that does not fit its chunk")
            if isinstance(values, Exception):
                job.deliver_unreadable(chunk, report, w.pid, values)
            elif chunk.seq in lease.recalled and _never_ran(report):
                job.undelivered([chunk])  # given back unrun: queued again, uncharged
            else:
                job.deliver(chunk, report, values, w.pid)
            if report.final:
                lease.recalled.discard(chunk.seq)
            if report.n:
                done += report.n
                run.delivered(report.n, time.monotonic() - t1)
            if report.errors:
                timed_out += sum(1 for e in report.errors if e[1] == TIMEOUT)
            if report.final:
                lease.inflight.popleft()
                if report.peak:
                    job.memory.learned(report.peak)
                self._rehold(lease)
                left = report.hygiene is not None and report.hygiene[1]
                w.finished_work(report.rss, self.policy, profile, left)
                self.workers.gauged(w)
            if budget is not None and time.monotonic() - t0 >= budget:
                break
        if heard:
            self.workers.heard_back(done, timed_out)

    def _deliver_rest(self, lease: _Lease) -> None:
        """Deliver what was read and not delivered yet; drop it if it breaks the
        protocol (the worker is lost then, or the job already over)."""
        try:
            self._handle(lease)
        except ProtocolViolation:
            lease.pending.clear()

    async def _settle(self, lease: _Lease) -> None:
        """Make the worker clean (nothing in flight) and give it back; kill it if it
        won't be."""
        w, job = lease.worker, lease.run.job
        self._deliver_rest(lease)
        if lease.inflight and not w.channel.broken:
            job.abort()
            try:
                await w.channel.send(encode((CANCEL, lease.run.key)))
                w.interrupt()
                with anyio.move_on_after(CANCEL_GRACE):
                    while lease.inflight:
                        lease.pending.extend(await receive(w))
                        self._handle(lease)
            except (ChannelClosed, ProtocolViolation):
                pass
        if lease.inflight or not w.alive:
            lease.inflight.clear()
            await w.kill()
            self.workers.discard(w, job)
            return
        self.workers.release(w, job)

    async def _lose(self, lease: _Lease, why: Exception) -> None:
        """The worker died, hung or misbehaved: give its chunks back to the job and
        replace it."""
        w, job = lease.worker, lease.run.job
        if not isinstance(why, ProtocolViolation):  # else read with what broke it: untrusted
            self._deliver_rest(lease)  # whole reports it sent before it ended
        lease.pending.clear()
        timed_out = await self._bury(w, why)
        chunks = list(lease.inflight)
        lease.inflight.clear()
        job.worker_lost(chunks, self.workers.loss_of(w), timed_out=timed_out)
        self.workers.discard(w, job)
        await self.workers.replenish()

    async def _bury(self, w: WorkerHandle, why: Exception) -> bool:
        """Make sure a lost worker is dead and count it; True if it hung past a timeout."""
        timed_out = isinstance(why, Hung)
        violation = str(why) if isinstance(why, ProtocolViolation) else None
        await self.workers.bury(w, hung=timed_out, violation=violation)
        return timed_out

    # -- one-shot calls ---------------------------------------------------------------

    @on_one_loop
    async def call(self, call: CallWork) -> Any:
        """Run ``fn(*args, **kwargs)`` on a worker; raise what it raises. A call whose
        worker died or hung runs again, on another worker, up to `max_retries` times."""
        seq = next(self._seq)
        fn, args, kwargs, timeout = call.fn, call.args, call.kwargs, call.timeout
        given, named = args, kwargs
        if _any_long(args) or (kwargs and _any_long(kwargs.values())):
            joined = await _long_ones_in_pieces((*args, *kwargs.values()))
            given = tuple(joined.get(id(a), a) for a in args)
            named = {k: joined.get(id(v), v) for k, v in kwargs.items()}
        try:
            sent = tuple(map(uncopied, given)), {k: uncopied(v) for k, v in named.items()}
            parts = encode((CALL, seq, with_sources(fn), *sent, timeout), by_value=True)
        except Exception:
            _name_unpicklable(fn, args, kwargs)
            raise
        shared = None
        if holds_shared_arrays(parts[2:]):
            shared = await self._share_call(seq, with_sources(fn), sent, timeout)
        message = _Sent(seq, parts) if shared is None else _Sent(seq, shared[1], shared[0].segments)
        try:
            return await self._call_attempts(call, message)
        finally:
            if shared is not None:
                shared[0].close()  # tells the workers that mapped them to DROP its segments

    async def _call_attempts(self, call: CallWork, message: _Sent) -> Any:
        """Run the call until it has an outcome: a worker lost before it started the
        call costs no attempt."""
        attempt, undelivered = 1, 0
        trace, timeout = call.trace, call.timeout
        while True:
            if trace is None:
                outcome = await self._call_once(message, timeout, attempt)
            else:
                outcome = await self._traced_call(trace, message, timeout, attempt)
            if not isinstance(outcome, _Lost):
                return outcome
            if not outcome.delivered and undelivered < MAX_UNDELIVERED:
                undelivered += 1  # it never ran: not an attempt, whatever max_retries says
            elif attempt <= call.max_retries:
                attempt += 1
            else:
                raise outcome.error

    async def _share_call(
        self, seq: int, fn: Any, sent: tuple[Any, ...], timeout: float | None
    ) -> tuple[Exported, list[Buffer]] | None:
        """The CALL of a call whose function or arguments hold large arrays: the three
        pickled together, each array that `export` shares (kept and compared as a
        borrowed one) a segment in its place (`SharedCall`), made in a thread; and what
        it shares, to close once the call is over. None if it shares no array."""
        payload = pickle_payload((fn, *sent), "the call")
        exported = await self._export({}, {}, "deny", payload)
        if exported.fn is payload:
            exported.close()
            return None
        assert exported.fn is not None
        return exported, encode((CALL, seq, SharedCall(exported.fn), (), {}, timeout))

    async def _traced_call(
        self, trace: Any, message: _Sent, timeout: float | None, attempt: int
    ) -> Any:
        """`_call_once`, in an attempt span of the call's trace."""
        key = (message.seq, attempt, object())  # a run never started is tried again as itself
        trace.call_attempt(key, attempt)
        try:
            outcome = await self._call_once(message, timeout, attempt)
        except BaseException as exc:
            cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
            trace.ended(key, None, "cancelled" if cancelled else "error")
            raise
        if isinstance(outcome, _Lost):
            lost = outcome.error
            pid = getattr(lost, "pid", None)
            kind = "timeout" if isinstance(lost, ShardTimeout) else "crash"
            trace.ended(key, pid, kind if outcome.delivered else "cancelled")
        else:
            trace.ended(key, None)
        return outcome

    async def _call_once(self, message: _Sent, timeout: float | None, attempt: int) -> Any:
        """The value of one run of a call, or `_Lost` if its worker died or hung."""
        answer = await self.lanes.call_once(message.seq, message.parts, timeout, message.segments)
        if isinstance(answer, LaneLost):
            hung = isinstance(answer.why, Hung)
            loss = self.workers.loss_of(answer.worker)
            kind, detail = (TIMEOUT, (0.0, loss.stack)) if hung else (CRASHED, loss)
            error = failure(kind, detail, subject="call", shard=None, attempts=attempt,
                            timeout=timeout)  # fmt: skip
            return _Lost(error, delivered=answer.ran)
        report, values = answer
        if isinstance(values, Exception):
            raise unreadable_result("call", None, attempt, values)
        if report.errors and report.errors[0][1] == TIMEOUT:  # stopped in Python: worker fine
            self.workers.heard_back(0, timed_out=1)
            return _Lost(failure(TIMEOUT, report.errors[0][2], subject="call", shard=None,
                                 attempts=attempt, timeout=timeout))  # fmt: skip
        if report.hygiene is not None and report.hygiene[0]:
            warn_hygiene({None: tuple(report.hygiene[0])}, "call")
        return call_outcome(values, report.errors)


def _wait_for_room(run: _Run) -> None:
    """The job's work waits for room in the budget: it takes no worker or chunk until
    some is made (counted as an admission wait until its next chunk is admitted)."""
    budget = run.budget
    assert budget is not None
    run.job.memory.waits()
    if not run.blocked:
        run.blocked = True
        budget.wait_for_room(functools.partial(_unblock, run))
        logger.debug(
            "work waits for room in the memory budget (%d of %d bytes reserved)",
            budget.reserved, budget.total, extra={"reason": "admission"},
        )  # fmt: skip


def _unblock(run: _Run) -> None:
    """Room was made in the budget: the job may take workers and chunks again."""
    run.blocked = False
    run.job.notify()


def _imports_for(values: tuple[object, ...]) -> list[str]:
    """What workers import to take `values` in: numpy for arrays (shared or not), pyarrow
    for tables and table sinks. The types are looked up where the caller already has
    them: nothing is imported here, on the event loop."""
    np, pa = sys.modules.get("numpy"), sys.modules.get("pyarrow")
    shared, tables = sys.modules.get("ashard.shared"), sys.modules.get("ashard.tables")
    arrays: tuple[type, ...] = (np.ndarray,) if np is not None else ()
    tabular: tuple[type, ...] = (pa.Table, pa.RecordBatch) if pa is not None else ()
    if shared is not None:
        arrays = (*arrays, shared.SharedArray, shared.Buffer)
        tabular = (*tabular, shared.SharedTable)
    if tables is not None:
        tabular = (*tabular, tables.TableSink)
    wanted = []
    if any(isinstance(v, arrays) for v in values):
        wanted.append("numpy")
    if any(isinstance(v, tabular) for v in values):
        wanted.append("pyarrow")
    return wanted


def _warn_oversized(run: _Run) -> None:
    """One warning per call for the shards that ran alone, larger than the budget."""
    memory = run.job.memory
    if not memory.oversized or run.budget is None:
        return
    noun = "shard" if run.work.layout is not None else "item"
    shown = ", ".join(f"{noun} {pos} ({nbytes / 2**20:.0f} MiB)" for pos, nbytes in
                      memory.oversized[:10])  # fmt: skip
    more = f" and {len(memory.oversized) - 10} more" if len(memory.oversized) > 10 else ""
    warn_user(
        f"{shown}{more}: footprint larger than the pool's mem_budget "
        f"({run.budget.total / 2**20:.0f} MiB); each ran alone",
        ResourceWarning,
    )


def _segments_for(run: _Run, w: WorkerHandle, msgs: list[Any]) -> list[int]:
    """Queue a SEGMENTS message for the shared memory of `run` that `w` lacks (a new or
    replacement worker); return the fds to send with it."""
    if run.exported is None:
        return []
    new = w.hand_segments(run.exported.segments)
    if not new:
        return []
    msgs.append((SEGMENTS, [seg.id for seg in new]))
    return [seg.fd for seg in new]


def _sent_bytes(payload: Payload) -> int:
    """The size of a payload made here (`pack`: bytes or pickle buffers)."""
    data, buffers = payload
    return sum(memoryview(part).nbytes for part in (data, *buffers))


def _ends(report: Result, chunk: Chunk) -> bool:
    """Does a final report leave its chunk complete (or stopped early, on purpose)?"""
    end = report.k0 + report.n
    interrupted = bool(report.errors) and report.errors[-1][1] == INTERRUPTED
    return end == chunk.count or interrupted


async def _in_pieces(items: Sequence[Any]) -> Any:
    """A chunk's items as they go: each long shard's (a `Cut`) pickled a piece per loop
    step into a `Joined` (`_pieces`); or what a piece raised, if one cannot be pickled.
    The rest are pickled whole with their message."""
    wire: list[Any] = []
    budget = [MAX_BUFFERS // 4]  # the out-of-band buffers the pieces may take, between them
    for item in items:
        if type(item) is not Cut:  # the last shard may be short
            wire.append(item)
            continue
        try:
            pieces = await _pieces(item.piece, len(item), budget)
        except Exception as exc:
            return exc
        if pieces is None:  # thousands of arrays: whole, as `pack` sends them
            return [x.whole() if type(x) is Cut else x for x in items]
        wire.append(Joined(pieces, tuple if type(item.source) is tuple else list))
    return wire


async def _pieces(
    piece: Callable[[int, int], Any], n: int, budget: list[int]
) -> list[Payload] | None:
    """`n` items pickled a piece per loop step (``piece(start, stop)``: those items),
    each piece sized to take about `PIECE_SECONDS`; None once they would take more
    out-of-band buffers than `budget` (which they draw on) has left."""
    pieces: list[Payload] = []
    at, size = 0, FIRST_PIECE
    while at < n:
        t0 = time.perf_counter()
        packed = pack(uncopied_items(piece(at, at + size)))
        pieces.append(packed)
        budget[0] -= 1 + len(packed[1])
        if budget[0] < 0:
            return None
        at += size
        took = time.perf_counter() - t0
        size = max(MIN_PIECE, min(MAX_PIECE, int(size * PIECE_SECONDS / max(took, 1e-6))))
        await anyio.lowlevel.checkpoint()
    return pieces


_LONG_KINDS = (list, tuple, dict)


def _any_long(values: Iterable[Any]) -> bool:
    """Is one of `values` a list, tuple or dict of `CUT_FROM` items or more?"""
    return any(type(v) in _LONG_KINDS and len(v) >= CUT_FROM for v in values)


def _slice_of(items: Sequence[Any], start: int, stop: int) -> Sequence[Any]:
    return items[start:stop]


class _Entries:
    """A dict's entries read in order, a piece at a time (``entries(start, stop)``: the
    next ``stop - start`` of them, as a dict), counted: reading raises if the dict
    changes size meanwhile, a key taken out and another put in shows as one entry too
    many, and one that made Python rebuild the dict as a change of its memory
    (`read_whole`)."""

    def __init__(self, entries: dict[Any, Any]) -> None:
        self._dict = entries
        self._bytes = sys.getsizeof(entries)
        self._items: Iterator[tuple[Any, Any]] = iter(entries.items())
        self._count = 0

    def __call__(self, start: int, stop: int) -> dict[Any, Any]:
        piece = dict(itertools.islice(self._items, stop - start))
        self._count += len(piece)
        return piece

    def read_whole(self, n: int) -> bool:
        """Were exactly the dict's `n` entries read, each once, and nothing more is left?"""
        if sys.getsizeof(self._dict) != self._bytes:  # rebuilt: its iteration may not say
            return False
        try:
            return self._count == n and next(self._items, None) is None
        except RuntimeError:  # it changed after its last piece
            return False


async def _long_ones_in_pieces(values: Iterable[Any]) -> dict[int, Joined]:
    """Each list, tuple or dict of `CUT_FROM` items or more among `values` (a call's
    arguments, a chunk's items, what a call borrows) pickled a piece per loop step into
    a `Joined`, by `id`: one for an object given twice, which the worker then gets as
    one object. One that cannot be pickled so, or changes length meanwhile, is left out:
    it goes as it is (its message names or raises the error)."""
    joined: dict[int, Joined] = {}
    budget = [MAX_BUFFERS // 4]
    for v in values:
        kind = type(v)
        if kind in _LONG_KINDS and len(v) >= CUT_FROM and id(v) not in joined:
            n = len(v)
            entries = _Entries(v) if kind is dict else None
            piece = entries if entries is not None else functools.partial(_slice_of, v)
            try:
                pieces = await _pieces(piece, n, budget)
            except Exception:  # (a dict that changed size: RuntimeError)
                pieces = None
            whole = entries is None or entries.read_whole(n)
            if pieces is not None and len(v) == n and whole:
                joined[id(v)] = Joined(pieces, kind)
    return joined


def _encode_run(
    key: int, msgs: list[Any], chunks: list[Chunk], wire: list[Any]
) -> tuple[list[Buffer], list[tuple[Chunk, Exception]], list[int]]:
    """The frames of `msgs` and of a RUN per chunk, with its items as `wire` has them
    (`_in_pieces`)."""
    parts = encode_many(msgs)
    unsendable: list[tuple[Chunk, Exception]] = []
    sizes: list[int] = []
    for c, given in zip(chunks, wire, strict=True):
        try:
            if isinstance(given, Exception):
                raise given
            items = None if given is None else pack(uncopied_items(given))
        except Exception as exc:
            unsendable.append((c, exc))
            sizes.append(0)
            continue
        sizes.append(0 if items is None else _sent_bytes(items))
        parts += encode((RUN, key, c.seq, c.first, c.count, c.attempts, items, c.trace))
    return parts, unsendable, sizes


def _name_unpicklable(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise a `TypeError` naming the first part of a call that cannot be pickled."""
    dumps_named(fn, "fn", [])
    for i, arg in enumerate(args):
        dumps_named(arg, f"argument {i} of the call", [])
    for name, value in kwargs.items():
        dumps_named(value, f"keyword argument {name!r} of the call", [])


def _recallable(lease: _Lease) -> bool:
    """Does `lease`'s worker hold single shards queued behind the one it runs, none of
    them asked back yet?"""
    inflight = lease.inflight
    if len(inflight) < 2 or lease.recalled:
        return False
    return all(c.count == 1 and not c.done for c in itertools.islice(inflight, 1, None))


def _never_ran(report: Result) -> bool:
    """Is `report` a chunk's answer that it never ran (RECALL, CANCEL)?"""
    return report.final and report.n == 0 and report.errors == [(0, INTERRUPTED, None)]

"""``async def`` shard functions on the worker's own event loop (DESIGN 2.7).

The loop is asyncio by default, made once and kept for the worker's life (so objects
bound to it, a client session cached in a module, work across chunks); uvloop the same;
trio runs each batch of chunks in `trio.run` (it has no loop to keep). A chunk's shards
run as tasks, at most `shard_concurrency` at once, and are reported in order as their
prefix completes, as plain shards are. Once all of a chunk's shards have started, the
job's next chunk joins them when a place is free (`_Batch`, `Joiner`): the worker keeps
`shard_concurrency` shards in flight across chunk ends, and each chunk still answers in
the order the parent sent it. With several at once, each shard writes its outputs
through a writer of its own and sees borrowed arrays under ``cow="audit"`` through a
mapping of its own.

* **Timeouts** cancel the shard's coroutine (its ``finally`` runs); its stack where the
  cancellation reached it is its `ShardTimeout.stack`. A coroutine that blocks the loop
  past its deadline (``time.sleep`` in async code) is stopped by the worker's timer as a
  plain shard is: the timer is armed for each step of user code (`_Traced`), so the
  interrupt lands in that shard's frame and names it.
* **Interruption** (the caller cancelled): the signal handler sets a flag that a watcher
  task turns into cancelling every shard; a shard blocking the loop is interrupted in
  its frame. What finished before the first unfinished shard is reported; the rest goes
  back to the caller's queue.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

from ashard._protocol import INTERRUPTED, RAISED, SHARDS, TIMEOUT, CallFn, RunChunk
from ashard._serialize import encode_exception, settled
from ashard._worker.running import (
    _ERR,
    FLUSH_INTERVAL,
    Interrupted,
    _settle_outputs,
    _state,
    args_of,
)
from ashard._worker.running import _OK as SYNC_OK

if TYPE_CHECKING:
    from ashard._worker.jobs import JobContext
    from ashard._worker.reports import Reporter

__all__ = ["Joiner", "configure", "pending_tasks", "run_call", "run_chunk"]

WATCH_SECONDS = 0.005
"""How often a running chunk looks for the caller's interrupt."""
BLOCKED_SECONDS = 1.0
"""A loop held this long by a shard's code is named in the call's `Diagnostics.notes`."""
FINALLY_GRACE = 1.0
"""Seconds a cancelled coroutine's cleanup may hold the loop before it is interrupted."""

_kind = "asyncio"
_loop: Any = None


def configure(kind: str) -> None:
    """The worker's loop: "asyncio", "uvloop" or "trio" (`Pool(worker_loop=...)`)."""
    global _kind
    _kind = kind


def prepare() -> None:
    """Make the worker's loop, and load what runs on it, if that is not done yet: before
    a task starts, so that hygiene counts the loop's descriptors as the worker's own."""
    global _loop
    if _loop is not None:
        return
    import anyio  # noqa: F401 (the supervisor's library runs the shards)

    if _kind == "trio":
        import trio  # a loop per chunk: `trio.run`

        trio.run(trio.sleep, 0)  # what its first run opens and keeps is open from now
        _loop = False
        return
    import asyncio

    if _kind == "uvloop":
        import uvloop

        _loop = uvloop.new_event_loop()
    else:
        _loop = asyncio.new_event_loop()
    _loop.set_default_executor(_executor)
    asyncio.set_event_loop(_loop)
    _loop.run_until_complete(asyncio.sleep(0))  # a first turn opens what the loop keeps


def pending_tasks() -> list[Any]:
    """The tasks pending on the worker's asyncio loop. Asked between runs, when
    ashard's own have all ended: what a shard started and never awaited, which runs on
    during the next run (hygiene names them). Trio's runs end with their tasks."""
    if not _loop:
        return []
    import asyncio

    return list(asyncio.all_tasks(_loop))


def idle_threads() -> set[threading.Thread]:
    """The threads of the worker loop's default executor, when none of them runs work
    (`asyncio.to_thread`): a stopped shard's report need not wait for them."""
    return _executor.idle()


class _Executor(ThreadPoolExecutor):
    """The worker loop's default executor (`asyncio.to_thread`, `run_in_executor(None,
    ...)`), which can tell that its threads are idle: a pool keeps its threads, and a
    thread cannot be told idle from outside (`reports`: a stopped shard's report waits
    for threads that may still run its work)."""

    def __init__(self) -> None:
        super().__init__(thread_name_prefix="asyncio")  # as asyncio's own
        self._lock = threading.Lock()
        self._busy = 0  # work items submitted and neither finished nor cancelled
        self._threads: set[threading.Thread] = set()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        def run() -> Any:
            with self._lock:
                self._threads.add(threading.current_thread())
            try:
                return fn(*args, **kwargs)
            finally:
                self._done()

        with self._lock:
            self._busy += 1
        try:
            future = super().submit(run)
        except BaseException:
            self._done()
            raise
        future.add_done_callback(self._dropped)
        return future

    def _dropped(self, future: Any) -> None:
        if future.cancelled():  # it never ran
            self._done()

    def _done(self) -> None:
        with self._lock:
            self._busy -= 1

    def idle(self) -> set[threading.Thread]:
        with self._lock:
            return set(self._threads) if self._busy == 0 else set()


_executor = _Executor()


def _run(main: Callable[[], Awaitable[None]]) -> None:
    """Run `main` on the worker's loop, to its end: a shard that stopped the loop
    (``loop.stop()``) only made `run_until_complete` return early."""
    prepare()
    if _kind == "trio":
        import trio

        trio.run(main)
        return
    task = _loop.create_task(main())
    while True:
        try:
            _loop.run_until_complete(task)
            return
        except RuntimeError:
            if task.done():
                raise


def _cancel_asked(stopped: bool) -> bool:
    """Was the running task asked to stop (`stopped`: by the caller; else by a cancel
    scope, a timeout's), rather than `fn` raising a cancellation of its own (asyncio's
    `CancelledError` is an exception like any other to create and raise)?"""
    if stopped or _kind == "trio":  # trio's Cancelled cannot be made by user code
        return True
    import asyncio

    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _is_cancel(exc: BaseException) -> bool:
    return type(exc).__name__ in ("CancelledError", "Cancelled")


def _coro_stack(coro: Any) -> str | None:
    """Where a suspended coroutine waits: its frames, outermost first."""
    frames = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        frames.append((frame, frame.f_lineno))
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    if not frames:
        return None
    return "".join(traceback.StackSummary.extract(frames).format())


class _Traced:
    """Awaits a user coroutine step by step: while one of its steps runs, the worker's
    timer is armed for the shard's deadline (a step that holds the loop past it is
    interrupted in its own frame), and where it was when cancelled is kept."""

    __slots__ = ("coro", "deadline", "stack")

    def __init__(self, coro: Any, deadline: float | None) -> None:
        self.coro = coro
        self.deadline = deadline
        self.stack: str | None = None

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self.coro
        value: Any = None
        exc: BaseException | None = None
        while True:
            if self.deadline is not None:
                left = self.deadline - time.monotonic()
                if exc is not None and _is_cancel(exc):  # its finally gets time to run
                    left = FINALLY_GRACE
                signal.setitimer(signal.ITIMER_REAL, max(left, 0.001))
            _state.running = True
            try:
                if exc is None:
                    yielded = coro.send(value)
                else:
                    if self.stack is None and _is_cancel(exc):
                        self.stack = _coro_stack(coro)
                    yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            finally:
                _state.running = False
                if self.deadline is not None:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            value, exc = None, None
            try:
                value = yield yielded
            except BaseException as raised:  # thrown in by the loop: a cancellation
                exc = raised


class _Batch:
    """The chunks running together on the worker's loop: the one it was given, and the
    ones of the same job that joined it as its shards were all started (`Joiner`), so
    that the worker keeps `shard_concurrency` shards in flight across chunk ends. The
    parent hears of them in the order it sent them: a chunk reports only once every
    chunk before it has made its final report."""

    def __init__(self, report: Reporter, noun: str) -> None:
        self.report = report
        self.noun = noun
        self.chunks: deque[_Chunk] = deque()  # not yet finally reported, in order
        self.running: set[int] = set()  # positions whose coroutines are under way
        self.stopped = False
        self.tick = time.perf_counter()  # when the watcher last woke (the loop turned)
        self.scope: Any = None  # the shards' task group's
        self.idle: Any = None  # the joiner's wait for a chunk: ends when no shard runs

    def add(self, chunk: RunChunk, flush_each: bool) -> _Chunk:
        state = _Chunk(self, chunk.seq, chunk.n, flush_each)
        self.chunks.append(state)
        self.flush()  # the chunk before it may have been complete, waiting to be the last
        return state

    def flush(self) -> None:
        """Report what the first chunks finished. The last chunk's final report waits for
        the loop to be left (`finish`): the worker's hygiene check goes with it."""
        chunks = self.chunks
        while chunks:
            head = chunks[0]
            if head.complete == head.count:
                if len(chunks) == 1:
                    return
                head.send(head.count, final=True)
                chunks.popleft()
                continue
            now = time.perf_counter()
            if head.complete > head.reported and (
                head.flush_each or now - head.last_flush >= FLUSH_INTERVAL
            ):
                head.send(head.complete, final=False)
                head.last_flush = now
            return

    def started(self, pos: int) -> None:
        self.running.add(pos)

    def left(self, pos: int) -> None:
        self.running.discard(pos)
        if not self.running and self.idle is not None:
            self.idle.cancel()

    def held(self, positions: Sequence[int], seconds: float) -> None:
        """The loop was held `seconds` while `positions` ran: say so."""
        ids = ", ".join(str(p) for p in sorted(positions)[:5])
        more = " ..." if len(positions) > 5 else ""
        self.report.notes.append(
            f"the event loop of worker {os.getpid()} was blocked for {seconds:.1f} s while "
            f"{self.noun}s {ids}{more} ran: blocking code in async def (time.sleep, a "
            "blocking call) holds every shard of the worker; await it, or use a thread"
        )
        self.tick = time.perf_counter()  # said once

    def stop(self) -> None:
        """The caller interrupted it: cancel every shard."""
        self.stopped = True
        if self.scope is not None:
            self.scope.cancel()

    def finish(self) -> None:
        """After the loop: the rest of each chunk's report, in order."""
        if self.stopped:
            self.report.hold()
        while self.chunks:
            self.chunks.popleft().finish()


class _Chunk:
    """One chunk's shards as they end, reported in order as their prefix completes."""

    def __init__(self, batch: _Batch, seq: int, count: int, flush_each: bool) -> None:
        self.batch = batch
        self.seq = seq
        self.count = count
        self.flush_each = flush_each  # a timeout: the parent hears of each shard at once
        self.outcomes: list[tuple[int, Any, float] | None] = [None] * count
        self.reported = 0  # positions reported
        self.complete = 0  # positions before the first unfinished one
        self.last_flush = time.perf_counter()
        self.commits: dict[int, list[Any]] = {}  # position -> the files it committed
        self.writes: dict[int, list[str]] = {}  # position -> borrowed arrays it wrote (audit)

    def ended(self, k: int, status: int, detail: Any, took: float) -> None:
        self.outcomes[k] = (status, detail, took)
        done = self.complete
        while done < self.count and self.outcomes[done] is not None:
            done += 1
        self.complete = done
        if self.batch.chunks[0] is self:
            self.batch.flush()

    def send(self, upto: int, final: bool, interrupted: bool = False) -> None:
        k0 = self.reported
        values: list[Any] = []
        errors: list[Any] = []
        elapsed: list[float] = []
        commits: list[Any] = []
        writes: list[tuple[int, str]] = []
        if self.commits or self.writes:  # outputs or cow="audit": entries name their shard
            for k in range(k0, upto):
                commits.extend((k - k0, *entry[1:]) for entry in self.commits.pop(k, ()))
                writes.extend((k - k0, name) for name in self.writes.pop(k, ()))
        for k in range(k0, upto):
            outcome = self.outcomes[k]
            assert outcome is not None
            status, detail, took = outcome
            elapsed.append(took)
            if status == _OK:
                values.append(detail)
                continue
            values.append(None)
            errors.append((k - k0, status, detail))
        if interrupted:
            errors.append((upto - k0, INTERRUPTED, None))
        self.reported = upto
        self.batch.report.result(
            self.seq, k0, values, errors, elapsed, final, writes or None, commits or None
        )

    def finish(self) -> None:
        """After the last task: the rest of the report (what did not finish goes back)."""
        if self.reported == self.count:
            return
        done = self.complete
        while done < self.count and self.outcomes[done] is not None:
            done += 1
        self.send(done, final=True, interrupted=done < self.count)


_OK = -100  # a shard that returned (statuses otherwise are the protocol's error kinds)


class Joiner(Protocol):
    """The worker's queue, asked for the next chunk of a job while chunks of it run."""

    sock: socket.socket  # readable when something may have come

    def __call__(self, key: int) -> tuple[RunChunk, Sequence[Any] | None] | bool:
        """That chunk and its items if it is next; True if nothing came yet; False if
        something else is next (or the channel ended): no chunk joins any more."""
        ...


def run_chunk(
    ctx: JobContext,
    chunk: RunChunk,
    items: Sequence[Any] | None,
    report: Reporter,
    joiner: Joiner | None = None,
) -> None:
    """Run the positions of `chunk` (`items`: its items) on the worker's loop, and those
    of the chunks of its job that `joiner` hands over meanwhile."""
    batch = _Batch(report, "shard" if ctx.kind == SHARDS else "item")
    state = batch.add(chunk, ctx.timeout is not None)
    _state.stop_async = False
    _state.async_running = True
    try:
        _run(lambda: _chunks(ctx, chunk, items, state, joiner))
    finally:
        _state.async_running = False
    batch.finish()


async def _chunks(
    ctx: JobContext,
    chunk: RunChunk,
    items: Sequence[Any] | None,
    state: _Chunk,
    joiner: Joiner | None,
) -> None:
    import anyio  # the supervisor's library: loaded when a worker first runs async code

    batch = state.batch
    async with anyio.create_task_group() as outer:
        outer.start_soon(_watch, batch)
        async with anyio.create_task_group() as shards:
            batch.scope = shards.cancel_scope
            if ctx.concurrency <= 1:  # one at a time: no task per shard
                for k in range(chunk.n):
                    if batch.stopped:
                        break
                    await _one(ctx, chunk, items, k, None, state)
            else:
                limiter = anyio.Semaphore(ctx.concurrency)
                got: tuple[RunChunk, Sequence[Any] | None] | None = (chunk, items)
                while got is not None:
                    chunk, items = got
                    for k in range(chunk.n):
                        await limiter.acquire()
                        if batch.stopped:
                            limiter.release()
                            break
                        shards.start_soon(_one, ctx, chunk, items, k, limiter, state)
                    got = None if joiner is None else await _join(chunk.key, batch, limiter, joiner)
                    if got is not None:
                        state = batch.add(got[0], ctx.timeout is not None)
        outer.cancel_scope.cancel()


async def _join(
    key: int, batch: _Batch, limiter: Any, joiner: Joiner
) -> tuple[RunChunk, Sequence[Any] | None] | None:
    """Once a shard's place is free, the job's next chunk, if it comes before the
    shards under way have all ended (and nothing else comes first)."""
    import anyio

    await limiter.acquire()  # a place for its first shard
    limiter.release()
    while not batch.stopped:
        got = joiner(key)
        if got is False:
            return None
        if got is not True:
            return got
        if not batch.running:
            return None  # nothing under way: the worker's own loop takes what comes
        with anyio.CancelScope() as batch.idle:
            await anyio.wait_readable(joiner.sock)
        batch.idle = None
    return None


async def _watch(batch: _Batch) -> None:
    """Stop the shards when the caller interrupts them, and name those under way when
    the loop was held for `BLOCKED_SECONDS` (this task woke that much late)."""
    import anyio

    while True:
        batch.tick = time.perf_counter()
        await anyio.sleep(WATCH_SECONDS)
        held = time.perf_counter() - batch.tick - WATCH_SECONDS
        if held >= BLOCKED_SECONDS and batch.running:  # not named by a shard that ended
            batch.held(list(batch.running), held)
        if _state.stop_async:
            batch.stop()
            return


async def _one(
    ctx: JobContext,
    chunk: RunChunk,
    items: Sequence[Any] | None,
    k: int,
    limiter: Any,
    state: _Chunk,
) -> None:
    """Shard `k` of the chunk: its outcome, told to `state`."""
    import anyio

    pos = chunk.first + k
    batch = state.batch
    attempt = chunk.attempts[k] if chunk.attempts else 1
    item = items[k] if items is not None else None
    args = args_of(ctx, pos, item, attempt)  # seeded globals: shared in flight (DESIGN 2.7)
    timeout = ctx.timeout
    kwargs, outputs, audit = ctx.kwargs, ctx.outputs, ctx.audit
    if ctx.concurrency > 1 and (outputs or audit):  # shards at once: each its own
        outputs, audit = [o.fork() for o in outputs], [a.fork() for a in audit]
        kwargs = {**kwargs, **{o.name: o for o in outputs if o.name}}
        kwargs.update((a.name, a.array) for a in audit)
    for output in outputs:
        output.begin(pos, attempt)
    t0 = time.perf_counter()
    deadline = None if timeout is None else time.monotonic() + timeout
    batch.started(pos)
    status: int = _OK
    detail: Any = None
    try:
        try:
            coro = ctx.fn(*args, **kwargs)
        except BaseException as exc:  # user code: the call itself raised
            status, detail = RAISED, encode_exception(exc)
        else:
            if timeout is None:  # nothing to stop it for: awaited as it is
                detail = await coro
            else:
                traced = _Traced(coro, deadline)
                with anyio.CancelScope(deadline=anyio.current_time() + timeout) as scope:
                    detail = await traced
                if scope.cancel_called and not batch.stopped:
                    status, detail = TIMEOUT, (time.perf_counter() - t0, traced.stack)
    except Interrupted as exc:  # the timer or the caller stopped a step holding the loop
        if exc.timeout:
            status, detail = TIMEOUT, (time.perf_counter() - t0, exc.stack)
        else:
            batch.stop()
            return
    except anyio.get_cancelled_exc_class() as exc:
        if _cancel_asked(batch.stopped):
            raise  # the caller interrupted the chunk: this shard goes back unreported
        status, detail = RAISED, encode_exception(exc)  # fn raised it: its outcome
    except BaseException as exc:  # user code: SystemExit and KeyboardInterrupt are outcomes too
        status, detail = RAISED, encode_exception(exc)
    finally:
        batch.left(pos)
        if limiter is not None:
            limiter.release()
    if outputs:
        status, detail = _settle(ctx, status, detail, k, state, outputs)
    for audited in audit:
        if audited.written():
            if audited.reports:
                state.writes.setdefault(k, []).append(audited.name)
            if audit is ctx.audit:  # the job's own mapping: the next shard's is fresh
                ctx.kwargs[audited.name] = audited.refresh()
    stalled = time.perf_counter() - batch.tick
    if stalled >= BLOCKED_SECONDS + WATCH_SECONDS:  # it ended the step that held the loop
        batch.held([pos], stalled)
    if status == _OK and not state.flush_each:  # sent with others, later: safe from them
        detail = settled(detail)
    state.ended(k, status, detail, time.perf_counter() - t0)


def _settle(
    ctx: JobContext, status: int, detail: Any, k: int, state: _Chunk, outputs: Sequence[Any]
) -> tuple[int, Any]:
    """After shard `k`: its files (in `outputs`) committed if it succeeded
    (`running._settle_outputs`), else discarded; a write that fails fails the shard."""
    mine: list[Any] = []
    settled, out = _settle_outputs(
        ctx, SYNC_OK if status == _OK else _ERR, detail, 0, mine, outputs
    )
    if status != _OK:
        return status, detail
    if settled == _ERR:
        return RAISED, encode_exception(out)
    state.commits[k] = mine
    return _OK, out


def run_call(call: CallFn, report: Reporter) -> None:
    """One `call` of an ``async def`` function, on the worker's loop."""
    box: list[tuple[int, Any, float]] = []
    _state.call_seq, _state.stop_call, _state.alarm_due = call.seq, False, False
    _state.stop_async = False
    _state.async_running = True
    try:
        _run(lambda: _call(call, box))
    finally:
        _state.async_running = False
        _state.call_seq = None
    if not box:
        report.result(call.seq, 0, [], [(0, INTERRUPTED, None)], [], True)
        return
    status, detail, took = box[0]
    if status == _OK:
        report.result(call.seq, 0, [detail], [], [took], True)
    else:
        report.result(call.seq, 0, [None], [(0, status, detail)], [took], True)


async def _call(call: CallFn, box: list[tuple[int, Any, float]]) -> None:
    import anyio

    timeout = call.timeout
    t0 = time.perf_counter()
    deadline = None if timeout is None else time.monotonic() + timeout
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while not (_state.stop_async or _state.stop_call):  # noqa: ASYNC110 (a signal sets it)
                await anyio.sleep(WATCH_SECONDS)
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            traced = _Traced(call.fn(*call.args, **call.kwargs), deadline)
            with anyio.CancelScope(deadline=math.inf if timeout is None else
                                   anyio.current_time() + timeout) as scope:  # fmt: skip
                value = await traced
            if scope.cancel_called:
                box.append((TIMEOUT, (time.perf_counter() - t0, traced.stack), 0.0))
            else:
                box.append((_OK, value, time.perf_counter() - t0))
        except Interrupted as exc:
            if exc.timeout:
                box.append((TIMEOUT, (time.perf_counter() - t0, exc.stack), 0.0))
        except anyio.get_cancelled_exc_class() as exc:
            if _cancel_asked(_state.stop_async or _state.stop_call):
                raise
            box.append((RAISED, encode_exception(exc), time.perf_counter() - t0))
        except BaseException as exc:  # user code: SystemExit and KeyboardInterrupt too
            box.append((RAISED, encode_exception(exc), time.perf_counter() - t0))
        tg.cancel_scope.cancel()

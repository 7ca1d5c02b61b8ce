"""What runs inside a Dask worker: the plugin, the node's ashard supervisor, and the
task functions the caller sends.

`AshardPlugin` is registered by the caller on every Dask worker of the cluster; its
`setup` checks the ashard version and starts a `NodeHost`: an ashard `Scheduler` — the
local backend: processes, timeouts, crashes, memory caps — on an event loop thread of
its own. The caller's tasks (`run_chunk`, `run_call`) wait in a Dask worker thread for
what the host makes of them; `end_job` and `cancel_call` are run on every node when a
call is over or its caller left.

A `_Relay` stands for the caller's job in front of the node's scheduler: it hands out
the chunks that tasks bring, one per worker process, and records each report of the
scheduler as a typed report (`ashard._dask.wire`) for the task that brought the chunk.
A node keeps one relay per call, so the borrow is shared into the node's shared memory
once (`ashard._dask.landing`) and each worker process loads the function once; the
relay ends when the caller says the call is over (or cancelled: running shards are
interrupted, as on one machine).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import pickle
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import cloudpickle
from distributed import get_worker, secede
from distributed.diagnostics.plugin import WorkerPlugin

from ashard._backend import CallWork, Changes, Chunk, JobWork
from ashard._budget import MemoryLog
from ashard._dask.landing import landed
from ashard._dask.wire import (
    Aborted,
    Delivered,
    Lost,
    Outcome,
    Printed,
    Raised,
    Report,
    Returned,
    Unreadable,
    Unsendable,
    WorkerSeen,
    check_version,
)
from ashard._loopthread import LoopThread
from ashard._output import redirect
from ashard._sizing import joining_window
from ashard.errors import RemoteTraceback

NO_VALUES: Payload = (b"", [])
"""A forwarded report's pickled values: left out (it goes with them unpickled)."""

if TYPE_CHECKING:
    from ashard._handle import WorkerConfig
    from ashard._health import HealthPolicy
    from ashard._outcomes import Loss
    from ashard._protocol import Payload, Result
    from ashard._scheduler import Scheduler

__all__ = ["AshardPlugin", "NodeHost", "cancel_call", "end_job", "run_call", "run_chunk"]

ENDED_KEPT = 10_000
"""Calls a node remembers as over, so that a late task of one does not revive it."""

ChunkWork = tuple[int, int, list[int] | None, list[Any] | None, str | None]
"""A chunk as its task carries it: first position, count, attempts, items, traceparent."""


# -- the task functions Dask runs on a node ----------------------------------------------


def _node_host(name: str, together: int = 1) -> NodeHost:
    """This node's host of pool `name`, for a task that will wait on it. Where the
    node has more ashard workers than Dask threads, or a worker runs several chunks at
    once (`together`: async shards in flight on one), the task leaves Dask's thread
    pool (`secede`, which costs the scheduler a message), so that how many chunks the
    node runs at once is what its ashard workers take."""
    plugin: Any = get_worker().plugins.get(name)
    if plugin is None or plugin.host is None:
        raise RuntimeError(f"this Dask worker has no ashard plugin {name!r} (the pool closed?)")
    host: NodeHost = plugin.host
    if host.secede or together > 1:
        secede()
    return host


def run_chunk(
    name: str, key: str, spec: bytes, borrow: Any, work: ChunkWork, together: int = 1
) -> list[Report]:
    """A Dask task: run one chunk of call `key` on this node's ashard workers; what
    happened to it, as reports for the caller's job (`together`: the call's
    `shard_concurrency`)."""
    return _node_host(name, together).run_chunk(key, spec, borrow, work)


def run_call(name: str, call: CallWork) -> Outcome:
    """A Dask task: one `call` on this node's ashard workers."""
    return _node_host(name).run_call(call)


async def end_job(name: str, key: str, cancelled: bool, dask_worker: Any = None) -> None:
    """Run by the caller on every Dask worker: call `key` is over (or cancelled)."""
    plugin = dask_worker.plugins.get(name) if dask_worker is not None else None
    if plugin is not None and plugin.host is not None:
        plugin.host.end_job(key, cancelled)


async def node_stacks(
    name: str, dask_worker: Any = None
) -> dict[int, tuple[int | None, str | None]]:
    """Run by the caller on every Dask worker: the stacks of this node's busy workers."""
    plugin = dask_worker.plugins.get(name) if dask_worker is not None else None
    host = getattr(plugin, "host", None)
    if not isinstance(host, NodeHost):
        return {}
    return await host.stacks()


async def cancel_call(key: str, dask_worker: Any = None) -> None:
    """Run by the caller on every Dask worker: interrupt the task `key` if it runs here."""
    for plugin in list(getattr(dask_worker, "plugins", {}).values()):
        host = getattr(plugin, "host", None)
        if isinstance(host, NodeHost):
            host.cancel_call(key)


class AshardPlugin(WorkerPlugin):
    """The Dask worker plugin that hosts a pool's ashard workers on each node."""

    idempotent = False

    def __init__(
        self,
        name: str,
        version: str,
        per_node: int | None,
        config: WorkerConfig,
        policy: HealthPolicy,
    ) -> None:
        self.name = name
        self.version = version
        self.per_node = per_node
        self.config = config
        self.policy = policy
        self.host: NodeHost | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "host": None}

    def setup(self, worker: Any) -> None:
        check_version(self.version, worker.address)
        state = getattr(worker, "state", worker)
        threads = int(getattr(state, "nthreads", 1) or 1)
        size = self.per_node or threads
        self.host = NodeHost(size, self.config, self.policy, worker.address, threads)

    async def teardown(self, worker: Any) -> None:
        host, self.host = self.host, None
        if host is not None:
            await asyncio.wrap_future(host.close())


# -- the node's host -------------------------------------------------------------------


@dataclass(eq=False)
class _Work:
    """A chunk a task brought, and what happened to it."""

    first: int
    count: int
    attempts: list[int] | None
    items: Sequence[Any] | None
    trace: str | None  # the caller's attempt span, W3C
    done: concurrent.futures.Future[list[Report]]
    reports: list[Report] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)


class NodeHost:
    """A node's ashard workers: a local `Scheduler` on an event loop thread of its own,
    and a relay per call that runs on them."""

    def __init__(
        self, size: int, config: WorkerConfig, policy: HealthPolicy, where: str, threads: int
    ) -> None:
        # Here, not at the top: the caller imports this module for the plugin class and
        # the task functions, and must not load the local backend through it.
        from ashard._scheduler import Scheduler

        self.where = where
        self.secede = size > threads  # tasks must leave Dask's threads to fill the workers
        self.scheduler: Scheduler = Scheduler(size, config, policy)
        self._thread = LoopThread("ashard-node")
        self._relays: dict[str, _Relay] = {}
        self._ended: dict[str, None] = {}  # calls over, newest last
        self._calls: dict[str, asyncio.Task[Any]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._soon(self._warm)  # the workers start now, not with the first chunk

    def _warm(self) -> None:
        task = asyncio.ensure_future(self._start())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self) -> None:
        with contextlib.suppress(Exception):  # a failing `init` is the first chunk's error
            await self.scheduler.start()

    def _soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self._thread.loop().call_soon_threadsafe(fn, *args)

    def run_chunk(self, key: str, spec: bytes, borrow: Any, work: ChunkWork) -> list[Report]:
        """Blocking, in a Dask worker thread: queue the chunk and wait for its end."""
        first, count, attempts, items, trace = work
        done: concurrent.futures.Future[list[Report]] = concurrent.futures.Future()
        work_ = _Work(first, count, attempts, items, trace, done)
        self._soon(self._enqueue, key, spec, borrow, work_)
        return done.result()

    def _enqueue(self, key: str, spec_bytes: bytes, borrow: Any, work: _Work) -> None:
        if key in self._ended:  # a task that Dask started after the call was over
            work.done.set_result([Aborted(RuntimeError("the call is over on this node"))])
            return
        relay = self._relays.get(key)
        if relay is None:
            spec: JobWork = pickle.loads(spec_bytes)  # once per call on this node
            borrowed = {name: landed(value) for name, value in (borrow or {}).items()}
            relay = self._relays[key] = _Relay(spec, borrowed)
            unseen = _unseen_places(spec, self.where)
            if unseen is not None:
                relay.abort(unseen)
            task = asyncio.ensure_future(self._serve(key, relay))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        relay.push(work)

    async def _serve(self, key: str, relay: _Relay) -> None:
        redirect(relay.output)  # worker lines go back to the caller with the chunks
        try:
            await self.scheduler.run(relay)
        except BaseException as exc:
            relay.abort(exc if isinstance(exc, Exception) else None)
        finally:
            relay.close(cancelled=True)
            if self._relays.get(key) is relay:
                del self._relays[key]

    def end_job(self, key: str, cancelled: bool) -> None:
        self._soon(self._end_job, key, cancelled)

    def _end_job(self, key: str, cancelled: bool) -> None:
        self._ended[key] = None
        while len(self._ended) > ENDED_KEPT:
            del self._ended[next(iter(self._ended))]
        relay = self._relays.get(key)
        if relay is not None:
            relay.close(cancelled)

    def run_call(self, call: CallWork) -> Outcome:
        """Blocking, in a Dask worker thread: one call on a worker of this node."""
        key = str(get_worker().get_current_task())
        loop = self._thread.loop()
        result: concurrent.futures.Future[Outcome] = concurrent.futures.Future()

        def begin() -> None:
            task = asyncio.ensure_future(self._call(call))
            self._calls[key] = task

            def settle(t: asyncio.Task[Outcome]) -> None:
                self._calls.pop(key, None)
                if t.cancelled():
                    result.set_result(Raised(_cancelled(), None, []))
                elif (exc := t.exception()) is not None:
                    result.set_exception(exc)
                else:
                    result.set_result(t.result())

            task.add_done_callback(settle)

        loop.call_soon_threadsafe(begin)
        return result.result()

    async def _call(self, call: CallWork) -> Outcome:
        lines: list[tuple[str, str]] = []
        redirect(lambda name, text: lines.append((name, text)))
        try:
            value = await self.scheduler.call(call)
        except Exception as exc:
            cause = exc.__cause__
            text = cause.text if isinstance(cause, RemoteTraceback) else None
            exc.__cause__ = None
            return Raised(_portable(exc), text, lines)
        return Returned(value, lines)

    async def stacks(self) -> dict[int, tuple[int | None, str | None]]:
        """The node's busy workers' stacks (`Scheduler.stacks`, on the node's loop)."""
        asked = asyncio.run_coroutine_threadsafe(self.scheduler.stacks(), self._thread.loop())
        return await asyncio.wrap_future(asked)

    def cancel_call(self, key: str) -> None:
        self._soon(self._cancel_call, key)

    def _cancel_call(self, key: str) -> None:
        task = self._calls.get(key)
        if task is not None:
            task.cancel()

    def close(self) -> concurrent.futures.Future[None]:
        """Stop every worker process of this node (the pool closed)."""
        return asyncio.run_coroutine_threadsafe(self._close(), self._thread.loop())

    async def _close(self) -> None:
        for relay in list(self._relays.values()):
            relay.close(cancelled=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.scheduler.aclose()


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a RuntimeError that names it."""
    try:
        pickle.loads(cloudpickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _cancelled() -> BaseException:
    return RuntimeError("the call was cancelled")


def _unseen_places(spec: JobWork, where: str) -> ValueError | None:
    """Why this node cannot write where the call's outputs go (a local directory it
    does not see), or None."""
    named = [(f"out[{name!r}]", ref) for name, ref in spec.out.items()]
    if spec.results is not None:
        named.append(("results_path", spec.results))
    for what, ref in named:
        place = ref.place
        if place.local and not os.path.isdir(place.root):
            return ValueError(
                f"{what}: the directory {place.root} is not visible on the Dask worker "
                f"{where}; with cluster=, table sinks and results_path need a location every "
                "node sees (a shared directory or an object-store URI)"
            )
    return None


# -- the caller's job, as the node's scheduler sees it -----------------------------------


class _Relay(Changes):
    """The caller's job as a node's local scheduler sees it (`ashard._backend`'s side
    of a job): chunks come from tasks, one per worker process at a time (or enough to
    keep `shard_concurrency` async shards in flight), and each
    report of the scheduler is recorded for the task that brought the chunk."""

    def __init__(self, spec: JobWork, borrow: dict[str, Any]) -> None:
        self._work = replace(spec, borrow=borrow)
        self._queue: deque[_Work] = deque()
        self._of: dict[Chunk, _Work] = {}
        self._workers: dict[int, Any] = {}
        self._memory = MemoryLog()
        self._closed = self._cancelled = False
        self._error: BaseException | None = None  # what ended it early, for late chunks
        self._lines: list[Printed] = []  # printed while no chunk ran
        self._current: _Work | None = None  # whose lines are being read
        self._last_count = 1  # positions in the chunk that came last

    def output(self, name: str, text: str) -> None:
        """Lines a worker of this call printed: they go back with a chunk of the call
        that is running (or the next one to end)."""
        work = self._current or next(iter(self._of.values()), None)
        if work is not None:
            work.reports.append(Printed(name, text))
        else:
            self._lines.append(Printed(name, text))

    def push(self, work: _Work) -> None:
        if self._closed:
            error = self._error or RuntimeError("the call is over on this node")
            work.done.set_result([Aborted(error)])
            return
        self._queue.append(work)
        self._last_count = work.count
        self.notify()

    def close(self, cancelled: bool) -> None:
        if self._closed:
            return
        self._closed, self._cancelled = True, cancelled
        for work in [*self._queue, *self._of.values()]:
            self._end(work)
        self._queue.clear()
        self.notify()

    # -- what the scheduler asks ------------------------------------------------------

    def work(self) -> JobWork:
        return self._work

    def served_by(self, workers: int, latency: float | None = None) -> None:
        pass  # the caller's job sizes the chunks

    @property
    def over(self) -> bool:
        return self._closed

    @property
    def finished(self) -> bool:
        return self._closed and not self._cancelled

    def abort(self, exc: BaseException | None = None) -> None:
        if exc is not None:
            self._error = self._error or exc
            for work in [*self._queue, *self._of.values()]:
                work.reports.append(Aborted(exc))
        self.close(cancelled=True)

    def has_work(self) -> bool:
        return bool(self._queue) and not self._closed

    def window(self) -> int:
        """One chunk per worker process at a time; for async shards run several at once,
        enough to run that many and one more to join them (`ChunkSizer.window`)."""
        together = self._work.opts.shard_concurrency
        return 1 if together <= 1 else joining_window(together, self._last_count)

    def take_chunk(self, seq: int, limit: int | None = None) -> Chunk | None:
        if not self.has_work():
            return None
        work = self._queue.popleft()
        if self._lines:
            work.reports.extend(self._lines)
            self._lines.clear()
        chunk = Chunk(seq, work.first, work.count, work.attempts, work.items, trace=work.trace)
        self._of[chunk] = work
        return chunk

    def put_back(self, chunk: Chunk) -> None:
        self._queue.appendleft(self._of.pop(chunk))

    def ran_on(self, worker: Any) -> None:
        self._workers[worker.pid] = worker

    def scaled(self, before: int, after: int, reason: str, ended: str | None) -> None:
        """A node's pool changes size: not reported to the caller (yet)."""

    @property
    def memory(self) -> MemoryLog:
        """Memory on a node: not reported to the caller (yet)."""
        return self._memory

    def deliver(self, chunk: Chunk, report: Result, values: list[Any], pid: int) -> None:
        work = self._of[chunk]
        chunk.reported(report.k0 + len(values))
        work.pids.add(pid)
        if report.final:
            self._read_output(work, pid)  # what its shards printed goes back with it
        work.reports.append(Delivered(report._replace(values=NO_VALUES), values, pid))
        if report.final:
            self._chunk_over(chunk)

    def deliver_unreadable(self, chunk: Chunk, report: Result, pid: int, exc: Exception) -> None:
        work = self._of[chunk]
        chunk.reported(report.k0 + report.n)
        work.pids.add(pid)
        work.reports.append(Unreadable(report, pid, exc))
        if report.final:
            self._chunk_over(chunk)

    def sent(self, chunk: Chunk, nbytes: int) -> None:
        pass  # the caller's job bounds what it holds; here the task holds the chunk

    def undelivered(self, chunks: Sequence[Chunk]) -> None:
        """The worker ended before these chunks reached it: they run on another one."""
        for chunk in reversed(chunks):
            self._queue.appendleft(self._of.pop(chunk))
        self.notify()

    def unsendable(self, chunk: Chunk, exc: Exception) -> None:
        work = self._of[chunk]
        work.reports.append(Unsendable(exc))
        self._chunk_over(chunk)

    def worker_lost(self, chunks: Sequence[Chunk], loss: Loss, *, timed_out: bool) -> None:
        for chunk in chunks:
            work = self._of[chunk]
            chunk.over()
            work.pids.add(loss.pid)
            work.reports.append(Lost(loss, timed_out))
            self._chunk_over(chunk)

    def _read_output(self, work: _Work, pid: int) -> None:
        worker = self._workers.get(pid)
        output = getattr(worker, "output", None)
        if output is None:
            return
        self._current = work
        try:
            output.drain()
        finally:
            self._current = None

    def _chunk_over(self, chunk: Chunk) -> None:
        work = self._of.pop(chunk)
        self._end(work)
        self.notify()

    def _end(self, work: _Work) -> None:
        if work.done.done():
            return
        for pid in sorted(work.pids):
            w = self._workers.get(pid)
            if w is not None:
                work.reports.insert(0, WorkerSeen(pid, w.peak_rss, w.end_reason, w.alive))
        work.done.set_result(list(work.reports))

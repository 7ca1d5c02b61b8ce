"""Where shards run: the one seam between the job layer and the workers.

::

    _calls (a call)                         a backend: _scheduler.Scheduler (local)
       │ builds Job ──────── run(job) ──────────▶    or _dask.backend.DaskBackend
       │                                                 │
       │   Job (a JobPort)  ◀── work() ─────────────────┤ what to run (JobWork), once
       │     ledger, answer ◀── served_by / window ──────┤ how much to send
       │                    ◀── take_chunk ──────────────┤ a Chunk to send
       │                    ◀── sent / unsendable ───────┤ it left (its size) / it cannot
       │                    ◀── deliver(chunk, Result) ──┤ what a worker reported
       │                    ◀── deliver_unreadable ──────┤   ... values that do not unpickle
       │                    ◀── undelivered / worker_lost┤ it never arrived / its worker died
       │                    ◀── ran_on(worker) ──────────┤ for the diagnostics
       │   waits: over / wait_change   ◀── abort(exc) ───┘ a failure that ends the job
       ▼
    ShardResult, ReduceResult, list, ShardStream

`_calls` builds a `Job` (`ashard._job`) per call and hands it to the pool's backend;
it never sees a process. The local backend is `ashard._scheduler.Scheduler` (worker
processes on this machine); `ashard._dask.backend.DaskBackend` runs ashard workers
hosted by Dask workers (and, on each node, a `Scheduler` whose job is a relay standing
for the caller's job). Both see a job only as a `JobPort` and read what to run from one
`JobWork` record; a job sees them only as a `Backend`.

A backend offers (`Backend`):

* ``size`` / ``resize(n)``: how many workers it runs at most; ``closed``.
* ``start()``: bring every worker up (a warm pool); ``aclose()``: stop them all.
* ``stats()`` -> `PoolStats`; ``pids()``: the live workers' process ids;
  ``stacks()``: each busy worker's stack now, by pid, with the position it runs.
* ``run(job, task_status=...)``: drive `job` until it is over. First it makes the
  job's ``borrow`` / ``out`` available to its workers (the local backend: shared
  memory; errors such as an unpicklable input are raised *before* ``task_status`` is
  signalled, so a stream's ``async with`` raises them); then it takes chunks and
  reports what happens to them until ``job.over``. When it returns — done, aborted, or
  cancelled — none of the job's shards runs any more and everything it made for the
  job is released. A failure that ends the job goes to ``job.abort(exc)``.
* ``call(CallWork(fn, args, kwargs, timeout, max_retries))``: one call on a worker; returns its
  value or raises what it raised; a call whose worker died or hung, or that ran past
  `timeout`, runs again up to `max_retries` times, then raises `WorkerCrashed` /
  `ShardTimeout`. A call that never reached its worker (the worker had ended) is sent
  to another one without counting as a run.

A job offers the backend exactly `JobPort`. Exactly-once delivery, retries and failure
accounting are the job's; a backend only has to report every chunk it took, as
delivered or lost, and only the job writes a `Chunk`'s fields (a node's relay marks
what it forwarded with `Chunk.reported` / `Chunk.over`).
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar

import anyio
import anyio.abc
import anyio.to_thread

if TYPE_CHECKING:
    from ashard._budget import MemoryLog
    from ashard._health import EndReason
    from ashard._options import CallOptions
    from ashard._outcomes import Loss
    from ashard._protocol import Payload, Result, SinkRef
    from ashard.results import PoolStats
    from ashard.shards import Shards

__all__ = [
    "Accepted",
    "Backend",
    "CallWork",
    "Changes",
    "Chunk",
    "JobPort",
    "JobWork",
    "OneLoop",
    "WorkerInfo",
    "import_supervisor",
    "load_supervisor",
    "needed_by",
    "on_one_loop",
]

SUPERVISOR = ("ashard._scheduler", "ashard._calls", "ashard.pool")
"""The modules that bring in the supervisor (the local backend, the call layer and
everything they use: ~100 ms of imports): loaded off the event loop on a pool's first
async use, never when `ashard.Pool` is touched. `ashard.pool` is there for the
module-level calls, whose default pool is made once they run."""


@dataclass(slots=True, eq=False)
class Chunk:
    """Consecutive positions ``first .. first+count-1`` sent to one worker as one
    message. Made and written by the job (`ashard._job`); a backend reads it."""

    seq: int
    first: int
    count: int
    attempts: list[int] | None
    items: Sequence[Any] | None  # a list, or a range for a map over a range
    done: int = 0
    heard: float = 0.0  # seconds into the call when it was sent, or last reported on
    nbytes: int = 0  # its items, pickled, while the caller holds them
    footprint: int | None = None  # bytes its largest shard may use (`footprint=`)
    trace: str | None = None  # its attempt span's W3C traceparent, when the call is traced

    def reported(self, upto: int) -> None:
        """Its worker reported every position before `upto`."""
        self.done = upto

    def over(self) -> None:
        """Every position of it is accounted for (reported, or lost with its worker)."""
        self.done = self.count


@dataclass(frozen=True, slots=True, eq=False)
class JobWork:
    """What to run, for one call: everything a backend sends its workers about it."""

    kind: int  # `ashard._protocol.SHARDS` or `ITEMS`
    fn: Payload  # pickled once, in the caller
    opts: CallOptions
    layout: Shards | None  # SHARDS: the shards; ITEMS: None
    sys_path: list[str]  # the caller's, at the call: workers import from it
    borrow: Mapping[str, Any]  # the inputs, as the caller gave them
    out: Mapping[str, Any]  # the outputs: arrays, table sinks (a Dask node: their specs)
    results: SinkRef | None  # where results="table" / "disk" go (the call's outputs open)


@dataclass(slots=True, eq=False)  # not frozen: a frozen init costs a call ~1 us
class CallWork:
    """One `call`: ``fn(*args, **kwargs)`` on a worker, stopped past `timeout`; a run
    lost with its worker (or stopped) runs again up to `max_retries` times."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    timeout: float | None
    max_retries: int = 0
    trace: Any = None  # its `ashard._tracing.CallTrace`, when the caller traces


class WorkerInfo(Protocol):
    """A worker as a job reports it in its diagnostics."""

    @property
    def pid(self) -> int: ...
    @property
    def peak_rss(self) -> int: ...
    @property
    def end_reason(self) -> EndReason | None: ...
    @property
    def alive(self) -> bool: ...


class Changes:
    """`notify()` wakes every task waiting in `wait_change()`: how a job (or a node's
    relay) tells the backend and the caller that something about it changed."""

    _changed: anyio.Event | None = None

    def notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_change(self) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()


class JobPort(Protocol):
    """Exactly what a backend may call on a job (see the module docstring). A job is
    hashable (by identity): the worker set keys its leases by job."""

    def __hash__(self) -> int: ...
    def work(self) -> JobWork: ...
    @property
    def over(self) -> bool: ...
    @property
    def finished(self) -> bool: ...
    def served_by(self, workers: int, latency: float | None = None) -> None: ...
    def has_work(self) -> bool: ...
    def window(self) -> int: ...
    def take_chunk(self, seq: int, limit: int | None = None) -> Chunk | None: ...
    def put_back(self, chunk: Chunk) -> None: ...
    def sent(self, chunk: Chunk, nbytes: int) -> None: ...
    def unsendable(self, chunk: Chunk, exc: Exception) -> None: ...
    def deliver(self, chunk: Chunk, report: Result, values: list[Any], pid: int) -> None: ...
    def deliver_unreadable(
        self, chunk: Chunk, report: Result, pid: int, exc: Exception
    ) -> None: ...
    def undelivered(self, chunks: Sequence[Chunk]) -> None: ...
    def worker_lost(self, chunks: Sequence[Chunk], loss: Loss, *, timed_out: bool) -> None: ...
    def ran_on(self, worker: WorkerInfo) -> None: ...
    def scaled(self, before: int, after: int, reason: str, ended: str | None) -> None: ...
    @property
    def memory(self) -> MemoryLog: ...
    def abort(self, exc: BaseException | None = None) -> None: ...
    def notify(self) -> None: ...
    async def wait_change(self) -> None: ...


class OneLoop:
    """The event loop a backend serves: its calls' waits and wake-ups, and its workers'
    channels, belong to the loop of the calls under way. A backend serves one loop
    after another (a notebook's, a test's, each `anyio.run`'s), but not two at once: a
    call from another thread's loop while calls are under way is refused (``with
    guard:`` raises `RuntimeError` before anything is done), where it would have hung."""

    __slots__ = ("_calls", "_lock", "_thread")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread = 0  # the thread whose loop runs the calls under way
        self._calls = 0

    def __enter__(self) -> None:
        me = threading.get_ident()
        with self._lock:
            if self._calls and self._thread != me:
                raise RuntimeError(
                    "this ashard pool is serving calls of an event loop in another thread, "
                    "and a pool serves one event loop at a time: give each thread's loop an "
                    "ashard.Pool of its own (the module-level functions share one default "
                    "pool), or call from threads through ashard.sync or ashard.Executor"
                )
            self._thread = me
            self._calls += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._calls -= 1


class _ServesOneLoop(Protocol):
    one_loop: OneLoop


_B = TypeVar("_B", bound=_ServesOneLoop)
_P = ParamSpec("_P")
_R = TypeVar("_R")


def on_one_loop(
    method: Callable[Concatenate[_B, _P], Awaitable[_R]],
) -> Callable[Concatenate[_B, _P], Coroutine[Any, Any, _R]]:
    """A backend's async method, run within its `OneLoop`."""

    async def guarded(self: _B, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self.one_loop:
            return await method(self, *args, **kwargs)

    functools.update_wrapper(guarded, method)
    return guarded


class Backend(Protocol):
    """Runs jobs and calls on workers; see the module docstring."""

    @property
    def size(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def resize(self, size: int) -> None: ...
    async def start(self, up_to: int | None = None) -> None: ...
    async def aclose(self) -> None: ...
    def stats(self) -> PoolStats: ...
    def pids(self) -> list[int]: ...
    async def stacks(self) -> dict[int, tuple[int | None, str | None]]: ...
    async def run(self, job: JobPort, *, task_status: anyio.abc.TaskStatus[None] = ...) -> None: ...
    async def call(self, call: CallWork) -> Any: ...


class Accepted(anyio.abc.TaskStatus[None]):
    """The task status a call hands `Backend.run`: it remembers whether the job was
    accepted (everything that can refuse it, such as a borrow that cannot be pickled,
    was checked), and only then resizes the default pool to the size the call asked
    for (`resize`), so that a refused call changes nothing."""

    def __init__(
        self,
        backend: Backend,
        resize: int | None = None,
        status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        self._backend = backend
        self._resize = resize
        self._status = status
        self.done = False

    def started(self, value: None = None) -> None:
        self.done = True
        if self._resize is not None and self._resize != self._backend.size:
            self._backend.resize(self._resize)
        self._status.started(value)


async def load_supervisor(*also: str) -> None:
    """Import the supervisor (and the modules `also`, which a call needs) in a thread,
    if they are not yet: a first import would stall the caller's event loop (~100 ms for
    the supervisor: the first request of a web app, say)."""
    if not all(name in sys.modules for name in (*SUPERVISOR, *also)):
        await anyio.to_thread.run_sync(import_supervisor, *also)


def needed_by(fn: object, options: Mapping[str, object] | None = None) -> tuple[str, ...]:
    """Modules a call imports as it is built, for `load_supervisor` to load before, off
    the event loop: cloudpickle for a function that travels by value (7 ms), and
    `ashard.tables` for a call that keeps its values in a table or on disk (15 ms)."""
    needs: tuple[str, ...] = ()
    if fn is not None and "cloudpickle" not in sys.modules:
        from ashard._serialize import travels_by_value  # loaded with any pool

        if travels_by_value(fn):
            needs = ("cloudpickle",)
    if options and options.get("results") in ("table", "disk"):
        needs = (*needs, "ashard.tables")
    return needs


def import_supervisor(*also: str) -> None:
    """Import the supervisor (and `also`) here and now (`load_supervisor`: the async
    way)."""
    for name in (*SUPERVISOR, *also):
        importlib.import_module(name)

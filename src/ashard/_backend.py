"""Where shards run: the one seam between the job layer and the workers.

`Pool` and the module-level API build a `Job` (`ashard._job`) per call and hand it to
a backend; they never see a process. The local backend is `ashard._scheduler.Scheduler`
(worker processes on this machine); a cluster backend (ashard workers hosted by Dask
workers) implements the same interface, so `api`, `Pool` and `_job` need no change
for it. The interface, both ways:

A backend offers (`Backend` below):

* ``size`` / ``resize(n)``: how many workers it runs at most; ``closed``.
* ``start()``: bring every worker up (a warm pool); ``aclose()``: stop them all.
* ``stats()`` -> `PoolStats`; ``pids()``: the live workers' process ids.
* ``run(job, task_status=...)``: drive `job` until it is over. First it makes the
  job's ``borrow`` / ``out`` available to its workers (the local backend: shared
  memory; errors such as an unpicklable input are raised *before* ``task_status`` is
  signalled, so a stream's ``async with`` raises them); then it takes chunks and
  reports what happens to them (below) until ``job.over``. When it returns — done,
  aborted, or cancelled — none of the job's shards runs any more and everything it
  made for the job is released. A failure that ends the job goes to ``job.abort(exc)``.
* ``call(fn, args, kwargs, timeout, max_retries)``: one call on a worker; returns its
  value or raises what it raised; a call whose worker died or hung, or that ran past
  `timeout`, runs again up to `max_retries` times, then raises `WorkerCrashed` /
  `ShardTimeout`. A call that never reached its worker (the worker had ended) is sent
  to another one without counting as a run.

A job offers the backend (`ashard._job.Job`):

* what to run: ``fn`` (pickled once), ``borrow``, ``out``, ``opts`` (the checked
  `CallOptions`: ``timeout``, ``seed``, ``cow``, ``profile``), ``kind``, ``layout``,
  ``sys_path``;
* ``has_work()``, ``window()`` (chunks a worker should hold), ``take_chunk(seq, limit)``;
* ``served_by(n)`` first (chunk sizes leave work for each of `n` workers);
* ``deliver(chunk, k0, values, errors, elapsed, final, pid, writes)`` for each report,
  ``deliver_unreadable(chunk, report, pid, exc)`` when its values do not unpickle,
  ``unsendable(chunk, exc)`` when a chunk's items cannot be pickled,
  ``undelivered(chunks)`` when chunks never reached the worker (its channel had closed),
  ``worker_lost(chunks, loss, timed_out=...)`` when a worker died, hung or broke the
  protocol holding chunks (oldest first), ``ran_on(worker)`` for its diagnostics;
* ``over``, ``finished``, ``abort(exc)``, ``wait_change()``.

Exactly-once delivery, retries and failure accounting are the job's; a backend only
has to report every chunk it took, as delivered or lost.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc
import anyio.to_thread

if TYPE_CHECKING:
    from ashard._health import HealthPolicy
    from ashard._job import Job
    from ashard._protocol import Payload
    from ashard.results import PoolStats

__all__ = ["Accepted", "Backend", "load_supervisor", "open_backend"]

SUPERVISOR = ("ashard._scheduler", "ashard._calls")
"""The modules that bring in the supervisor (the local backend, the call layer and
everything they use: ~100 ms of imports): loaded off the event loop on a pool's first
async use, never when `ashard.Pool` is touched."""


class Backend(Protocol):
    """Runs jobs and calls on workers; see the module docstring."""

    @property
    def size(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def resize(self, size: int) -> None: ...
    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    def stats(self) -> PoolStats: ...
    def pids(self) -> list[int]: ...
    async def run(self, job: Job, *, task_status: anyio.abc.TaskStatus[None] = ...) -> None: ...
    async def call(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        max_retries: int = 0,
    ) -> Any: ...


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


async def load_supervisor() -> None:
    """Import the supervisor in a thread, if it is not yet: its first import would stall
    the caller's event loop for ~100 ms (the first request of a web app, say)."""
    if not all(name in sys.modules for name in SUPERVISOR):
        await anyio.to_thread.run_sync(import_supervisor)


def import_supervisor() -> None:
    """Import the supervisor here and now (`load_supervisor` is the async way)."""
    for name in SUPERVISOR:
        importlib.import_module(name)


def open_backend(
    size: int,
    per_node: int | None,
    env: Mapping[str, str],
    init: Payload | None,
    max_frame: int,
    policy: HealthPolicy,
    cluster: object = None,
) -> Backend:
    """The backend of a pool: worker processes on this machine, or (`cluster`, a Dask
    scheduler address, client or cluster object) ashard workers hosted by Dask workers,
    `per_node` on each (default: its thread count). Imports happen here, on first use:
    the local backend is the supervisor (`load_supervisor` brings it in off the loop
    first), the Dask one needs the optional `distributed`."""
    from ashard._handle import WorkerConfig

    config = WorkerConfig(
        env=dict(env), init=init, max_frame=max_frame, memory_limit=policy.hard_cap
    )
    if cluster is None:
        from ashard._scheduler import Scheduler

        return Scheduler(size, config, policy)
    from ashard._dask.backend import DaskBackend, check_cluster

    check_cluster(cluster)
    return DaskBackend(cluster, per_node, config, policy)

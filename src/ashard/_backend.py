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

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc

if TYPE_CHECKING:
    from ashard._job import Job
    from ashard.results import PoolStats

__all__ = ["Accepted", "Backend"]


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

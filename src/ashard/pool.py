"""`Pool`: a warm set of supervised workers, and the calls that run on it.

Each call checks its arguments once (`ashard._options`: one `CallOptions` record),
builds a `Job` and hands it to the pool's backend (`ashard._backend`: today the local
worker processes), then shapes the answer. Nothing here knows where shards run.
"""

from __future__ import annotations

import atexit
import importlib
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Unpack

import anyio

from ashard._options import (
    CallOptions,
    MapOptions,
    ReduceOptions,
    ShardOptions,
    StreamOptions,
    check_borrow,
    check_count,
    check_env,
    check_fn,
    check_items,
    check_positive_int,
    check_size,
    check_takes,
    check_timeout,
    health_policy,
    resolve_shards,
    takes_options,
)
from ashard.shards import Shards

if TYPE_CHECKING:
    from ashard._backend import Backend
    from ashard._job import Job, Reducer
    from ashard._stream import ShardStream
    from ashard.errors import ShardError
    from ashard.results import PoolStats, ReduceResult, ShardResult
    from ashard.tables import ResultStore

__all__ = ["Pool", "load_supervisor"]

DEFAULT_MAX_PENDING = 1024
"""Finished shards a stream holds for a slow consumer when `max_pending` is None."""

SUPERVISOR = "ashard._scheduler"
"""The module that brings in the supervisor (the local backend and everything it uses:
~100 ms of imports): loaded off the event loop on a pool's first async use."""

_atexit_registered = False


async def load_supervisor() -> None:
    """Import the supervisor in a thread, if it is not yet: its first import would stall
    the caller's event loop for ~100 ms (the first request of a web app, say)."""
    if SUPERVISOR not in sys.modules:
        await anyio.to_thread.run_sync(importlib.import_module, SUPERVISOR)


def _kill_all_at_exit() -> None:
    """At interpreter exit: no worker may outlive the parent (none ran if the worker
    handles were never imported)."""
    handles = sys.modules.get("ashard._handle")
    if handles is not None:
        handles.kill_all_now()


class Pool:
    """Worker processes that start once and serve call after call.

    Use it as ``async with ashard.Pool(4) as pool:``; entering starts every worker
    (a warm pool), leaving stops them. Without ``async with``, workers start on first
    use; call `aclose()` when done. Several concurrent calls share the workers fairly.
    `init` runs once in every new worker; `env` adds environment variables for them.

    Health: a worker's private memory (RSS less shared pages) is read every
    `health_check_interval` seconds and after every chunk. Above `mem_cap` ("512MB",
    "2GB" or bytes) it is replaced between shards; above ``mem_cap * hard_cap`` it is
    killed at once and its shard retried. `recycle` replaces workers whose memory grew
    past their post-`init` baseline by that fraction (True: 0.5; False: never).
    `max_tasks` replaces a worker after that many shards or calls; `idle_timeout` lets
    idle workers exit (new ones start on demand).

    `cluster=` runs the pool on a Dask distributed cluster: a scheduler address
    (``"tcp://host:8786"``), a `distributed.Client` or a cluster object (`LocalCluster`,
    `SSHCluster`, ...). Each Dask worker then hosts `workers` ashard workers (default:
    its thread count) with the same supervision; `out=` buffers are refused there.

    Nothing a worker sends is trusted: a message larger than `max_message` (or that
    is not a valid one) breaks that worker — it is killed and replaced, its shards run
    again — and a result too large to send fails its shard, saying so.
    """

    __module__ = "ashard"

    def __init__(
        self,
        workers: int | None = None,
        *,
        mem_cap: int | str | None = None,
        max_tasks: int | None = None,
        idle_timeout: float | None = None,
        init: Callable[[], Any] | None = None,
        env: Mapping[str, str] | None = None,
        recycle: bool | float = True,
        hard_cap: float = 1.5,
        health_check_interval: float = 1.0,
        max_message: int | str = "2GiB",
        cluster: object = None,
    ) -> None:
        per_node = check_positive_int("workers", workers, allow_none=True)
        if cluster is not None:
            from ashard._dask import check_cluster

            check_cluster(cluster)
        size = per_node or os.cpu_count() or 1
        policy = health_policy(
            mem_cap=mem_cap, hard_cap=hard_cap, recycle=recycle,
            health_check_interval=health_check_interval, max_tasks=max_tasks,
            idle_timeout=idle_timeout,
        )  # fmt: skip
        init_payload = None
        if init is not None:
            from ashard._serialize import pickle_payload

            init_payload = pickle_payload(check_fn(init, "init"), "init")
        max_frame = check_size("max_message", max_message)
        # What the backend is made of; it is made on first use, so that making a Pool
        # (and touching `ashard.Pool`) imports no supervisor on the caller's loop.
        self._recipe = (size, per_node, check_env(env), init_payload, max_frame, policy, cluster)
        self._made: Backend | None = None
        self._closed_unmade = False
        if cluster is not None:
            self._backend  # noqa: B018 - a cluster pool is made at once (it imports dask)
        global _atexit_registered
        if not _atexit_registered:
            atexit.register(_kill_all_at_exit)
            _atexit_registered = True

    @property
    def _backend(self) -> Backend:
        """The backend, made (and the supervisor imported, if it was not) on first use.
        Async paths `await self._ready()` first, which imports it off the loop."""
        if self._made is None:
            if self._closed_unmade:
                raise RuntimeError("this ashard.Pool is closed")
            from ashard._handle import WorkerConfig

            size, per_node, env, init, max_frame, policy, cluster = self._recipe
            config = WorkerConfig(env=env, init=init, max_frame=max_frame,
                                  memory_limit=policy.hard_cap)  # fmt: skip
            if cluster is None:
                from ashard._scheduler import Scheduler

                self._made = Scheduler(size, config, policy)
            else:
                from ashard._dask import DaskBackend

                self._made = DaskBackend(cluster, per_node, config, policy)
        return self._made

    async def _ready(self) -> Backend:
        """The backend, the supervisor imported off the event loop if need be."""
        if self._made is None and not self._closed_unmade:
            await load_supervisor()
        return self._backend

    # -- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> Pool:
        try:
            await self.start()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start every worker now instead of on first use."""
        await (await self._ready()).start()

    async def aclose(self) -> None:
        """Stop all workers. The pool cannot be used afterwards."""
        if self._made is None:
            self._closed_unmade = True  # nothing started: nothing to stop
            return
        await self._made.aclose()

    @property
    def closed(self) -> bool:
        return self._made.closed if self._made is not None else self._closed_unmade

    @property
    def workers(self) -> int:
        """The pool's size: how many workers it runs at most."""
        return self._made.size if self._made is not None else self._recipe[0]

    @property
    def stats(self) -> PoolStats:
        if self._made is None:
            from ashard.results import PoolStats

            return PoolStats(0, 0, 0, 0, 0, 0)
        return self._made.stats()

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        return self._made.pids() if self._made is not None else []

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.pids)} alive"
        return f"<ashard.Pool workers={self.workers} {state}>"

    def _repr_html_(self) -> str:
        from ashard.results import html_table

        stats = self.stats
        rows = [
            ("workers", f"{self.workers}"),
            ("alive", "closed" if self.closed else f"{stats.alive}"),
            ("started", f"{stats.started:,}"),
            ("crashed", f"{stats.crashed:,}"),
            ("timed out", f"{stats.timed_out:,}"),
            ("recycled", f"{stats.recycled:,}"),
            ("shards done", f"{stats.shards_done:,}"),
        ]
        return html_table("ashard.Pool", rows)

    # -- work -------------------------------------------------------------------------

    @takes_options(ShardOptions)
    async def shard_map(
        self,
        shards: int | Shards | Sequence[Any],
        fn: Callable[..., Any],
        *,
        borrow: Mapping[str, Any] | None = None,
        out: Mapping[str, Any] | None = None,
        **options: Unpack[ShardOptions],
    ) -> ShardResult:
        """Run ``fn(shard, **borrow)`` for every shard; see `ashard.shard_map`."""
        job, layout = shard_job(shards, fn, borrow, out, options, ShardOptions, "shard_map")
        return await self._shard_result(job, layout)

    @takes_options(StreamOptions)
    def shard_stream(
        self,
        shards: int | Shards | Sequence[Any],
        fn: Callable[..., Any],
        *,
        borrow: Mapping[str, Any] | None = None,
        out: Mapping[str, Any] | None = None,
        **options: Unpack[StreamOptions],
    ) -> ShardStream:
        """``async with pool.shard_stream(...) as stream: async for done in stream``."""
        job, layout = shard_job(shards, fn, borrow, out, options, StreamOptions, "shard_stream")
        return self._stream(job, layout)

    @takes_options(ReduceOptions)
    async def shard_reduce(
        self,
        shards: int | Shards | Sequence[Any],
        fn: Callable[..., Any],
        combine: Callable[[Any, Any], Any],
        *,
        init: Any = None,
        ordered: bool = False,
        borrow: Mapping[str, Any] | None = None,
        out: Mapping[str, Any] | None = None,
        **options: Unpack[ReduceOptions],
    ) -> ReduceResult:
        """Combine every shard's value as it arrives; see `ashard.shard_reduce`."""
        job, _ = reduce_job(shards, fn, combine, init, ordered, borrow, out, options)
        return await self._reduce_result(job)

    @takes_options(MapOptions)
    async def map(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        *,
        borrow: Mapping[str, Any] | None = None,
        **options: Unpack[MapOptions],
    ) -> list[Any]:
        """``[fn(item) for item in items]`` on the workers, in order; see `ashard.map`."""
        return await self._map_result(map_job(fn, items, borrow, options))

    async def call(
        self,
        fn: Callable[..., Any],
        *args: Any,
        timeout: float | None = None,
        max_retries: int = 0,
        **kwargs: Any,
    ) -> Any:
        """``fn(*args, **kwargs)`` on one worker; see `ashard.call`."""
        fn = check_fn(fn)
        seconds = None if timeout is None else check_timeout("timeout", timeout)
        retries = check_count("max_retries", max_retries)
        return await (await self._ready()).call(fn, args, kwargs, seconds, retries)

    # A call is checked and built into a job first (`shard_job`, `map_job`: nothing
    # changes if that raises), then run here. `resize`: the size the default pool takes
    # for the call, once the backend accepted the job (`Accepted`).

    async def _shard_result(
        self, job: Job, layout: Shards, resize: int | None = None
    ) -> ShardResult:
        await self._run(job, resize)
        result = job.result(layout)
        if job.opts.errors == "raise":
            result.raise_for_failures()
        return result

    async def _reduce_result(self, job: Job, resize: int | None = None) -> ReduceResult:
        from ashard.results import ReduceResult

        await self._run(job, resize)
        assert job.reducer is not None
        result = ReduceResult(job.reducer.value, job.failure_list(), job.diagnostics())
        if job.opts.errors == "raise":
            result.raise_for_failures()
        return result

    def _stream(self, job: Job, layout: Shards, resize: int | None = None) -> ShardStream:
        from ashard._stream import ShardStream

        return ShardStream(self._backend, job, layout, resize)

    async def _map_result(self, job: Job, resize: int | None = None) -> list[Any]:
        from ashard.errors import ShardMapError
        from ashard.results import _failure_message

        await self._run(job, resize)
        if job.failures and job.opts.errors == "raise":
            result = job.result(Shards(job.next_pos, 1, "contiguous"))
            message = _failure_message(result.failures, "item")
            raise ShardMapError(message, result.failures, result)
        values = job.results
        failures: Mapping[int, ShardError] = job.failures
        for pos, err in failures.items():
            values[pos] = err
        return values

    async def _run(self, job: Job, resize: int | None) -> None:
        await run_job(await self._ready(), job, resize)


async def run_job(backend: Backend, job: Job, resize: int | None = None) -> None:
    """Run `job` on `backend`: its outputs opened before and settled after (shielded:
    a cancelled call still sweeps what its workers left); raise what ended it.
    `resize`: see `Accepted`."""
    from ashard._backend import Accepted

    status = Accepted(backend, resize)
    try:
        if job.has_outputs:
            await anyio.to_thread.run_sync(job.open_outputs)
            try:
                await backend.run(job, task_status=status)
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(job.close_outputs)
        else:
            await backend.run(job, task_status=status)
    finally:
        job.close()
    if job.fatal is not None:
        raise job.fatal


def shard_job(
    shards: object,
    fn: object,
    borrow: object,
    out: object,
    options: Mapping[str, object],
    accepted: type,
    where: str,
    reducer: Reducer | None = None,
) -> tuple[Job, Shards]:
    """The job of a `shard_map`, `shard_stream` or `shard_reduce` call, every
    argument checked (nothing is made on disk yet)."""
    from ashard._job import Job, StreamBuffer
    from ashard._serialize import pickle_payload
    from ashard._sources import with_sources

    opts = CallOptions.build(options, accepted, where)
    checked_fn = check_fn(fn)
    layout, sequence = resolve_shards(shards)
    inputs, outputs = check_borrow(borrow, out)
    check_takes(checked_fn, inputs, outputs, "shard")
    store = results_store(opts)
    payload = pickle_payload(with_sources(checked_fn), "fn")
    stream = None
    if accepted is StreamOptions:
        stream = StreamBuffer(opts.ordered, opts.max_pending or DEFAULT_MAX_PENDING)
    job = Job.of_shards(payload, opts, layout, sequence, inputs, outputs, stream, store, reducer)
    return job, layout


def results_store(opts: CallOptions) -> ResultStore | None:
    """The store of a call's values under ``results="table"`` / ``"disk"``."""
    if opts.results == "memory":
        if opts.results_path is not None:
            raise ValueError(
                'results_path is where results="table" or "disk" go; with results="memory" '
                "the values come back to the caller: drop results_path or choose a mode"
            )
        return None
    from ashard._places import Place
    from ashard.tables import ResultStore

    place = None
    if opts.results_path is not None:  # checked for being empty when the call starts
        place = Place.resolve(opts.results_path, None, "results_path")
    return ResultStore(opts.results, place)


def reduce_job(
    shards: object,
    fn: object,
    combine: object,
    init: object,
    ordered: object,
    borrow: object,
    out: object,
    options: Mapping[str, object],
) -> tuple[Job, Shards]:
    """The job of a `shard_reduce` call, every argument checked."""
    from ashard._job import Reducer

    checked = check_fn(combine, "combine")
    if not isinstance(ordered, bool):
        raise TypeError(f"ordered must be True or False, got {type(ordered).__name__}")
    given = dict(options)
    limit = check_positive_int("max_pending", given.pop("max_pending", None), allow_none=True)
    reducer = Reducer(checked, init, ordered, limit or DEFAULT_MAX_PENDING)
    return shard_job(shards, fn, borrow, out, given, ShardOptions, "shard_reduce", reducer)


def map_job(fn: object, items: object, borrow: object, options: Mapping[str, object]) -> Job:
    """The job of a `map` call, every argument checked."""
    from ashard._job import Job
    from ashard._serialize import pickle_payload
    from ashard._sources import with_sources

    opts = CallOptions.build(options, MapOptions, "map")
    checked_fn = check_fn(fn)
    iterable = check_items(items)
    inputs, _ = check_borrow(borrow, None)
    check_takes(checked_fn, inputs, {}, "item")
    return Job.of_items(pickle_payload(with_sources(checked_fn), "fn"), opts, iterable, inputs)

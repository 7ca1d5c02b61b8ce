"""`Pool`: a warm set of supervised workers, and the calls that run on it.

Each call checks its arguments once (`ashard._options`: one `CallOptions` record),
builds a `Job` and hands it to the pool's backend (`ashard._backend`: today the local
worker processes), then shapes the answer. Nothing here knows where shards run.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Unpack

import anyio

from ashard._backend import Backend, CallWork, load_supervisor, needed_by
from ashard._options import (
    MapOptions,
    ReduceOptions,
    ShardOptions,
    StreamOptions,
    check_count,
    check_entry_point,
    check_env,
    check_fn,
    check_min_workers,
    check_shard_args,
    check_size,
    check_timeout,
    check_worker_loop,
    check_worker_nice,
    check_workers,
    health_policy,
    takes_options,
)
from ashard._serialize import pickle_payload
from ashard._tracing import call_trace
from ashard.shards import Shards

if TYPE_CHECKING:
    from ashard._health import HealthPolicy
    from ashard._protocol import Payload
    from ashard._stream import ShardStream
    from ashard.results import PoolStats, ReduceResult, ShardResult

__all__ = ["Pool"]

WORKER_NICE = 10
"""Steps of niceness workers run below the caller by default (`Pool(worker_nice=)`)."""
_atexit_registered = False


def _kill_all_at_exit() -> None:
    """At interpreter exit: no worker may outlive the parent (none ran if the worker
    handles were never imported)."""
    handles = sys.modules.get("ashard._handle")
    if handles is not None:
        handles.kill_all_now()


def _open_backend(
    size: int,
    per_node: int | None,
    env: Mapping[str, str],
    init: Payload | None,
    max_frame: int,
    policy: HealthPolicy,
    cluster: object = None,
    keep_borrowed: bool = True,
    otel_setup: str | None = None,
    worker_loop: str = "asyncio",
    worker_nice: int = 0,
) -> Backend:
    """The backend of a pool (chosen here, where the pool is made, so that the seam
    imports neither of them): worker processes on this machine, or (`cluster`, a Dask
    scheduler address, client or cluster object) ashard workers hosted by Dask workers,
    `per_node` on each (default: its thread count). Imports happen here, on first use:
    the local backend is the supervisor (`load_supervisor` brings it in off the loop
    first), the Dask one needs the optional `distributed`."""
    from ashard._handle import WorkerConfig  # the supervisor: see the docstring

    config = WorkerConfig(
        env=dict(env),
        init=init,
        max_frame=max_frame,
        memory_limit=policy.hard_cap,
        hygiene=policy.hygiene,
        otel_setup=otel_setup,
        worker_loop=worker_loop,
        nice=worker_nice,
    )
    if cluster is None:
        from ashard._scheduler import Scheduler  # the supervisor

        return Scheduler(size, config, policy, keep_borrowed)
    from ashard._dask.backend import DaskBackend, check_cluster  # optional: distributed

    check_cluster(cluster)
    return DaskBackend(cluster, per_node, config, policy)


class Pool:
    """Worker processes that start once and serve call after call.

    Use it as ``async with ashard.Pool(4) as pool:``; entering starts every worker
    (a warm pool), leaving stops them. Without ``async with``, workers start on first
    use; call `aclose()` when done. Several concurrent calls share the workers fairly.
    `init` runs once in every new worker; `env` adds environment variables for them.

    Health: a worker's private memory (RSS less shared pages) is read every
    `health_check_interval` seconds and after every chunk. Above ``mem_pause * mem_cap``
    it is paused: it gets no new work until it falls back a little below (after
    `pause_timeout` seconds paused it is recycled; when every worker is paused the
    largest is recycled at once). Above `mem_cap` ("512MB", "2GB" or bytes) it is
    replaced between shards; above ``mem_cap * hard_cap`` it is killed at once and its
    shard retried. `recycle` replaces workers whose memory grew
    past their post-`init` baseline by that fraction (True: 0.5; False: never).
    `max_tasks` replaces a worker after that many shards or calls.

    Elastic: `workers` is the most the pool runs, `min_workers` the fewest it keeps
    (default: all of them; 0 when `idle_timeout` is given). Below the most, workers
    start as queued work needs them, about one start at a time per live worker; above
    the fewest, a worker idle for `idle_timeout` seconds (default 15 when `min_workers`
    is below `workers`) exits. A busy worker is never stopped to scale down. Entering
    ``async with`` starts `min_workers` when given, else every worker.

    `mem_budget` ("6GB", bytes, or "auto": 0.85 x the memory this process may still use,
    under its cgroup's limit if it has one) is what the running shards may use together:
    a chunk starts only when its `footprint` (a call's option: bytes per shard) fits
    beside the running ones; one larger than the budget runs alone, never refused.
    Without `footprint` the budget holds back new chunks while the workers' measured
    memory is over it.

    `cluster=` runs the pool on a Dask distributed cluster: a scheduler address
    (``"tcp://host:8786"``), a `distributed.Client` or a cluster object (`LocalCluster`,
    `SSHCluster`, ...). Each Dask worker then hosts `workers` ashard workers (default:
    its thread count) with the same supervision; `out=` buffers are refused there.

    `keep_borrowed`: the pool keeps the shared copy of an array its calls borrowed (1 MiB
    or more) while the array lives and the pool is open, and a later call borrowing the
    array unchanged reuses it (compared byte for byte first: a changed array is copied
    again). False: a copy per call, let go when the call ends. The default pool keeps
    none.

    `hygiene`: after each chunk or call a worker puts back what user code changed in
    process-wide state - `os.environ`, the working directory, `sys.path`, `warnings`
    filters, the root logger, signal handlers, `sys.settrace`/`setprofile`, `random`
    after `random.seed` - and reports what it cannot (threads, child processes or file
    descriptors left behind): `Diagnostics.hygiene`, and one `ashard.HygieneWarning` per
    call. "recycle" also replaces a worker that left something behind; "off" checks
    nothing. What `init` does is the baseline, not a change.

    Tracing: when the application has an OpenTelemetry tracer provider that records,
    each call is a span (``ashard.shard_map``, ``ashard.call``, ...) with a child span
    ``ashard.attempt`` per attempt, made in the caller (so a killed worker's attempt
    still has its span, with outcome "crash"). `otel_setup` ("pkg.module:function",
    importable in the workers) runs once in each new worker to install its tracer
    provider; each chunk then makes an ``ashard.run`` span there, under its attempt,
    flushed before the worker exits.

    `async def` functions run on an event loop each worker keeps: `worker_loop`
    "asyncio" (default), "uvloop" or "trio"; a call's `shard_concurrency` says how many
    of a worker's shards run on it at once.

    Workers run `worker_nice` steps of niceness below the caller (default 10, as the
    `nice` command; Ray's workers run at 15): when the machine's CPUs are all busy, the
    kernel lets the caller's event loop run first, so that the loop stays responsive and
    the caller, which feeds every worker, is not the bottleneck. Nice values count among
    the processes of one session or container; 0 runs workers at the caller's priority.

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
        min_workers: int | None = None,
        mem_budget: int | str | None = None,
        mem_pause: float = 0.8,
        pause_timeout: float = 10.0,
        init: Callable[[], Any] | None = None,
        env: Mapping[str, str] | None = None,
        recycle: bool | float = True,
        hard_cap: float = 1.5,
        health_check_interval: float = 1.0,
        max_message: int | str = "2GiB",
        cluster: object = None,
        keep_borrowed: bool = True,
        hygiene: Literal["check", "recycle", "off"] = "check",
        otel_setup: str | None = None,
        worker_loop: Literal["asyncio", "uvloop", "trio"] = "asyncio",
        worker_nice: int = WORKER_NICE,
    ) -> None:
        per_node = check_workers("workers", workers, local=cluster is None)
        size = per_node or os.cpu_count() or 1
        fewest = check_min_workers(min_workers, size, idle_timeout)
        if cluster is not None and mem_budget is not None:
            raise ValueError(
                "mem_budget is not supported on a cluster pool (cluster=): each Dask worker "
                "has its own memory; use Dask's worker memory limits there"
            )
        policy = health_policy(
            mem_cap=mem_cap, hard_cap=hard_cap, recycle=recycle,
            health_check_interval=health_check_interval, max_tasks=max_tasks,
            idle_timeout=idle_timeout, min_workers=fewest, mem_budget=mem_budget,
            mem_pause=mem_pause, pause_timeout=pause_timeout, hygiene=hygiene,
        )  # fmt: skip
        init_payload = None
        if init is not None:
            init_payload = pickle_payload(check_fn(init, "init"), "init")
        # a worker's own messages (its start, reports in pieces of 32 KiB) fit in 64 KiB
        max_frame = check_size("max_message", max_message, least=1 << 16)
        setup = check_entry_point("otel_setup", otel_setup)
        loop = check_worker_loop(worker_loop)
        nice = check_worker_nice(worker_nice)
        if type(keep_borrowed) is not bool:
            raise TypeError(f"keep_borrowed must be True or False, got {keep_borrowed!r}")
        # What the backend is made of; it is made on first use, so that making a Pool
        # (and touching `ashard.Pool`) imports no supervisor on the caller's loop.
        self._recipe = (size, per_node, check_env(env), init_payload, max_frame, policy, cluster,
                        keep_borrowed, setup, loop, nice)  # fmt: skip
        self._made: Backend | None = None
        self._warm = min_workers  # what entering starts (None: every worker)
        self._closed_unmade = False
        if cluster is not None:
            self._make()  # a cluster pool connects at once (and imports dask)
        global _atexit_registered
        if not _atexit_registered:
            atexit.register(_kill_all_at_exit)
            _atexit_registered = True

    def _make(self) -> Backend:
        """The backend, made (and the supervisor imported, if it was not) on first use."""
        if self._made is None:
            if self._closed_unmade:
                raise RuntimeError("this ashard.Pool is closed")
            self._made = _open_backend(*self._recipe)
        return self._made

    async def backend(self) -> Backend:
        """The backend this pool runs on (`ashard._backend`), made on first use with the
        supervisor imported off the event loop. ashard's call layer uses it; user code
        does not need it."""
        if self._made is None and not self._closed_unmade:
            await load_supervisor()
        return self._make()

    # -- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> Pool:
        """Start `min_workers` workers when it was given, else every worker."""
        try:
            await (await self.backend()).start(self._warm)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start every worker now instead of on first use."""
        await (await self.backend()).start()

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
            from ashard.results import PoolStats  # a first touch loads no more than it needs

            return PoolStats(0, 0, 0, 0, 0, 0)
        return self._made.stats()

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        return self._made.pids() if self._made is not None else []

    async def stacks(self) -> dict[int, tuple[int | None, str | None]]:
        """The current stack of every busy worker, without disturbing its work:
        ``{pid: (shard_id, stack_text)}`` - `shard_id` the shard (or `map` item) it runs,
        None for a `call`; the text every thread's stack, as faulthandler writes it,
        None if the worker could not answer within half a second. Idle workers are left
        out (an idle or unstarted pool gives ``{}``)."""
        if self._made is None or self.closed:
            return {}
        return await self._made.stacks()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.pids)} alive"
        return f"<ashard.Pool workers={self.workers} {state}>"

    def _repr_html_(self) -> str:
        from ashard.results import html_table  # a first touch loads no more than it needs

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
        await load_supervisor(*needed_by(fn, options))
        from ashard import _calls  # loaded just now, off the loop (`load_supervisor`)

        job, layout = _calls.shard_job(shards, fn, borrow, out, options, ShardOptions, "shard_map")
        return await _calls.shard_result(self, job, layout)

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
        if self.closed:
            raise RuntimeError("this ashard.Pool is closed")
        check_shard_args(shards, fn, borrow, out, options, StreamOptions, "shard_stream")
        from ashard._stream import ShardStream  # imports nothing more

        async def build() -> ShardStream:
            await load_supervisor(*needed_by(fn, options))
            from ashard import _calls  # loaded just now, off the loop (`load_supervisor`)

            job, layout = _calls.shard_job(
                shards, fn, borrow, out, options, StreamOptions, "shard_stream"
            )
            return _calls.stream(self, job, layout)

        return ShardStream.later(build)

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
        await load_supervisor(*needed_by(fn, options))
        from ashard import _calls  # loaded just now, off the loop (`load_supervisor`)

        job, _ = _calls.reduce_job(shards, fn, combine, init, ordered, borrow, out, options)
        return await _calls.reduce_result(self, job)

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
        await load_supervisor(*needed_by(fn))
        from ashard import _calls  # loaded just now, off the loop (`load_supervisor`)

        return await _calls.map_result(self, _calls.map_job(fn, items, borrow, options))

    @takes_options(ShardOptions)
    async def retry_failed(
        self,
        result: ShardResult,
        fn: Callable[..., Any] | None = None,
        *,
        only: type[BaseException] | tuple[type[BaseException], ...] | None = None,
        **options: Unpack[ShardOptions],
    ) -> ShardResult:
        """Run the failed (and skipped) shards of `result` again on this pool; see
        `ashard.retry_failed`."""
        await load_supervisor(*needed_by(fn, options))
        from ashard import _calls  # loaded just now, off the loop (`load_supervisor`)

        return await _calls.retry_result(result, fn, only, options, self)

    async def call(
        self,
        /,
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
        needs = needed_by(fn)
        if needs:
            await load_supervisor(*needs)
        backend = await self.backend()
        trace = call_trace("call", **{"ashard.max_retries": retries})
        work = CallWork(fn, args, kwargs, seconds, retries, trace)
        if trace is None:
            return await backend.call(work)
        try:
            value = await backend.call(work)
        except BaseException as exc:
            trace.close(exc)
            raise
        trace.close()
        return value

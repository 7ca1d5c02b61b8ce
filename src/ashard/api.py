"""The module-level API: `shard_map`, `shard_stream` (and the rest) on the default pool
(or the `pool=` given), plus `default_pool()` and `shutdown()`.

This module is what `ashard.call` and its siblings load, so it imports the
supervisor only when a call runs: the first call on the default pool launches its
first worker (`ashard._spawn.prestart`), then imports the supervisor off the event
loop while that worker's interpreter starts. That is why `Pool` and the call layer
(`ashard._calls`) are imported inside the functions here (cold start): importing them
before the worker is launched would delay its start by ~30 ms.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Unpack

from ashard import _spawn
from ashard._offloop import anyio_backend, end_launched_ahead, import_in_a_thread
from ashard._options import (
    MapOptions,
    ReduceOptions,
    ShardOptions,
    StreamOptions,
    check_shard_args,
    check_workers,
    takes_options,
)

if TYPE_CHECKING:
    from ashard._stream import ShardStream
    from ashard.pool import Pool
    from ashard.results import ReduceResult, ShardResult
    from ashard.shards import Shards

__all__ = [
    "call",
    "default_pool",
    "map",
    "retry_failed",
    "shard_map",
    "shard_reduce",
    "shard_stream",
    "shutdown",
]

_default: Pool | None = None


def _forget_default() -> None:
    """In a forked child: the parent's default pool is not the child's."""
    global _default
    _default = None


os.register_at_fork(after_in_child=_forget_default)


def default_pool() -> Pool:
    """The pool the module-level functions use, created (not yet started) on first use.
    Its workers are loop-independent: it serves one event loop after another."""
    global _default
    if _default is None or _default.closed:
        from ashard.pool import Pool  # cold start: see the module docstring

        _default = Pool(keep_borrowed=False, min_workers=0)  # a copy per call: see `Pool`
    return _default


def _target(pool: Pool | None, workers: int | None) -> tuple[Pool, int | None]:
    """The pool a call runs on, and the size the default pool should take for it (it
    takes it only once the call is accepted: `ashard._backend.Accepted`)."""
    from ashard._calls import choose_pool  # cold start: see the module docstring
    from ashard.pool import Pool  # cold start

    return choose_pool(pool, workers, default_pool, Pool, "ashard.Pool")


async def shutdown() -> None:
    """Stop the default pool's workers. A later call starts a fresh default pool."""
    global _default
    pool, _default = _default, None
    if pool is not None:
        await pool.aclose()


@contextlib.asynccontextmanager
async def _supervisor(
    pool: object, fn: object = None, options: Mapping[str, object] | None = None
) -> AsyncIterator[None]:
    """Within: the supervisor is imported, and what a call of `fn` with `options` needs
    (`load_supervisor`, `needed_by`). On the default pool's
    first call, a worker is launched first and the import runs in a thread while it
    starts; the worker is ended when the call leaves without having taken it (its
    arguments were bad)."""
    ahead = pool is None and (_default is None or _default.closed)
    if ahead:
        _spawn.prestart()
    try:
        await _load(fn, options)  # cold start: after the launch
        yield
    finally:
        if ahead:
            await end_launched_ahead()


async def _load(fn: object = None, options: Mapping[str, object] | None = None) -> None:
    """Import the supervisor and what a call of `fn` with `options` needs off the
    event loop (`load_supervisor`, `needed_by`). A process's first call imports anyio
    and `ashard._backend` (10-50 ms, as anyio's backend modules load) in a thread too,
    through the running loop's own: asyncio's default executor, or trio's threads."""
    await import_in_a_thread("ashard._backend", "ashard._serialize", anyio_backend())
    from ashard._backend import load_supervisor, needed_by  # loaded (above)

    await load_supervisor(*needed_by(fn, options))


@takes_options(ShardOptions)
async def shard_map(
    shards: int | Shards | Sequence[Any],
    fn: Callable[..., Any],
    *,
    borrow: Mapping[str, Any] | None = None,
    out: Mapping[str, Any] | None = None,
    pool: Pool | None = None,
    workers: int | None = None,
    **options: Unpack[ShardOptions],
) -> ShardResult:
    """Run ``fn(shard, **borrow)`` for every shard on worker processes.

    `shards` is an item count (split by `ashard.shards`), an `ashard.Shards`, or a
    sequence (each shard's `items` is its slice). Results come back in shard order.
    A shard whose worker crashes or that runs past `timeout` is retried up to
    `max_retries` times (and one whose `fn` raised, with `retry_errors=True`). Under
    ``errors="raise"`` the first permanent failure cancels the rest and raises
    `ShardMapError`; under ``"collect"`` every shard runs and failures are listed.
    """
    async with _supervisor(pool, fn, options):
        from ashard import _calls  # loaded just now, off the loop (`_supervisor`)

        target, size = _target(pool, workers)
        job, layout = _calls.shard_job(shards, fn, borrow, out, options, ShardOptions, "shard_map")
        return await _calls.shard_result(target, job, layout, size)


@takes_options(StreamOptions)
def shard_stream(
    shards: int | Shards | Sequence[Any],
    fn: Callable[..., Any],
    *,
    borrow: Mapping[str, Any] | None = None,
    out: Mapping[str, Any] | None = None,
    pool: Pool | None = None,
    workers: int | None = None,
    **options: Unpack[StreamOptions],
) -> ShardStream:
    """Like `shard_map`, but yields an `ashard.ShardDone` per shard as it finishes::

        async with ashard.shard_stream(100, fn) as stream:
            async for done in stream:
                ...

    `ordered=True` yields in shard order. At most `max_pending` finished shards wait
    for the consumer (default 1024); a slow consumer pauses dispatch. Leaving the
    block early cancels the shards still running.
    """
    if pool is None:
        check_workers("workers", workers)
    elif _target(pool, workers)[0].closed:  # (a pool given: checked now)
        raise RuntimeError("this ashard.Pool is closed")
    check_shard_args(shards, fn, borrow, out, options, StreamOptions, "shard_stream")
    from ashard._stream import ShardStream  # imports nothing more

    async def build() -> ShardStream:
        await _load(fn, options)
        from ashard import _calls  # loaded just now, off the loop (`_load`)

        target, size = _target(pool, workers)
        job, layout = _calls.shard_job(
            shards, fn, borrow, out, options, StreamOptions, "shard_stream"
        )
        return _calls.stream(target, job, layout, size)

    return ShardStream.later(build)


@takes_options(ReduceOptions)
async def shard_reduce(
    shards: int | Shards | Sequence[Any],
    fn: Callable[..., Any],
    combine: Callable[[Any, Any], Any],
    *,
    init: Any = None,
    ordered: bool = False,
    borrow: Mapping[str, Any] | None = None,
    out: Mapping[str, Any] | None = None,
    pool: Pool | None = None,
    workers: int | None = None,
    **options: Unpack[ReduceOptions],
) -> ReduceResult:
    """Run `fn` for every shard like `shard_map`, folding the values into one with
    ``acc = combine(acc, value)`` in the caller as they arrive (with ``init=None`` the
    first value starts `acc`). ``ordered=True`` combines in shard order, so a float sum
    is bit-identical whatever the workers, chunking or retries; at most `max_pending`
    values (default 1024) ever wait uncombined. No value is kept once combined."""
    async with _supervisor(pool, fn, options):
        from ashard import _calls  # loaded just now, off the loop (`_supervisor`)

        target, size = _target(pool, workers)
        job, _ = _calls.reduce_job(shards, fn, combine, init, ordered, borrow, out, options)
        return await _calls.reduce_result(target, job, size)


@takes_options(MapOptions)
async def map(
    fn: Callable[..., Any],
    items: Iterable[Any],
    *,
    borrow: Mapping[str, Any] | None = None,
    pool: Pool | None = None,
    workers: int | None = None,
    **options: Unpack[MapOptions],
) -> list[Any]:
    """``[fn(item, **borrow) for item in items]`` on worker processes, in order.

    `items` is read lazily, a bounded amount ahead of the workers, so a huge generator
    is never materialised. Under ``errors="collect"`` a failed item's slot holds its
    `ShardError` instead of a value.
    """
    async with _supervisor(pool, fn):
        from ashard import _calls  # loaded just now, off the loop (`_supervisor`)

        target, size = _target(pool, workers)
        job = _calls.map_job(fn, items, borrow, options)
        return await _calls.map_result(target, job, size)


@takes_options(ShardOptions)
async def retry_failed(
    result: ShardResult,
    fn: Callable[..., Any] | None = None,
    *,
    only: type[BaseException] | tuple[type[BaseException], ...] | None = None,
    pool: Pool | None = None,
    **options: Unpack[ShardOptions],
) -> ShardResult:
    """Run again only the failed and skipped shards of `result` (a `shard_map`'s, or
    the ``.result`` of its `ShardMapError`), and any it never finished - with `only`
    (an exception type or tuple), only the failed and skipped ones whose error, or
    what `fn` raised, is of those types. They run with the call's shards, borrow, out,
    seed (the same ``(seed, shard.id)`` streams) and options, or the `fn` and options
    given here (not `results` / `results_path`: the rerun writes where the call wrote),
    counting attempts afresh. Returns a new `ShardResult` for the whole call: earlier
    successes kept as they were (under ``results="table"`` / ``"disk"`` their files are
    reused and the new result shares the first's directory: close one when done with
    both), the rerun shards' outcomes merged in; its `diagnostics` tell of the rerun.
    It runs on the pool the call ran on, or on `pool`."""
    await _load(fn, options)
    from ashard import _calls  # loaded just now, off the loop

    return await _calls.retry_result(result, fn, only, options, pool)


async def call(
    fn: Callable[..., Any],
    *args: Any,
    timeout: float | None = None,
    max_retries: int = 0,
    **kwargs: Any,
) -> Any:
    """``fn(*args, **kwargs)`` on a warm worker of the default pool. Raises what `fn`
    raises (with the worker's traceback as its cause), `ShardTimeout` past `timeout`,
    `WorkerCrashed` if the worker dies. With `max_retries`, a call whose worker died
    or hung runs again (for idempotent work). `timeout` and `max_retries` are ashard's
    own: pass a `functools.partial` to give `fn` arguments of those names."""
    async with _supervisor(None):
        pool = default_pool()
        return await pool.call(fn, *args, timeout=timeout, max_retries=max_retries, **kwargs)

"""The ashard API for code without an event loop: scripts, threads, sync web
frameworks, a notebook cell without ``await``::

    import ashard.sync
    res = ashard.sync.shard_map(100, fn)
    with ashard.sync.shard_stream(100, fn) as stream:
        for done in stream: ...

Name for name the async API (`shard_map`, `shard_stream`, `shard_reduce`, `map`,
`call`, `Pool`, `default_pool`, `shutdown`), blocking instead of awaitable, with a
default pool of its own. Every call runs on one event loop in a daemon thread of
ashard's (`ashard._loopthread.SHARED`), in a copy of the calling thread's context (so output and
context variables follow the caller). Ctrl-C while a call blocks cancels it there -
running shards are interrupted, queued ones dropped - and raises `KeyboardInterrupt`;
the pool stays usable.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import os
import queue
import sys
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar, Unpack

import sniffio

from ashard import _spawn
from ashard import pool as _pool
from ashard._backend import import_supervisor
from ashard._log import warn_user
from ashard._loopthread import CANCEL_WAIT_SECONDS, SHARED
from ashard._options import (
    MapOptions,
    ReduceOptions,
    ShardOptions,
    StreamOptions,
    check_shard_args,
    takes_options,
)
from ashard._stream import ShardStream as AsyncShardStream
from ashard.results import PoolStats, ReduceResult, ShardDone, ShardResult
from ashard.shards import Shards

__all__ = [
    "Pool",
    "ShardStream",
    "call",
    "default_pool",
    "map",
    "retry_failed",
    "shard_map",
    "shard_reduce",
    "shard_stream",
    "shutdown",
]

_T = TypeVar("_T")
_P = ParamSpec("_P")


_default: Pool | None = None
_default_lock = threading.Lock()


_warned_in_loop = False


def _block(coro: Coroutine[Any, Any, _T]) -> _T:
    """`coro`'s result, run on ashard's loop thread while this thread waits."""
    if not _warned_in_loop:
        SHARED.check_thread(coro)  # ashard's own loop: refused, not warned about
        _warn_in_a_running_loop()
    return SHARED.run(coro)


def _warn_in_a_running_loop() -> None:
    """Once per process: a blocking call made from async code (a running asyncio or trio
    loop in this thread) stalls that loop until it returns. Allowed, because a notebook
    cell without ``await`` is such code on purpose (no warning in IPython), but
    said, since in a web handler it is a bug."""
    global _warned_in_loop

    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return
    _warned_in_loop = True
    ipython = sys.modules.get("IPython")
    if ipython is not None and ipython.get_ipython() is not None:
        return
    warn_user(
        f"ashard.sync was called from async code (a running {library} event loop in this "
        "thread): it blocks that loop until the call returns. In async code await ashard's "
        "own functions instead: `await ashard.shard_map(...)`, `await ashard.map(...)`, "
        "`await pool.call(...)`",
        RuntimeWarning,
    )


def _forget_default() -> None:
    """In a forked child: the parent's default pool is not the child's."""
    global _default, _default_lock
    _default, _default_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_default)


def _blocking(
    method: Callable[Concatenate[_pool.Pool, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[Pool, _P], _T]:
    """`ashard.Pool`'s `method`, blocking: the same signature and docstring, run on
    the `ashard.Pool` a sync `Pool` wraps."""

    @functools.wraps(method)
    def blocking(self: Pool, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return _block(method(self._pool, *args, **kwargs))

    return blocking


def _streaming(
    method: Callable[Concatenate[_pool.Pool, _P], AsyncShardStream],
) -> Callable[Concatenate[Pool, _P], ShardStream]:
    """`ashard.Pool.shard_stream` for a ``with`` block: the arguments are checked here,
    in the calling thread; the stream runs on ashard's loop thread once entered."""

    @functools.wraps(method)
    def streaming(self: Pool, /, *args: _P.args, **kwargs: _P.kwargs) -> ShardStream:
        stream = method(self._pool, *args, **kwargs)
        return ShardStream(lambda: stream)

    streaming.__doc__ = "``with pool.shard_stream(...) as stream: for done in stream``."
    return streaming


class Pool:
    """`ashard.Pool` for sync code: ``with ashard.sync.Pool(4) as pool:``; the same
    arguments, methods and properties, blocking. Without ``with``, workers start on
    first use; call `close()` when done."""

    __module__ = "ashard.sync"

    def __init__(self, workers: int | None = None, **settings: Any) -> None:
        self._pool = _pool.Pool(workers, **settings)

    vars(__init__)["__signature__"] = inspect.signature(_pool.Pool.__init__)

    def __enter__(self) -> Pool:
        _block(self._pool.__aenter__())  # closes the pool if it fails
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Start every worker now instead of on first use."""
        _block(self._pool.start())

    def close(self) -> None:
        """Stop all workers. The pool cannot be used afterwards."""
        _block(self._pool.aclose())

    aclose = close  # the async API's name for it

    @property
    def closed(self) -> bool:
        return self._pool.closed

    @property
    def workers(self) -> int:
        return self._pool.workers

    @property
    def stats(self) -> PoolStats:
        return self._pool.stats

    @property
    def pids(self) -> list[int]:
        return self._pool.pids

    def stacks(self) -> dict[int, tuple[int | None, str | None]]:
        """`ashard.Pool.stacks`, blocking."""
        return _block(self._pool.stacks())

    def __repr__(self) -> str:
        return repr(self._pool).replace("<ashard.Pool", "<ashard.sync.Pool", 1)

    def _repr_html_(self) -> str:
        return self._pool._repr_html_()

    shard_map = _blocking(_pool.Pool.shard_map)
    shard_reduce = _blocking(_pool.Pool.shard_reduce)
    map = _blocking(_pool.Pool.map)
    call = _blocking(_pool.Pool.call)
    retry_failed = _blocking(_pool.Pool.retry_failed)

    shard_stream = _streaming(_pool.Pool.shard_stream)


class ShardStream:
    """Finished shards as they complete, for sync code::

        with ashard.sync.shard_stream(100, fn) as stream:
            for done in stream:  # ashard.ShardDone
                ...

    The async stream runs in one task on ashard's loop thread; each `next()` asks it
    for one more shard, so the stream's `max_pending` bound holds. Leaving the block
    early (a break, an exception, Ctrl-C) stops the shards still running."""

    __module__ = "ashard.sync"

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._future: concurrent.futures.Future[None] | None = None
        self._want: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._over = False

    def __enter__(self) -> ShardStream:
        if self._future is not None:
            raise RuntimeError("a ShardStream can be entered only once")
        self._future = SHARED.submit(self._pump())
        kind, value = self._take()
        if kind == "error":
            self._over = True
            raise value
        return self

    async def _pump(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._want = asyncio.Event()
        entered = False
        try:
            async with self._make() as stream:
                entered = True
                self._queue.put(("entered", None))
                while True:
                    await self._want.wait()
                    self._want.clear()
                    if self._closing:
                        break
                    try:
                        done = await stream.__anext__()
                    except StopAsyncIteration:
                        self._queue.put(("stop", None))
                        break
                    except Exception as exc:
                        self._queue.put(("error", exc))
                        break
                    self._queue.put(("item", done))
                    del done  # the consumer alone holds what it was given
        except BaseException as exc:
            if not entered or not self._closing:
                self._queue.put(("error", exc))
            if not isinstance(exc, Exception):
                raise

    def _take(self) -> tuple[str, Any]:
        return self._queue.get()

    def __iter__(self) -> Iterator[ShardDone]:
        if self._future is None:
            raise TypeError(
                "iterate a sync ShardStream inside its with: "
                "with ashard.sync.shard_stream(...) as stream: for done in stream: ..."
            )
        return self

    def __next__(self) -> ShardDone:
        if self._over:
            raise StopIteration
        assert self._loop is not None and self._want is not None
        self._loop.call_soon_threadsafe(self._want.set)
        kind, value = self._take()
        if kind == "item":
            done: ShardDone = value
            return done
        self._over = True
        if kind == "error":
            raise value
        raise StopIteration

    def __exit__(self, *exc_info: object) -> None:
        future = self._future
        if future is None:
            return
        self._closing = True
        if self._loop is not None and self._want is not None:
            self._loop.call_soon_threadsafe(self._want.set)
        try:
            future.result(CANCEL_WAIT_SECONDS)
        except (concurrent.futures.TimeoutError, KeyboardInterrupt):
            future.cancel()
            raise
        except BaseException:
            if exc_info[1] is None:  # the block's own exception goes on, not this one
                raise


@contextlib.contextmanager
def _supervised(pool: object, *, ahead: bool = True) -> Iterator[None]:
    """Within: the supervisor is imported, in this thread (`import ashard.sync` leaves it
    out). On the sync default pool's first call (`ahead`), its first worker is launched
    before the import, so that the two start side by side, as `ashard.api` does for the
    async default pool; the worker is ended if the call leaves without having taken it
    (bad arguments)."""
    launch = ahead and pool is None and (_default is None or _default.closed)
    if launch:
        _spawn.prestart()
    try:
        import_supervisor()  # cold start: after the launch
        yield
    finally:
        done = _spawn.discard() if launch else None
        if done is not None:
            done.result()


# -- the module-level API ----------------------------------------------------------------


def default_pool() -> Pool:
    """The pool the module-level functions of `ashard.sync` use, made on first use (its
    own: not the async API's default pool)."""
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            _default = Pool(keep_borrowed=False)  # a copy per call: see `Pool`
        return _default


def shutdown() -> None:
    """Stop the sync default pool's workers; a later call starts a fresh one."""
    global _default
    with _default_lock:
        pool, _default = _default, None
    if pool is not None:
        pool.close()


def _target(pool: Pool | _pool.Pool | None, workers: int | None) -> tuple[_pool.Pool, int | None]:
    """The pool a call runs on (the sync default pool), and the size `workers` asks of
    it (taken once the call is accepted, as in `ashard.api`)."""
    inner = pool._pool if isinstance(pool, Pool) else pool
    from ashard import _calls  # loaded by now (`_supervised`)

    return _calls.choose_pool(
        inner, workers, lambda: default_pool()._pool, _pool.Pool, "ashard.sync.Pool"
    )


@takes_options(ShardOptions)
def shard_map(
    shards: int | Shards | Sequence[Any],
    fn: Callable[..., Any],
    *,
    borrow: Mapping[str, Any] | None = None,
    out: Mapping[str, Any] | None = None,
    pool: Pool | None = None,
    workers: int | None = None,
    **options: Unpack[ShardOptions],
) -> ShardResult:
    """`ashard.shard_map`, blocking."""
    with _supervised(pool):
        from ashard import _calls  # loaded just now (`_supervised`)

        job, layout = _calls.shard_job(shards, fn, borrow, out, options, ShardOptions, "shard_map")
        target, size = _target(pool, workers)
        return _block(_calls.shard_result(target, job, layout, size))


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
    """`ashard.shard_stream` for a ``with`` block iterated with ``for``."""
    with _supervised(pool, ahead=False):  # the stream starts once entered
        from ashard import _calls  # loaded just now (`_supervised`)

        check_shard_args(shards, fn, borrow, out, options, StreamOptions, "shard_stream")
        target, size = _target(pool, workers)

        def start() -> AsyncShardStream:  # once entered, as `ashard.shard_stream` builds
            job, layout = _calls.shard_job(shards, fn, borrow, out, options, StreamOptions,
                                          "shard_stream")  # fmt: skip
            return _calls.stream(target, job, layout, size)

        return ShardStream(start)


@takes_options(ReduceOptions)
def shard_reduce(
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
    """`ashard.shard_reduce`, blocking."""
    with _supervised(pool):
        from ashard import _calls  # loaded just now (`_supervised`)

        job, _ = _calls.reduce_job(shards, fn, combine, init, ordered, borrow, out, options)
        target, size = _target(pool, workers)
        return _block(_calls.reduce_result(target, job, size))


@takes_options(MapOptions)
def map(
    fn: Callable[..., Any],
    items: Iterable[Any],
    *,
    borrow: Mapping[str, Any] | None = None,
    pool: Pool | None = None,
    workers: int | None = None,
    **options: Unpack[MapOptions],
) -> list[Any]:
    """`ashard.map`, blocking."""
    with _supervised(pool):
        from ashard import _calls  # loaded just now (`_supervised`)

        job = _calls.map_job(fn, items, borrow, options)
        target, size = _target(pool, workers)
        return _block(_calls.map_result(target, job, size))


@takes_options(ShardOptions)
def retry_failed(
    result: ShardResult,
    fn: Callable[..., Any] | None = None,
    *,
    only: type[BaseException] | tuple[type[BaseException], ...] | None = None,
    pool: Pool | None = None,
    **options: Unpack[ShardOptions],
) -> ShardResult:
    """`ashard.retry_failed`, blocking: the failed (and skipped) shards of `result` run
    again, on the pool the call ran on or `pool`."""
    inner = pool._pool if isinstance(pool, Pool) else pool
    with _supervised(inner, ahead=False):
        from ashard import _calls  # loaded just now (`_supervised`)

        return _block(_calls.retry_result(result, fn, only, options, inner))


def call(
    fn: Callable[..., Any],
    *args: Any,
    timeout: float | None = None,
    max_retries: int = 0,
    **kwargs: Any,
) -> Any:
    """`ashard.call`, blocking: ``fn(*args, **kwargs)`` on a warm worker."""
    with _supervised(None):
        return default_pool().call(fn, *args, timeout=timeout, max_retries=max_retries, **kwargs)


def __dir__() -> list[str]:
    return sorted(__all__)

"""`Pool`: a warm set of supervised worker processes, and its statistics."""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import anyio

from ashard import _calls
from ashard._handle import WorkerConfig, kill_all_now
from ashard._options import check_fn, check_positive_int, pickle_payload
from ashard._scheduler import Scheduler
from ashard._stream import ShardStream
from ashard.results import ShardResult
from ashard.shards import Shards

__all__ = ["Pool", "PoolStats"]

_atexit_registered = False


@dataclass(frozen=True, slots=True)
class PoolStats:
    """Counters of a pool's life so far."""

    alive: int
    started: int
    crashed: int
    timed_out: int
    recycled: int
    shards_done: int


class Pool:
    """Worker processes that start once and serve call after call.

    Use it as ``async with ashard.Pool(4) as pool:``; entering starts every worker
    (a warm pool), leaving stops them. Without ``async with``, workers start on first
    use; call `aclose()` when done. Several concurrent calls share the workers fairly.
    `init` runs once in every new worker; `env` adds environment variables for them.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        mem_cap: int | str | None = None,
        max_tasks: int | None = None,
        idle_timeout: float | None = None,
        init: Callable[[], Any] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        size = check_positive_int("workers", workers, allow_none=True) or os.cpu_count() or 1
        for name, value in (
            ("mem_cap", mem_cap),
            ("max_tasks", max_tasks),
            ("idle_timeout", idle_timeout),
        ):
            if value is not None:
                raise NotImplementedError(
                    f"{name}= is not available yet: it arrives with worker health checks"
                )
        init_payload = None
        if init is not None:
            init_payload = pickle_payload(check_fn(init, "init"), "init")
        config = WorkerConfig(env=_check_env(env), init=init_payload)
        self._scheduler = Scheduler(size, config)
        global _atexit_registered
        if not _atexit_registered:
            atexit.register(kill_all_now)
            _atexit_registered = True

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
        await self._scheduler.start_all()

    async def aclose(self) -> None:
        """Stop all workers. The pool cannot be used afterwards."""
        await self._scheduler.aclose()

    @property
    def closed(self) -> bool:
        return self._scheduler.closed

    @property
    def workers(self) -> int:
        """The pool's size: how many workers it runs at most."""
        return self._scheduler.size

    def _resize(self, workers: int) -> None:
        self._scheduler.resize(workers)

    @property
    def stats(self) -> PoolStats:
        s = self._scheduler.stats
        alive = sum(1 for w in self._scheduler.workers if w.alive)
        return PoolStats(alive, s.started, s.crashed, s.timed_out, s.recycled, s.shards_done)

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        return sorted(w.pid for w in self._scheduler.workers if w.alive)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.pids)} alive"
        return f"<ashard.Pool workers={self.workers} {state}>"

    # -- work -------------------------------------------------------------------------

    async def shard_map(
        self,
        shards: int | Shards | Sequence[Any],
        fn: Callable[..., Any],
        *,
        borrow: Mapping[str, Any] | None = None,
        out: Mapping[str, Any] | None = None,
        chunk_size: int | Literal["auto"] = "auto",
        timeout: float | None = None,
        max_retries: int = 3,
        retry_errors: bool = False,
        seed: int | None = None,
        cow: Literal["deny", "audit", "allow"] = "deny",
        errors: Literal["raise", "collect"] = "raise",
        progress: bool = False,
    ) -> ShardResult:
        """Run ``fn(shard, **borrow)`` for every shard; see `ashard.shard_map`."""
        options = dict(
            chunk_size=chunk_size, timeout=timeout, max_retries=max_retries,
            retry_errors=retry_errors, seed=seed, cow=cow, errors=errors, progress=progress,
        )  # fmt: skip
        return await _calls.shard_map(self._scheduler, shards, fn, borrow, out, options)

    def shard_stream(
        self,
        shards: int | Shards | Sequence[Any],
        fn: Callable[..., Any],
        *,
        borrow: Mapping[str, Any] | None = None,
        out: Mapping[str, Any] | None = None,
        chunk_size: int | Literal["auto"] = "auto",
        timeout: float | None = None,
        max_retries: int = 3,
        retry_errors: bool = False,
        seed: int | None = None,
        cow: Literal["deny", "audit", "allow"] = "deny",
        errors: Literal["raise", "collect"] = "raise",
        progress: bool = False,
        ordered: bool = False,
        max_pending: int | None = None,
    ) -> _StreamContext:
        """``async with pool.shard_stream(...) as stream: async for done in stream``."""
        options = dict(
            chunk_size=chunk_size, timeout=timeout, max_retries=max_retries,
            retry_errors=retry_errors, seed=seed, cow=cow, errors=errors, progress=progress,
        )  # fmt: skip
        return _StreamContext(self, shards, fn, borrow, out, options, ordered, max_pending)

    async def map(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        *,
        borrow: Mapping[str, Any] | None = None,
        chunk_size: int | Literal["auto"] = "auto",
        timeout: float | None = None,
        max_retries: int = 3,
        retry_errors: bool = False,
        seed: int | None = None,
        errors: Literal["raise", "collect"] = "raise",
        progress: bool = False,
    ) -> list[Any]:
        """``[fn(item) for item in items]`` on the workers, in order; see `ashard.map`."""
        options = dict(
            chunk_size=chunk_size, timeout=timeout, max_retries=max_retries,
            retry_errors=retry_errors, seed=seed, cow="deny", errors=errors, progress=progress,
        )  # fmt: skip
        return await _calls.map_items(self._scheduler, fn, items, borrow, options)

    async def call(
        self, fn: Callable[..., Any], *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> Any:
        """``fn(*args, **kwargs)`` on one worker; raises what `fn` raises."""
        return await _calls.call(self._scheduler, fn, args, kwargs, timeout)


class _StreamContext:
    """What `shard_stream` returns: checks arguments and starts the job on entry."""

    def __init__(self, pool: Pool, *args: Any) -> None:
        self._pool = pool
        self._args = args
        self._stream: ShardStream | None = None

    async def __aenter__(self) -> ShardStream:
        shards, fn, borrow, out, options, ordered, max_pending = self._args
        self._stream = await _calls.shard_stream(
            self._pool._scheduler, shards, fn, borrow, out, options, ordered, max_pending
        )
        return await self._stream.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._stream is not None
        return await self._stream.__aexit__(exc_type, exc, tb)


def _check_env(env: Mapping[str, str] | None) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise TypeError(f"env must be a mapping of str to str, got {type(env).__name__}")
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"env must map str to str, got {key!r}: {value!r}")
    return dict(env)

"""`Pool`: a warm set of supervised worker processes, and its statistics."""

from __future__ import annotations

import atexit
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import anyio

from ashard import _calls
from ashard._handle import WorkerConfig, kill_all_now
from ashard._health import HealthPolicy, parse_bytes
from ashard._options import check_fn, check_positive_int, pickle_payload
from ashard._scheduler import Scheduler
from ashard._stream import ShardStream
from ashard.results import ShardResult
from ashard.shards import Shards

__all__ = ["Pool", "PoolStats"]

_atexit_registered = False


@dataclass(frozen=True, slots=True)
class PoolStats:
    """Counters of a pool's life so far. `recycled` counts workers replaced on
    purpose; `recycled_by` splits it by reason: "mem_cap" (above the cap, replaced
    between shards), "mem_hard" (far above it, killed at once), "drift", "max_tasks",
    "idle" (left after `idle_timeout`)."""

    alive: int
    started: int
    crashed: int
    timed_out: int
    recycled: int
    shards_done: int
    recycled_by: Mapping[str, int] = field(default_factory=dict)


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
        recycle: bool | float = True,
        hard_cap: float = 1.5,
        health_check_interval: float = 1.0,
    ) -> None:
        size = check_positive_int("workers", workers, allow_none=True) or os.cpu_count() or 1
        policy = HealthPolicy(
            mem_cap=parse_bytes("mem_cap", mem_cap),
            hard_factor=_check_factor(hard_cap),
            drift=_check_recycle(recycle),
            interval=_check_seconds("health_check_interval", health_check_interval),
            max_tasks=check_positive_int("max_tasks", max_tasks, allow_none=True),
            idle_timeout=(
                None if idle_timeout is None else _check_seconds("idle_timeout", idle_timeout)
            ),
        )
        init_payload = None
        if init is not None:
            init_payload = pickle_payload(check_fn(init, "init"), "init")
        config = WorkerConfig(env=_check_env(env), init=init_payload)
        self._scheduler = Scheduler(size, config, policy)
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
        return PoolStats(
            alive, s.started, s.crashed, s.timed_out, s.recycled, s.shards_done,
            dict(s.recycled_by),
        )  # fmt: skip

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
        profile: Literal["default", "memory", "speed"] = "default",
    ) -> ShardResult:
        """Run ``fn(shard, **borrow)`` for every shard; see `ashard.shard_map`."""
        options = dict(
            chunk_size=chunk_size, timeout=timeout, max_retries=max_retries,
            retry_errors=retry_errors, seed=seed, cow=cow, errors=errors, progress=progress,
            profile=profile,
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
        profile: Literal["default", "memory", "speed"] = "default",
        ordered: bool = False,
        max_pending: int | None = None,
    ) -> _StreamContext:
        """``async with pool.shard_stream(...) as stream: async for done in stream``."""
        options = dict(
            chunk_size=chunk_size, timeout=timeout, max_retries=max_retries,
            retry_errors=retry_errors, seed=seed, cow=cow, errors=errors, progress=progress,
            profile=profile,
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
        profile: Literal["default", "memory", "speed"] = "default",
    ) -> list[Any]:
        """``[fn(item) for item in items]`` on the workers, in order; see `ashard.map`."""
        options = dict(
            chunk_size=chunk_size, timeout=timeout, max_retries=max_retries,
            retry_errors=retry_errors, seed=seed, cow="deny", errors=errors, progress=progress,
            profile=profile,
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


def _check_seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number of seconds, got {value!r}")
    seconds = float(value)
    if not seconds > 0 or math.isinf(seconds):
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")
    return seconds


def _check_factor(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) > 1:
        raise ValueError(
            f"hard_cap must be a factor of mem_cap above 1 (such as 1.5), got {value!r}"
        )
    return float(value)


def _check_recycle(value: object) -> float | None:
    """`recycle`: True (drift above 50 %), a growth fraction, or False (off)."""
    if value is True:
        return 0.5
    if value is False:
        return None
    if isinstance(value, numbers.Real) and float(value) > 0 and not math.isinf(value):
        return float(value)
    raise ValueError(
        f"recycle must be True, False or a positive growth fraction such as 0.5, got {value!r}"
    )

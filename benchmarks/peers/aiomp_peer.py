"""aiomultiprocess `Pool`: coroutines on worker processes (spawned interpreters)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import _bench_fns as fns
from peers._base import Peer

_ASYNC = {fns.noop: fns.anoop, fns.busy: fns.abusy, fns.sleep_or_die: fns.asleep_or_die}


def _coro(fn: Callable[..., Any]) -> Callable[..., Any]:
    """aiomultiprocess runs coroutine functions only: the async twin of `fn`."""
    return _ASYNC[fn]


class AioMultiprocessPeer(Peer):
    label = "aiomultiprocess"

    async def start(self, workers: int) -> None:
        import aiomultiprocess

        self.pool = aiomultiprocess.Pool(processes=workers)
        await self.pool.__aenter__()
        await self.map(fns.noop, list(range(4 * workers)), None)

    async def map(self, fn: Callable[..., Any], items: Sequence[Any], chunksize: int | None) -> Any:
        return await self.pool.map(_coro(fn), items)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.pool.apply(_coro(fn), args)

    async def starmap(self, fn: Callable[..., Any], argtuples: Sequence[tuple[Any, ...]]) -> Any:
        return await self.pool.starmap(_coro(fn), argtuples)

    async def close(self) -> None:
        self.pool.close()
        await self.pool.join()

"""`anyio.to_process.run_sync`: anyio's own worker processes, one call per task."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.to_process

import _bench_fns as fns
from peers._base import Peer


class AnyioToProcessPeer(Peer):
    label = "anyio.to_process.run_sync"

    async def start(self, workers: int) -> None:
        self.limiter = anyio.CapacityLimiter(workers)
        await self.map(fns.noop, list(range(4 * workers)), None)

    async def map(
        self, fn: Callable[..., Any], items: Sequence[Any], chunksize: int | None
    ) -> list[Any]:
        return await self.starmap(fn, [(x,) for x in items])

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_process.run_sync(fn, *args, limiter=self.limiter)

    async def starmap(self, fn: Callable[..., Any], argtuples: Sequence[tuple[Any, ...]]) -> Any:
        out: list[Any] = [None] * len(argtuples)

        async def one(i: int, args: tuple[Any, ...]) -> None:
            out[i] = await anyio.to_process.run_sync(fn, *args, limiter=self.limiter)

        async with anyio.create_task_group() as tg:
            for i, args in enumerate(argtuples):
                tg.start_soon(one, i, args)
        return out

    async def close(self) -> None:
        pass  # anyio stops its workers when the event loop ends

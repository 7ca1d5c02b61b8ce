"""ashard: a warm `Pool`; `map`, `call`, `shard_map` with `borrow`, `share`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import _bench_fns as fns
import ashard
from peers._base import Peer


class AshardPeer(Peer):
    label = "ashard"
    auto_chunks = True

    async def start(self, workers: int) -> None:
        self.pool = ashard.Pool(workers)
        await self.pool.start()

    async def map(
        self, fn: Callable[..., Any], items: Sequence[Any], chunksize: int | None
    ) -> list[Any]:
        return await self.pool.map(fn, items, chunk_size=chunksize or "auto")

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.pool.call(fn, *args)

    async def starmap(self, fn: Callable[..., Any], argtuples: Sequence[tuple[Any, ...]]) -> Any:
        return await self.pool.map(fns.apply, [(fn, a) for a in argtuples], chunk_size=1)

    def share(self, X: Any) -> Any:
        """The array in shared memory up front (`ashard.share`), outside the timing."""
        return ashard.share(X)

    async def broadcast(self, X: Any, tasks: int) -> list[float]:
        layout = ashard.shards(tasks, block_size=1)
        res = await self.pool.shard_map(layout, fns.stride_shard, borrow={"X": X, "tasks": tasks})
        return res.results

    async def close(self) -> None:
        await self.pool.aclose()

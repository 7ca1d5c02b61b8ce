"""Dask distributed: a `LocalCluster` of worker processes, `Client(asynchronous=True)`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import _bench_fns as fns
from peers._base import Peer


class DaskPeer(Peer):
    label = "Dask distributed (async client)"

    async def start(self, workers: int) -> None:
        from distributed import Client, LocalCluster

        self.cluster = await LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, asynchronous=True,
            dashboard_address=None,
        )  # fmt: skip
        self.client = await Client(self.cluster, asynchronous=True)
        await self.map(fns.noop, list(range(4 * workers)), None)

    async def map(self, fn: Callable[..., Any], items: Sequence[Any], chunksize: int | None) -> Any:
        return await self.client.gather(self.client.map(fn, items, pure=False))

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.client.submit(fn, *args, pure=False)

    async def starmap(self, fn: Callable[..., Any], argtuples: Sequence[tuple[Any, ...]]) -> Any:
        futures = [self.client.submit(fn, *a, pure=False) for a in argtuples]
        return await self.client.gather(futures)

    async def broadcast(self, X: Any, tasks: int) -> Any:
        ref = await self.client.scatter(X, broadcast=True)
        futures = [
            self.client.submit(fns.stride_sum, ref, k, tasks, pure=False) for k in range(tasks)
        ]
        return await self.client.gather(futures)

    async def close(self) -> None:
        await self.client.close()
        await self.cluster.close()

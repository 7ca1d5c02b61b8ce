"""`concurrent.futures.ProcessPoolExecutor`: default context (fork on Linux before
Python 3.14), forkserver (3.14's default), and driven from asyncio through
``loop.run_in_executor``."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import _bench_fns as fns
from peers._base import NotSupported, Peer, auto_chunksize


class ProcessPoolPeer(Peer):
    label = "ProcessPoolExecutor (fork)"
    context: str | None = "fork"
    fresh = False
    auto_chunks = True  # given multiprocessing.Pool's automatic chunksize

    def _make(self, workers: int, **kwargs: Any) -> ProcessPoolExecutor:
        ctx = multiprocessing.get_context(self.context) if self.context else None
        return ProcessPoolExecutor(workers, mp_context=ctx, **kwargs)

    def start(self, workers: int) -> None:
        self.workers = workers
        self.ex = self._make(workers)
        list(self.ex.map(fns.noop, range(4 * workers)))  # all workers up

    def map(self, fn: Callable[..., Any], items: Sequence[Any], chunksize: int | None) -> Any:
        return list(
            self.ex.map(fn, items, chunksize=chunksize or auto_chunksize(items, self.workers))
        )

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.ex.submit(fn, *args).result()

    def starmap(self, fn: Callable[..., Any], argtuples: Sequence[tuple[Any, ...]]) -> Any:
        return [f.result() for f in [self.ex.submit(fn, *a) for a in argtuples]]

    def broadcast(self, X: Any, tasks: int) -> list[float]:
        # The only way to hand data to every worker once: an initializer, which means
        # a new pool (workers cannot take new data later).
        with self._make(self.workers, initializer=fns.set_x, initargs=(X,)) as ex:
            return list(ex.map(fns.stride_sum_global, range(tasks), [tasks] * tasks))

    def close(self) -> None:
        self.ex.shutdown()


class ForkserverPoolPeer(ProcessPoolPeer):
    label = "ProcessPoolExecutor (forkserver)"
    context = "forkserver"
    fresh = True


class RunInExecutorPeer(Peer):
    """asyncio's own route: ``await loop.run_in_executor(ProcessPoolExecutor, fn, x)``."""

    label = "loop.run_in_executor(ProcessPoolExecutor)"

    async def start(self, workers: int) -> None:
        self.ex = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))
        await self.map(fns.noop, list(range(4 * workers)), 1)

    async def map(
        self, fn: Callable[..., Any], items: Sequence[Any], chunksize: int | None
    ) -> list[Any]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(self.ex, fn, x) for x in items)))

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.ex, fn, *args)

    async def starmap(self, fn: Callable[..., Any], argtuples: Sequence[tuple[Any, ...]]) -> Any:
        loop = asyncio.get_running_loop()
        return list(
            await asyncio.gather(*(loop.run_in_executor(self.ex, fn, *a) for a in argtuples))
        )

    def broadcast(self, X: Any, tasks: int) -> Any:
        raise NotSupported("same executor as ProcessPoolExecutor (forkserver): see that row")

    async def close(self) -> None:
        self.ex.shutdown()

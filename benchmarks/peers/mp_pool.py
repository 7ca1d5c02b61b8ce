"""`multiprocessing.Pool` (fork on Linux): `map` with its automatic chunksize, `apply`.
Its broadcast row is the fork reference: a pool forked after the array exists reads
it as an inherited global, with no copy at all."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from typing import Any

import _bench_fns as fns
from peers._base import Peer


class MpPoolPeer(Peer):
    label = "multiprocessing.Pool (fork)"
    fresh = False
    auto_chunks = True

    def start(self, workers: int) -> None:
        self.workers = workers
        self.pool = multiprocessing.get_context("fork").Pool(workers)
        self.pool.map(fns.noop, range(4 * workers), chunksize=1)

    def map(self, fn: Callable[..., Any], items: Sequence[Any], chunksize: int | None) -> Any:
        return self.pool.map(fn, items, chunksize=chunksize)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.apply(fn, args)

    def starmap(self, fn: Callable[..., Any], argtuples: Sequence[tuple[Any, ...]]) -> Any:
        return self.pool.starmap(fn, argtuples, chunksize=1)

    def broadcast(self, X: Any, tasks: int) -> list[float]:
        fns.set_x(X)  # inherited by the forked workers
        with multiprocessing.get_context("fork").Pool(self.workers) as pool:
            return pool.starmap(fns.stride_sum_global, [(k, tasks) for k in range(tasks)])

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()

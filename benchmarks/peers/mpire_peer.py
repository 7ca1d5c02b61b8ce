"""mpire `WorkerPool` (fork, kept alive between maps); `shared_objects` for the
broadcast (inherited by fork, copy-on-write)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import _bench_fns as fns
from peers._base import Peer


class MpirePeer(Peer):
    label = "mpire WorkerPool (fork)"
    fresh = False
    auto_chunks = True

    def start(self, workers: int) -> None:
        from mpire import WorkerPool

        self.workers = workers
        self.pool = WorkerPool(n_jobs=workers, keep_alive=True)
        self.pool.map(fns.noop, range(4 * workers), chunk_size=1)

    def map(self, fn: Callable[..., Any], items: Sequence[Any], chunksize: int | None) -> Any:
        return self.pool.map(fn, items, chunk_size=chunksize)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.apply(fn, args)

    def starmap(self, fn: Callable[..., Any], argtuples: Sequence[tuple[Any, ...]]) -> Any:
        return self.pool.map(fn, list(argtuples), chunk_size=1)

    def broadcast(self, X: Any, tasks: int) -> Any:
        from mpire import WorkerPool

        with WorkerPool(n_jobs=self.workers, shared_objects=X) as pool:
            return pool.map(fns.stride_sum, [(k, tasks) for k in range(tasks)], chunk_size=1)

    def close(self) -> None:
        self.pool.terminate()

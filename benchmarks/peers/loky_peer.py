"""loky: joblib's robust executor (fresh interpreters, reusable)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import _bench_fns as fns
from peers._base import Peer, auto_chunksize


class LokyPeer(Peer):
    label = "loky"
    auto_chunks = True  # given multiprocessing.Pool's automatic chunksize

    def start(self, workers: int) -> None:
        import loky

        self.workers = workers
        self.ex = loky.get_reusable_executor(max_workers=workers)
        list(self.ex.map(fns.noop, range(4 * workers)))

    def map(self, fn: Callable[..., Any], items: Sequence[Any], chunksize: int | None) -> Any:
        return list(
            self.ex.map(fn, items, chunksize=chunksize or auto_chunksize(items, self.workers))
        )

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.ex.submit(fn, *args).result()

    def starmap(self, fn: Callable[..., Any], argtuples: Sequence[tuple[Any, ...]]) -> Any:
        return [f.result() for f in [self.ex.submit(fn, *a) for a in argtuples]]

    def broadcast(self, X: Any, tasks: int) -> list[float]:
        import loky

        ex = loky.ProcessPoolExecutor(self.workers, initializer=fns.set_x, initargs=(X,))
        try:
            return list(ex.map(fns.stride_sum_global, range(tasks), [tasks] * tasks))
        finally:
            ex.shutdown()

    def close(self) -> None:
        self.ex.shutdown()

"""joblib `Parallel` (loky backend), kept open between calls; arrays over 1 MB are
memory-mapped to workers automatically."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import _bench_fns as fns
from peers._base import Peer


class JoblibPeer(Peer):
    label = "joblib Parallel"
    auto_chunks = True

    def start(self, workers: int) -> None:
        from joblib import Parallel

        self._parallel = Parallel(n_jobs=workers)
        self.parallel = self._parallel.__enter__()
        self.map(fns.noop, list(range(4 * workers)), 1)

    def map(self, fn: Callable[..., Any], items: Sequence[Any], chunksize: int | None) -> Any:
        from joblib import delayed

        self.parallel.batch_size = chunksize or "auto"
        return self.parallel(delayed(fn)(x) for x in items)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        from joblib import delayed

        return self.parallel([delayed(fn)(*args)])[0]

    def starmap(self, fn: Callable[..., Any], argtuples: Sequence[tuple[Any, ...]]) -> Any:
        from joblib import delayed

        self.parallel.batch_size = 1
        return self.parallel(delayed(fn)(*a) for a in argtuples)

    def broadcast(self, X: Any, tasks: int) -> Any:
        from joblib import delayed

        self.parallel.batch_size = 1
        return self.parallel(delayed(fns.stride_sum)(X, k, tasks) for k in range(tasks))

    def close(self) -> None:
        self._parallel.__exit__(None, None, None)

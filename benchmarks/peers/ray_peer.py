"""Ray: a local cluster (`ray.init`), remote functions, `ray.put` for shared data."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import _bench_fns as fns
from peers._base import Peer


class RayPeer(Peer):
    label = "Ray"

    def start(self, workers: int) -> None:
        import ray

        self.ray = ray
        ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR")
        self._remote: dict[Any, Any] = {}
        self.map(fns.noop, list(range(4 * workers)), None)

    def _r(self, fn: Callable[..., Any]) -> Any:
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(fn)
        return self._remote[fn]

    def map(self, fn: Callable[..., Any], items: Sequence[Any], chunksize: int | None) -> Any:
        r = self._r(fn)
        return self.ray.get([r.remote(x) for x in items])

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.ray.get(self._r(fn).remote(*args))

    def starmap(self, fn: Callable[..., Any], argtuples: Sequence[tuple[Any, ...]]) -> Any:
        r = self._r(fn)
        return self.ray.get([r.remote(*a) for a in argtuples])

    def broadcast(self, X: Any, tasks: int) -> Any:
        ref = self.ray.put(X)
        r = self._r(fns.stride_sum)
        return self.ray.get([r.remote(ref, k, tasks) for k in range(tasks)])

    def close(self) -> None:
        self.ray.shutdown()

"""broadcast: a 1 GiB float64 array read by 64 tasks (task k sums X[k::64], so every
task touches every page) - wall time and peak memory.

Wall time runs from handing the array over to having every result: sharing it is part
of the work (pool start too, for executors that only take data through an
initializer). Peak memory is the machine's memory in use (MemTotal - MemAvailable,
shared memory included), sampled every 5 ms, above what was in use before the array
was made, in multiples of the array: the original alone is 1.0. ashard also runs with
the array shared beforehand (``ashard.share``, outside the timing). Peers with no way to
share data other than pickling it for every task are marked n/a.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from workloads import Config, maybe, row_of

TITLE = "broadcast: 1 GiB array read by 64 tasks - wall time and peak memory"
COLUMNS = [("wall_s", "wall s", "{:.3f}"), ("peak_x", "peak memory / array", "{:.2f}")]
RATIO = ["wall_s"]
CHART = "wall_s"
LIMIT_S = 300.0
REPS_IN_PROCESS = False


def memory_in_use() -> int:
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            fields[key] = int(value.split()[0]) * 1024
    return fields["MemTotal"] - fields["MemAvailable"]


class PeakSampler:
    def __init__(self) -> None:
        self.base = memory_in_use()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, memory_in_use())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, memory_in_use()) - self.base


def check(results: list[float], X: np.ndarray[Any, Any], tasks: int) -> None:
    expected = [float(X[k::tasks].sum()) for k in range(tasks)]
    if not np.allclose(results, expected):
        raise AssertionError("wrong results")


async def _measure(peer: Any, cfg: Config, shared: bool) -> dict[str, Any]:
    sampler = PeakSampler()
    X = np.random.default_rng(0).random(cfg.broadcast_bytes // 8)
    given: Any = peer.share(X) if shared else X
    t0 = time.perf_counter()
    results = await maybe(peer.broadcast(given, cfg.broadcast_tasks))
    wall = time.perf_counter() - t0
    peak = sampler.stop()
    check(results, X, cfg.broadcast_tasks)
    if shared:
        given.close()
    return {"wall_s": wall, "peak_x": peak / X.nbytes}


async def run(peer: Any, cfg: Config) -> list[dict[str, Any]]:
    await maybe(peer.start(cfg.workers))
    try:
        note = "fork: workers inherit the array (reference)" if not peer.fresh else ""
        rows = [{"variant": "share", **(await _measure(peer, cfg, False)), "note": note}]
        if hasattr(peer, "share"):
            rows.append({"variant": "pre-shared", **(await _measure(peer, cfg, True))})
        return rows
    finally:
        await maybe(peer.close())


def targets(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    ours = row_of(results, "ashard", "share")
    pre = row_of(results, "ashard", "pre-shared")
    out = []
    fresh = [(r["wall_s"], p) for p, r in ((p, row_of(results, p, "share")) for p in results)
             if r is not None and p != "ashard" and not r.get("note")]  # fmt: skip
    if ours and fresh:
        best = min(fresh)
        out.append(
            f"below every fresh-interpreter peer: ashard {ours['wall_s']:.3f} s vs best "
            f"{best[1]} {best[0]:.3f} s: {'met' if ours['wall_s'] < best[0] else 'MISSED'}"
        )
    fork = row_of(results, "mp-pool", "share")
    if pre and fork:
        ratio = pre["wall_s"] / fork["wall_s"]
        out.append(
            f"pre-shared within 1.5x of the fork pool: {pre['wall_s']:.3f} s vs "
            f"{fork['wall_s']:.3f} s = {ratio:.2f}x: {'met' if ratio <= 1.5 else 'MISSED'}"
        )
    return out

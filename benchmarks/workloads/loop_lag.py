"""loop lag: a 1 ms ticker in the caller's event loop while the cpu workload runs -
how late each tick wakes (ms): p50, p99, max.

Async libraries are awaited on the loop; the others run through
``loop.run_in_executor`` (a thread), the way an async app would call them. The same
ticker first runs for 0.5 s with nothing else to do ("idle p99": this machine's floor).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from typing import Any

import _bench_fns as fns
from workloads import Config, maybe, median, p99, row_of
from workloads.cpu import calibrate

TITLE = "loop lag: 1 ms ticker in the caller's loop during the cpu workload - ms late"
COLUMNS = [("p50_ms", "p50 ms", "{:.3f}"), ("p99_ms", "p99 ms", "{:.3f}"),
           ("max_ms", "max ms", "{:.2f}"), ("idle_p99_ms", "idle p99 ms", "{:.3f}")]  # fmt: skip
RATIO = ["p99_ms"]
CHART = "p99_ms"
LIMIT_S = 180.0
REPS_IN_PROCESS = True


async def _ticks(lags: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append((time.perf_counter() - t0 - 0.001) * 1000)


async def _tick_during(work: Any) -> list[float]:
    lags: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(_ticks(lags, stop))
    try:
        await work
    finally:
        stop.set()
        await ticker
    return lags


async def run(peer: Any, cfg: Config) -> list[dict[str, Any]]:
    loops = calibrate(cfg.cpu_task_s)
    idle = await _tick_during(asyncio.sleep(0.5))
    await maybe(peer.start(cfg.workers))
    try:
        items = [loops] * cfg.cpu_tasks
        if inspect.iscoroutinefunction(peer.map):
            work = peer.map(fns.busy, items, 1)
        else:
            call = functools.partial(peer.map, fns.busy, items, 1)
            work = asyncio.get_running_loop().run_in_executor(None, call)
        lags = await _tick_during(work)
        return [{"variant": "await" if inspect.iscoroutinefunction(peer.map)
                 else "run_in_executor", "p50_ms": median(lags), "p99_ms": p99(lags),
                 "max_ms": max(lags), "idle_p99_ms": p99(idle)}]  # fmt: skip
    finally:
        await maybe(peer.close())


def targets(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    ours = row_of(results, "ashard")
    if not ours:
        return []
    ok = ours["p99_ms"] < 1.0
    return [f"p99 lag: ashard {ours['p99_ms']:.3f} ms (idle {ours['idle_p99_ms']:.3f} ms), "
            f"target < 1 ms: {'met' if ok else 'MISSED'}"]  # fmt: skip

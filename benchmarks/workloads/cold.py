"""cold start: in a fresh interpreter, from nothing to the first result of one no-op
task on 2 workers, then shutting the pool down. Importing the library is timed apart
(the case harness has already imported asyncio, anyio and numpy)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import _bench_fns as fns
from workloads import Config, maybe, row_of

TITLE = "cold start: nothing to first result on 2 workers, then shutdown - ms"
COLUMNS = [("first_ms", "first result ms", "{:.0f}"), ("shutdown_ms", "shutdown ms", "{:.0f}"),
           ("import_ms", "import ms", "{:.0f}")]  # fmt: skip
RATIO = ["first_ms", "shutdown_ms"]
CHART = "first_ms"
LIMIT_S = 120.0
REPS_IN_PROCESS = False
TAKES_FACTORY = True


async def run(make: Callable[[], Any], cfg: Config) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    peer = make()
    t1 = time.perf_counter()
    await maybe(peer.start(cfg.workers))
    if await maybe(peer.call(fns.noop, 7)) != 7:
        raise AssertionError("wrong result")
    t2 = time.perf_counter()
    await maybe(peer.close())
    t3 = time.perf_counter()
    return [{"variant": "start + call", "first_ms": (t2 - t1) * 1000,
             "shutdown_ms": (t3 - t2) * 1000, "import_ms": (t1 - t0) * 1000}]  # fmt: skip


def targets(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    ours = row_of(results, "ashard")
    if not ours:
        return []
    ok = ours["first_ms"] < 300
    return [f"cold start to first result: ashard {ours['first_ms']:.0f} ms (target < 300 ms): "
            f"{'met' if ok else 'MISSED'}"]  # fmt: skip

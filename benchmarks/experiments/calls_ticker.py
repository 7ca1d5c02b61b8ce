"""Concurrent `pool.call`s beside a 1 ms ticker: calls/s, the caller's CPU per call and
the ticker's lateness, for A/B runs of `ashard._lanes`' settings.

    T=64 DEPTH=4 python benchmarks/experiments/calls_ticker.py

T: tasks calling (default 64); DEPTH: calls outstanding per worker at most (default:
the module's). It sets a private constant: an experiment, not a benchmark of the API.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import anyio

import _bench_fns as fns
import ashard
from ashard import _lanes

if os.environ.get("DEPTH"):
    _lanes.DEPTH = int(os.environ["DEPTH"])
TASKS = int(os.environ.get("T", "64"))
CALLS = int(os.environ.get("CALLS", "10000"))


async def main() -> None:
    async with ashard.Pool(2) as pool:
        for _ in range(10):
            await pool.call(fns.noop, 1)
        late: list[float] = []

        async def caller(count: int) -> None:
            for _ in range(count):
                await pool.call(fns.noop, 1)

        async def ticker() -> None:
            last = time.perf_counter()
            while True:
                await anyio.sleep(0.001)
                now = time.perf_counter()
                late.append(now - last - 0.001)
                last = now

        c0, t0 = os.times(), time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            async with anyio.create_task_group() as callers:
                for _ in range(TASKS):
                    callers.start_soon(caller, CALLS // TASKS)
            tg.cancel_scope.cancel()
        c1, t1 = os.times(), time.perf_counter()
        cpu = c1.user - c0.user + c1.system - c0.system
        late.sort()
        print(
            f"T={TASKS} depth={_lanes.DEPTH}: {CALLS / (t1 - t0):,.0f} calls/s "
            f"{cpu / CALLS * 1e6:.0f} us/call  p50 {late[len(late) // 2] * 1e3:.2f} "
            f"p99 {late[int(len(late) * 0.99)] * 1e3:.2f} max {late[-1] * 1e3:.2f}"
        )


anyio.run(main)

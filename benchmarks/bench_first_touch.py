"""The caller's event loop while a web app first touches `ashard.Pool` (issue 21.11).

A fresh interpreter imports anyio and ashard (as an async web app's module does), runs
an asyncio loop with a 1 ms ticker, then, inside a task, does what a first request
would: ``ashard.Pool``,
``Pool(2)``, ``async with pool``, ``await pool.call(abs, -1)``. It prints the longest
ticker gap (the loop stall) and the wall time of each step. Run it several times: the
first import is what it measures, so each run is its own interpreter.

    python benchmarks/bench_first_touch.py [runs]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

CHILD = r"""
import asyncio, json, time
import anyio  # an async app has it already (starlette, httpx...)
import ashard  # at the top of the app's module, as usual

async def main():
    gaps, steps = [0.0], {}
    stop = False

    async def ticker():
        last = time.perf_counter()
        while not stop:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last - 0.001)
            last = now

    task = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.05)
    t = time.perf_counter()
    Pool = ashard.Pool  # the first touch, in the first request
    steps["touch"] = time.perf_counter() - t
    t = time.perf_counter()
    pool = Pool(2)
    steps["construct"] = time.perf_counter() - t
    await asyncio.sleep(0.005)  # the ticker notes the gap the two steps above made
    touch_gap = max(gaps)
    t = time.perf_counter()
    async with pool:
        steps["enter"] = time.perf_counter() - t
        await pool.call(abs, -1)
    stop = True
    await task
    print(json.dumps({"stall_ms": max(gaps) * 1e3, "touch_stall_ms": touch_gap * 1e3,
                      **{k: v * 1e3 for k, v in steps.items()}}))

asyncio.run(main())
"""


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 9
    rows = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                             check=True, timeout=120)  # fmt: skip
        rows.append(json.loads(out.stdout.splitlines()[-1]))
    for key in rows[0]:
        values = [r[key] for r in rows]
        print(
            f"{key:16s} median {statistics.median(values):7.1f} ms   "
            f"min {min(values):7.1f}   max {max(values):7.1f}"
        )


if __name__ == "__main__":
    main()

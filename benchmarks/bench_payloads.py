"""The caller's event loop while large values cross: how late a 1 ms ticker runs while
one call sends or receives a large argument, borrow, result or item.

One fresh interpreter runs every case on a 2-worker pool, each case `--repeat` times;
the table gives each case's lateness p99 and max (ms) over its runs, and its wall time.
A peer row (`anyio.to_process.run_sync`, which pickles on the loop) runs beside the
call cases. Values: a 200 MB `bytes`, a 200 MB uint8 array, a dict of 1M short
strings, 4 results of 50 MB, 20 items of 10 MB.

    python benchmarks/bench_payloads.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_fns as fns
import ashard

MB = 1_000_000


async def lateness(run: Callable[[], Awaitable[Any]]) -> tuple[float, list[float]]:
    """The wall time of `run()` and how late each 1 ms tick was meanwhile (seconds)."""
    late: list[float] = []
    stop = anyio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            await anyio.sleep(0.001)
            late.append(max(0.0, time.perf_counter() - t - 0.001))

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.sleep(0.05)
        late.clear()
        t0 = time.perf_counter()
        await run()
        wall = time.perf_counter() - t0
        stop.set()
    return wall, late


def cases(pool: ashard.Pool) -> dict[str, Callable[[], Awaitable[Any]]]:
    raw = b"x" * (200 * MB)
    array = np.ones(200 * MB, dtype=np.uint8)
    table = {i: str(i) for i in range(1_000_000)}
    items = [b"z" * (10 * MB)] * 20
    return {
        "call, 200 MB bytes argument": lambda: pool.call(len, raw),
        "call, 200 MB array argument": lambda: pool.call(fns.nbytes, array),
        "call, 1M-entry dict argument": lambda: pool.call(len, table),
        "call returning 200 MB bytes": lambda: pool.call(fns.make_bytes, 200 * MB),
        "call returning a 200 MB array": lambda: pool.call(fns.make_array, 200 * MB),
        "shard_map borrowing 200 MB bytes": lambda: pool.shard_map(
            4, fns.borrowed_len, borrow={"x": raw}
        ),
        "shard_map borrowing a 1M-entry dict": lambda: pool.shard_map(
            4, fns.borrowed_len, borrow={"x": table}
        ),
        "shard_map, 4 results of 50 MB bytes": lambda: pool.shard_map(
            4, fns.shard_bytes, borrow={"size": 50 * MB}
        ),
        "map over 20 items of 10 MB bytes": lambda: pool.map(len, items),
        "anyio.to_process, 200 MB bytes argument": lambda: anyio.to_process.run_sync(len, raw),
        "anyio.to_process, 200 MB array argument": lambda: anyio.to_process.run_sync(
            fns.nbytes, array
        ),
    }


async def main(repeat: int) -> None:
    print(
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.platform()}, "
        f"{platform.machine()}, Python {platform.python_version()}; 2 workers, "
        f"{repeat} runs per case.\n"
    )
    print("| case | wall s (median) | lateness p99 ms | max ms |")
    print("|---|---:|---:|---:|")
    async with ashard.Pool(2) as pool:
        await pool.call(abs, -1)
        await anyio.to_process.run_sync(abs, -1)
        for name, run in cases(pool).items():
            walls: list[float] = []
            late: list[float] = []
            for _ in range(repeat):
                wall, ticks = await lateness(run)
                walls.append(wall)
                late.extend(ticks)
            late.sort()
            p99 = late[int(0.99 * (len(late) - 1))] if late else 0.0
            wall = sorted(walls)[len(walls) // 2]
            print(f"| {name} | {wall:.3f} | {1e3 * p99:.2f} | {1e3 * max(late):.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    anyio.run(main, parser.parse_args().repeat)

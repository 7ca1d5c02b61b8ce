"""`async def` shards (issue 26): shards that each await a 10 ms sleep (an I/O stand-in)
with 1, 16 and 128 in flight per worker - ashard beside aiomultiprocess (its
``childconcurrency``) and a thread pool (``time.sleep`` in 2 x concurrency threads) -
what an async shard costs over a plain one on the tiny row, and 128 in flight made of
chunks of 16 (chunks joining on the worker's loop).

    python benchmarks/bench_async.py [--shards 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import anyio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import ashard

WORKERS = 2
NAP = 0.01


async def nap(shard: ashard.Shard) -> int:
    await asyncio.sleep(NAP)
    return shard.id


async def nap_item(x: int) -> int:
    await asyncio.sleep(NAP)
    return x


def nap_blocking(x: int) -> int:
    time.sleep(NAP)
    return x


def inc(x: int) -> int:
    return x + 1


async def ainc(x: int) -> int:
    return x + 1


async def timed(run: Callable[[], Awaitable[object]]) -> float:
    t0 = time.perf_counter()
    await run()
    return time.perf_counter() - t0


async def main(shards: int, rounds: int) -> None:
    import aiomultiprocess

    rows = []
    async with ashard.Pool(WORKERS) as pool:
        await pool.shard_map(ashard.shards(64, block_size=1), nap, shard_concurrency=32)
        for concurrency in (1, 16, 128):
            n = shards if concurrency > 1 else shards // 10  # one at a time: a tenth of them
            layout = ashard.shards(n, block_size=1)

            async def ours(layout: ashard.Shards = layout, c: int = concurrency) -> None:
                await pool.shard_map(layout, nap, shard_concurrency=c)

            async def theirs(n: int = n, c: int = concurrency) -> None:
                async with aiomultiprocess.Pool(processes=WORKERS, childconcurrency=c) as amp:
                    await amp.map(nap_item, range(n))

            async def threads(n: int = n, c: int = concurrency) -> None:
                def run() -> None:
                    with concurrent.futures.ThreadPoolExecutor(WORKERS * c) as ex:
                        list(ex.map(nap_blocking, range(n)))

                await anyio.to_thread.run_sync(run)

            got = {"ashard": [], "aiomultiprocess": [], "threads": []}  # type: dict[str, list[float]]
            for _ in range(rounds):
                got["ashard"].append(await timed(ours))
                got["aiomultiprocess"].append(await timed(theirs))
                got["threads"].append(await timed(threads))
            best = n * NAP / (WORKERS * concurrency)
            cells = " | ".join(f"{statistics.median(v):.2f}" for v in got.values())
            rows.append(f"| {concurrency} | {n:,} | {best:.2f} | {cells} |")
        small = []  # chunks of 16 with 128 in flight: the next chunks must join to fill it
        layout = ashard.shards(shards, block_size=1)
        for _ in range(rounds):
            small.append(await timed(lambda: pool.shard_map(layout, nap, shard_concurrency=128,
                                                            chunk_size=16)))  # fmt: skip
        tiny = 200_000
        plain, both = [], []
        for _ in range(rounds):
            plain.append(await timed(lambda: pool.map(inc, range(tiny))))
            both.append(await timed(lambda: pool.map(ainc, range(tiny))))
    print(f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}; {WORKERS} workers (and "
          f"processes), medians of {rounds}.\n")  # fmt: skip
    print(
        "| in flight per worker | shards | ideal s | ashard s | aiomultiprocess s | thread pool s |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(
        f"\nashard with chunk_size=16 and 128 in flight, {shards:,} shards: "
        f"{statistics.median(small):.2f} s (ideal {shards * NAP / (WORKERS * 128):.2f} s)"
    )
    p, b = statistics.median(plain) / tiny * 1e6, statistics.median(both) / tiny * 1e6
    print(
        f"\nTiny row, {tiny:,} items: plain fn {p:.3f} µs/item, async fn {b:.3f} µs/item "
        f"({b / p:.1f}x; {b - p:.2f} µs more per item)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    a = parser.parse_args()
    anyio.run(main, a.shards, a.rounds)

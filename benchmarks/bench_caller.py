"""What ashard costs the caller's process during large calls (issue 23's first table).

Each case runs alone in a fresh interpreter, started by this script. A 1 ms ticker task
runs on the caller's event loop during the call and records how late each tick is; the
caller's own CPU time (`os.times`: this process, not its workers) is read around the
call. Peers run the same work in the same way, in the same run.

Cases (2 workers each, ``--workers`` to change):

* ``map``: ``await pool.map(inc, range(N))`` (N = 2,000,000); peer: `multiprocessing.Pool.map`
  run in a thread (so the loop is free to tick).
* ``stream``: a `shard_stream` of 200,000 one-item shards, consumed as they come.
* ``borrow``: a `shard_map` of 8 shards borrowing a 400 MB array.
* ``calls``: 10,000 `pool.call`s from 64 tasks; peer: `anyio.to_process.run_sync`.
* ``bigarg``: 5 `pool.call`s one after the other, each with a 200 MB array argument;
  peer: `anyio.to_process.run_sync`.
* ``biglist``: a `shard_map` over a list of 2M short strings (the default shards, 4 per
  CPU); peer: `multiprocessing.Pool.map` over the same slices, run in a thread.
* ``bigdict``: a `shard_map` of 8 shards borrowing a dict of 1M entries (int to str).

Reported per case: loop lateness p50 / p99 / max (ms), the caller's CPU per unit of work
(µs) and the rate. Medians over ``--rounds`` interpreters.

    python benchmarks/bench_caller.py [--rounds 3] [--cases map,stream,borrow,calls]
                                      [--backend asyncio|trio|uvloop] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {here!r})
import anyio
import ashard
import _bench_fns as fns

CASE, SIDE, WORKERS, SCALE = {case!r}, {side!r}, {workers!r}, {scale!r}
KEEP = []  # results live on until the measurement is over: freeing them is the user's cost


async def measure(run):
    lateness, stop = [], anyio.Event()

    async def ticker():
        last = time.perf_counter()
        while not stop.is_set():
            await anyio.sleep(0.001)
            now = time.perf_counter()
            lateness.append(max(0.0, now - last - 0.001))
            last = now

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.sleep(0.05)
        lateness.clear()
        t0, c0 = time.perf_counter(), os.times()
        units = await run()
        c1, t1 = os.times(), time.perf_counter()
        stop.set()
    KEEP.clear()
    lateness.sort()
    n = len(lateness)
    return {{
        "p50_ms": lateness[n // 2] * 1e3 if n else 0.0,
        "p99_ms": lateness[min(n - 1, int(n * 0.99))] * 1e3 if n else 0.0,
        "max_ms": lateness[-1] * 1e3 if n else 0.0,
        "cpu_us_per_unit": ((c1.user - c0.user) + (c1.system - c0.system)) / units * 1e6,
        "rate_per_s": units / (t1 - t0),
    }}


def big_list():
    # 2M short strings, made old: the collector's young collections would walk a list
    # made just now, whoever triggers them
    import gc

    words = [f"https://example.com/item/{{i}}" for i in range(int(2_000_000 * SCALE))]
    gc.collect()
    return words


async def main():
    if SIDE == "ashard":
        async with ashard.Pool(WORKERS) as pool:
            await pool.call(abs, -1)  # warm
            await pool.map(fns.noop, range(1000))
            if CASE == "map":
                n = int(2_000_000 * SCALE)

                async def run():
                    out = await pool.map(fns.inc, range(n))
                    assert out[-1] == n
                    KEEP.append(out)
                    return n
            elif CASE == "stream":
                n = int(200_000 * SCALE)

                async def run():
                    got = 0
                    layout = ashard.shards(n, block_size=1)
                    async with pool.shard_stream(layout, fns.shard_id) as stream:
                        async for _ in stream:
                            got += 1
                    assert got == n
                    return n
            elif CASE == "borrow":
                import numpy as np

                array = np.ones(int(50_000_000 * SCALE))  # 400 MB of float64

                async def run():
                    res = await pool.shard_map(8, fns.borrowed_sum, borrow={{"x": array}})
                    assert len(res.results) == 8
                    return 8
            elif CASE == "bigarg":
                import numpy as np

                array = np.ones(int(200_000_000 * SCALE), dtype=np.uint8)

                async def run():
                    for _ in range(5):
                        assert await pool.call(fns.nbytes, array) == array.nbytes
                    return 5
            elif CASE == "bigdict":
                import gc

                table = {{i: str(i) for i in range(int(1_000_000 * SCALE))}}
                gc.collect()

                async def run():
                    res = await pool.shard_map(8, fns.borrowed_len, borrow={{"x": table}})
                    assert res.results == [len(table)] * 8
                    return 8
            elif CASE == "biglist":
                words = big_list()

                async def run():
                    res = await pool.shard_map(words, fns.items_len)
                    assert sum(res.results) == len(words)
                    return len(words)
            else:
                n = int(10_000 * SCALE)

                async def run():
                    async def caller(k):
                        for _ in range(k):
                            await pool.call(fns.noop, 1)

                    async with anyio.create_task_group() as tg:
                        for i in range(64):
                            tg.start_soon(caller, n // 64 + (i < n % 64))
                    return n
            result = await measure(run)
    else:
        if CASE == "map":
            import multiprocessing

            n = int(2_000_000 * SCALE)
            with multiprocessing.get_context("forkserver").Pool(WORKERS) as mp:
                mp.map(fns.noop, range(1000))

                async def run():
                    out = await anyio.to_thread.run_sync(mp.map, fns.inc, range(n))
                    assert out[-1] == n
                    KEEP.append(out)
                    return n

                result = await measure(run)
        elif CASE == "biglist":
            import multiprocessing

            words = big_list()
            cut = ashard.shards(len(words))
            with multiprocessing.get_context("forkserver").Pool(WORKERS) as mp:
                mp.map(fns.noop, range(10))

                async def run():
                    parts = [cut.items_of(words, k) for k in range(len(cut))]
                    out = await anyio.to_thread.run_sync(mp.map, len, parts, 1)
                    assert sum(out) == len(words)
                    return len(words)

                result = await measure(run)
        elif CASE == "bigarg":
            import numpy as np
            from anyio import to_process

            array = np.ones(int(200_000_000 * SCALE), dtype=np.uint8)
            await to_process.run_sync(fns.noop, 1)

            async def run():
                for _ in range(5):
                    assert await to_process.run_sync(fns.nbytes, array) == array.nbytes
                return 5

            result = await measure(run)
        else:  # calls
            from anyio import to_process

            n = int(10_000 * SCALE)
            limiter = anyio.CapacityLimiter(WORKERS)
            await to_process.run_sync(fns.noop, 1, limiter=limiter)

            async def run():
                async def caller(k):
                    for _ in range(k):
                        await to_process.run_sync(fns.noop, 1, limiter=limiter)

                async with anyio.create_task_group() as tg:
                    for i in range(64):
                        tg.start_soon(caller, n // 64 + (i < n % 64))
                return n

            result = await measure(run)
    print(json.dumps(result))


BACKEND = {backend!r}
if BACKEND == "uvloop":
    anyio.run(main, backend="asyncio", backend_options={{"use_uvloop": True}})
else:
    anyio.run(main, backend=BACKEND)
"""

CASES = {
    "map": ("ashard", "multiprocessing.Pool"),
    "stream": ("ashard",),
    "borrow": ("ashard",),
    "calls": ("ashard", "anyio.to_process"),
    "bigarg": ("ashard", "anyio.to_process"),
    "biglist": ("ashard", "multiprocessing.Pool"),
    "bigdict": ("ashard",),
}
UNIT = {"map": "item", "stream": "shard", "borrow": "shard", "calls": "call", "bigarg": "call",
        "biglist": "item", "bigdict": "shard"}  # fmt: skip


def run_case(case: str, side: str, workers: int, scale: float, backend: str) -> dict[str, float]:
    code = CHILD.format(here=str(HERE), case=case, side=side, workers=workers, scale=scale,
                        backend=backend)  # fmt: skip
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{case}/{side} failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio", "uvloop"])
    parser.add_argument("--quick", action="store_true", help="a tenth of the work")
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    cases = [c for c in args.cases.split(",") if c]
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for r in range(args.rounds):
        for case in cases:
            sides = CASES[case] if r % 2 == 0 else tuple(reversed(CASES[case]))
            for side in sides:
                got = run_case(case, side, args.workers, scale, args.backend)
                results.setdefault((case, side), []).append(got)
                print(f"round {r + 1} {case:7} {side:22} {json.dumps(got)}", file=sys.stderr)
    quick = " (--quick: a tenth of the work)" if args.quick else ""
    print(f"Run on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, {args.backend}; {args.workers} workers; "
          f"medians of {args.rounds} interpreters per row{quick}.")  # fmt: skip
    print()
    print("| case | who | lateness p50 ms | p99 ms | max ms | caller CPU µs per unit | rate /s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (case, side), rows in results.items():
        med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
        print(f"| {case} | {side} | {med['p50_ms']:.2f} | {med['p99_ms']:.2f} | "
              f"{med['max_ms']:.2f} | {med['cpu_us_per_unit']:.3f} per {UNIT[case]} | "
              f"{med['rate_per_s']:,.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()

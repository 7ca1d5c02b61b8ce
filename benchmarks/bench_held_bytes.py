"""What the caller holds while `ashard.map` reads a generator of large items (issue 21.1).

A generator yields `n` items of `size` bytes (made as they are read); `fn` is `len`
(fast: the workers are not the limit, so a reader without a bound runs far ahead).
Each case runs in a fresh interpreter and reports the caller's peak of traced Python
memory (`tracemalloc`: the items, their pickles, the results), the wall time and the
caller's CPU time. Run on two trees to compare (PYTHONPATH picks the tree):

    python benchmarks/bench_held_bytes.py [--n 60000] [--size 10000]
    PYTHONPATH=/path/to/other/src python benchmarks/bench_held_bytes.py --cases default
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import asyncio, json, os, sys, time, tracemalloc
import ashard

def items(n, size):
    for i in range(n):
        yield bytes([i % 256]) * size

async def main(n, size, bound):
    kw = {} if bound == "default" else {"max_held_bytes": None if bound == "none" else bound}
    async with ashard.Pool(2) as pool:
        tracemalloc.start()
        t0, c0 = time.perf_counter(), os.times()
        out = await pool.map(len, items(n, size), **kw)
        wall, c1 = time.perf_counter() - t0, os.times()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert out == [size] * n
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    print(json.dumps({"peak_mb": peak / 1e6, "wall_s": wall, "caller_cpu_s": cpu,
                      "ashard": os.path.dirname(ashard.__file__)}))

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=60_000)
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--cases", default="default,16MB,none")
    args = parser.parse_args()
    total = args.n * args.size / 1e6
    print(f"{args.n:,} items x {args.size:,} bytes = {total:,.0f} MB from a generator, fn=len, "
          "2 workers")  # fmt: skip
    print("| max_held_bytes | caller peak MB | wall s | caller CPU s |")
    print("|---|---:|---:|---:|")
    for case in args.cases.split(","):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(args.n), str(args.size), case],
            capture_output=True, text=True, check=True, timeout=600, env=dict(os.environ),
        )  # fmt: skip
        row = json.loads(out.stdout.splitlines()[-1])
        print(f"| {case} | {row['peak_mb']:.0f} | {row['wall_s']:.2f} | "
              f"{row['caller_cpu_s']:.2f} |")  # fmt: skip
    print(f"(ashard from {row['ashard']})")


if __name__ == "__main__":
    main()

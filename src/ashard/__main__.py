"""Command line: ``python -m ashard demo | info | bench``."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import anyio

import ashard
from ashard import _demo


async def _demo_run(workers: int | None, items: int) -> None:
    n = workers or os.cpu_count() or 1
    print(f"ashard demo: Monte Carlo estimate of pi on {n} worker processes")
    print(f"  {items} items x {_demo.POINTS_PER_ITEM:,} random points, seeded (seed=2026)")
    t0 = time.perf_counter()
    async with ashard.Pool(workers) as pool:
        started = time.perf_counter() - t0
        res = await pool.shard_map(
            ashard.shards(items, block_size=10), _demo.count_inside, seed=2026, progress=True
        )
        stats = pool.stats
    points = items * _demo.POINTS_PER_ITEM
    pi = 4 * sum(res.results) / points
    d = res.diagnostics
    print(f"  pi ~ {pi:.6f}  (error {abs(pi - 3.141592653589793):.2e}, {points:,} points)")
    print(f"  pool start: {started * 1000:.0f} ms for {stats.started} workers")
    print(f"  {d.summary()}")
    print("  (a chunk is one message that carries several shards to a worker)")
    print(f"  throughput: {points / d.duration / 1e6:.1f} M points/s")
    print("  workers:")
    print("\n".join("    " + line for line in d.table().splitlines()))


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("ashard", "anyio", "cloudpickle", "numpy", "psutil", "pyarrow", "trio", "tqdm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


async def _worker_start_seconds() -> float:
    t0 = time.perf_counter()
    async with ashard.Pool(1) as pool:
        await pool.call(int)
    return time.perf_counter() - t0


def _info() -> None:
    print(f"ashard {ashard.__version__}")
    print(f"python {sys.version.split()[0]} ({sys.executable})")
    print(f"platform {platform.platform()}")
    print(f"cpu count {os.cpu_count()}")
    print("start method: exec of a fresh interpreter (python -m ashard._worker), no fork")
    for name, version in _versions().items():
        print(f"  {name:12s} {version}")
    cold_ms = anyio.run(_worker_start_seconds) * 1000
    print(f"one worker, cold start to first result: {cold_ms:.0f} ms")


def _bench(argv: list[str]) -> int:
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "suite.py"
    if not script.exists():
        print(
            "the benchmark suite lives in the source checkout (benchmarks/); "
            "run this from a clone: pip install -e '.[bench]' && python -m ashard bench",
            file=sys.stderr,
        )
        return 2
    return subprocess.call([sys.executable, str(script), *argv])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ashard")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a small real workload and print diagnostics")
    demo.add_argument(
        "--workers", type=int, default=None,
        help="worker processes to start (default: the CPU count)",
    )  # fmt: skip
    demo.add_argument(
        "--items", type=int, default=2000,
        help="work items, 20,000 random points each, 10 to a shard (default: 2000)",
    )  # fmt: skip
    sub.add_parser("info", help="print versions, CPU count and start method")
    sub.add_parser(
        "bench",
        help="run the benchmark suite against the peers (extra arguments go to it)",
        add_help=False,  # `bench --help` shows the suite's own options
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        anyio.run(_demo_run, args.workers, args.items)
    elif args.command == "info":
        _info()
    else:
        return _bench(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())

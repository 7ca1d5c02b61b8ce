"""A hung shard's stack (issue 25): seconds from a shard's timeout to the caller holding
its `ShardTimeout` with the stack, for a hang in Python (the interrupt's frame) and in
code that ignores the interrupt (a faulthandler dump before the kill).

    python benchmarks/bench_stacks.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import time

import anyio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import ashard

TIMEOUT = 0.3


def python_hang(shard: ashard.Shard) -> None:
    time.sleep(60)


def c_hang(shard: ashard.Shard) -> None:
    """Deaf to the interrupt (every signal blocked but SIGKILL and the dump signal)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL, signal.SIGUSR2})
    time.sleep(60)


def deaf_hang(shard: ashard.Shard) -> None:
    """Every signal blocked: the worker cannot answer, and is killed after the wait."""
    signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL})
    time.sleep(60)


async def once(pool: ashard.Pool, fn: object) -> tuple[float, bool]:
    t0 = time.perf_counter()
    res = await pool.shard_map(1, fn, timeout=TIMEOUT, max_retries=0, errors="collect")  # type: ignore[arg-type]
    took = time.perf_counter() - t0 - TIMEOUT
    (err,) = res.failures
    return took, getattr(err, "stack", None) is not None


async def main(rounds: int) -> None:
    rows = []
    async with ashard.Pool(1) as pool:
        await pool.shard_map(1, len)
        cases = (("Python hang", python_hang), ("hang deaf to the interrupt", c_hang),
                 ("every signal blocked", deaf_hang))  # fmt: skip
        for name, fn in cases:
            runs = [await once(pool, fn) for _ in range(rounds)]
            took = statistics.median(t for t, _ in runs)
            rows.append(f"| {name} | {took:.3f} | {sum(ok for _, ok in runs)}/{rounds} |")
    print(f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}; timeout {TIMEOUT} s, "
          f"medians of {rounds}.\n")  # fmt: skip
    print("| hang | seconds past the timeout to the ShardTimeout | with a stack |")
    print("|---|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    anyio.run(main, parser.parse_args().rounds)

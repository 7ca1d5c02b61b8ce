"""Core benchmarks: ashard and its peers side by side, in one run, on 2 worker processes.

Run ``python benchmarks/bench_core.py [--quick] [--out benchmarks/results/core.json]``.

What is measured (all with 2 workers):

tiny
    ``map(noop, range(100_000))`` with each library's automatic chunking, in µs per item:
    ashard ``Pool.map`` (and the module-level ``ashard.map`` on the default pool),
    ``multiprocessing.Pool.map`` (its automatic chunksize), ``ProcessPoolExecutor.map``
    with its default chunksize=1 and with mp.Pool's chunksize, ceil(n / (4 * workers)).
chunk1
    20,000 no-op tasks, one task per message, in µs per task: ``chunk_size=1`` /
    ``chunksize=1`` maps, and pebble ``ProcessPool.schedule`` once per task.
latency
    The round trip of one no-op call on a warm pool: 2,000 sequential calls after 200
    warm-up calls, each timed alone; median and p99 in µs. Baselines: a bare round trip
    of one byte over a ``socket.socketpair()`` to a child process that echoes it, blocking
    and through asyncio (``loop.sock_sendall`` / ``loop.sock_recv``).
cpu
    40 tasks, each a pure-Python loop calibrated once in the parent to take ~50 ms; each
    task returns the CPU time it used (``time.thread_time()``). Parallel efficiency =
    sum of task CPU times / (2 x wall time): 1.0 means both workers were busy all along.
cold
    From nothing to the first result of one no-op call (the library already imported;
    import time is reported apart), then the time to shut the pool down and be back in the
    caller. A process is cold only once, so every measurement runs in a fresh interpreter
    (this script with ``--cold-child PEER``).

How: each pool is created once per workload and warmed up with a small map before timing
(except in cold start). Each measurement is repeated up to ``--reps`` times (5; cold start
``--cold-reps``, 5), stopping early once a peer has used ``--budget`` seconds, and the
median over repetitions is reported; all samples go to the JSON file. ``--quick`` shrinks
sizes ~10x and repetitions to 1 (a smoke test, not a measurement). A peer that raises or
is not installed gets its error string instead of numbers. Peers run one after another,
ashard first, so they do not compete for the CPUs with each other.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import _bench_fns as fns  # noqa: E402

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing.pool import Pool as MpPool

    import ashard

T = TypeVar("T")
Row = dict[str, Any]
"""One library's result in one workload: numbers and samples, or {"error": "..."}."""

WORKERS = 2
WARM_ITEMS = 4 * WORKERS
DEFAULT_OUT = BENCH_DIR / "results" / "core.json"
COLD_TIMEOUT_S = 120.0
ECHO_CODE = (
    "import sys; sys.path.insert(0, sys.argv[2]); "
    "from _bench_fns import echo_serve; echo_serve(int(sys.argv[1]))"
)


@dataclass(frozen=True)
class Config:
    """Sizes and repetitions of one run."""

    quick: bool = False
    reps: int = 5
    budget_s: float = 30.0
    cold_reps: int = 5
    tiny_n: int = 100_000
    chunk1_n: int = 20_000
    pebble_n: int = 20_000
    latency_calls: int = 2_000
    latency_warmup: int = 200
    cpu_tasks: int = 40
    cpu_task_s: float = 0.05

    def shrunk(self) -> Config:
        """The --quick configuration: sizes ~10x smaller, one repetition."""
        return replace(
            self, quick=True, reps=1, cold_reps=1, tiny_n=10_000, chunk1_n=2_000,
            pebble_n=2_000, latency_calls=200, latency_warmup=20, cpu_task_s=0.005,
        )  # fmt: skip


# -- small helpers ----------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def p99(values: Sequence[float]) -> float:
    """The 99th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def mp_chunksize(n: int) -> int:
    """The chunksize multiprocessing.Pool.map picks: ceil(n / (4 * workers))."""
    return math.ceil(n / (4 * WORKERS))


def check_len(result: Sequence[Any], n: int) -> None:
    if len(result) != n:
        raise RuntimeError(f"expected {n} results, got {len(result)}")


def guarded(name: str, measure: Callable[[], Row]) -> Row:
    """Run one peer's measurement; an exception becomes the row's error string."""
    log(f"  {name} ...")
    start = time.perf_counter()
    try:
        row = measure()
    except Exception as exc:
        row = {"error": error_text(exc)}
        log(f"    FAILED: {row['error']}")
    log(f"    done in {time.perf_counter() - start:.1f} s")
    return row


def repeat(measure: Callable[[], T], cfg: Config) -> list[T]:
    """Up to `cfg.reps` results of `measure()`; stops early past the time budget."""
    results: list[T] = []
    start = time.perf_counter()
    while len(results) < cfg.reps:
        results.append(measure())
        if time.perf_counter() - start > cfg.budget_s:
            break
    return results


async def arepeat(measure: Callable[[], Awaitable[T]], cfg: Config) -> list[T]:
    """`repeat` for an async measurement."""
    results: list[T] = []
    start = time.perf_counter()
    while len(results) < cfg.reps:
        results.append(await measure())
        if time.perf_counter() - start > cfg.budget_s:
            break
    return results


def timed(run: Callable[[], Sequence[Any]], n: int) -> float:
    """Seconds `run()` takes; its result must hold `n` values."""
    start = time.perf_counter()
    result = run()
    elapsed = time.perf_counter() - start
    check_len(result, n)
    return elapsed


async def atimed(run: Callable[[], Awaitable[Sequence[Any]]], n: int) -> float:
    start = time.perf_counter()
    result = await run()
    elapsed = time.perf_counter() - start
    check_len(result, n)
    return elapsed


def run_anyio(main: Callable[[], Awaitable[T]]) -> T:
    import anyio

    return anyio.run(main)


# -- pools, created and warmed up ------------------------------------------------------


@contextlib.contextmanager
def ppe_pool(context: str | None = None) -> Iterator[ProcessPoolExecutor]:
    """A warm ProcessPoolExecutor: the platform's default start method, or `context`."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context(context) if context else None
    executor = ProcessPoolExecutor(WORKERS, mp_context=ctx)
    try:
        list(executor.map(fns.noop, range(WARM_ITEMS)))
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def mp_pool() -> Iterator[MpPool]:
    import multiprocessing

    pool = multiprocessing.Pool(WORKERS)
    try:
        pool.map(fns.noop, range(WARM_ITEMS))
        yield pool
    finally:
        pool.close()
        pool.join()


@contextlib.contextmanager
def pebble_pool() -> Iterator[Any]:
    import pebble

    pool = pebble.ProcessPool(max_workers=WORKERS)
    try:
        pebble_schedule_all(pool, WARM_ITEMS)
        yield pool
    finally:
        pool.close()
        pool.join()


def pebble_schedule_all(pool: Any, n: int) -> list[Any]:
    """One `schedule` per task, then wait for every future."""
    futures = [pool.schedule(fns.noop, args=(i,)) for i in range(n)]
    return [f.result() for f in futures]


@contextlib.asynccontextmanager
async def ashard_pool() -> AsyncIterator[ashard.Pool]:
    import ashard

    async with ashard.Pool(WORKERS) as pool:
        await pool.map(fns.noop, range(WARM_ITEMS))
        yield pool


@contextlib.asynccontextmanager
async def ashard_default_pool() -> AsyncIterator[None]:
    """The module-level API's default pool, sized to WORKERS, warm; shut down after."""
    import ashard

    try:
        await ashard.map(fns.noop, range(WARM_ITEMS), workers=WORKERS)
        yield
    finally:
        await ashard.shutdown()


# -- workload: tiny ---------------------------------------------------------------------


def per_item_row(seconds: list[float], n: int) -> Row:
    samples = [s / n * 1e6 for s in seconds]
    return {"us": statistics.median(samples), "samples_us": samples, "n": n}


def tiny_ashard(cfg: Config) -> Row:
    n = cfg.tiny_n

    async def main() -> list[float]:
        async with ashard_pool() as pool:
            return await arepeat(lambda: atimed(lambda: pool.map(fns.noop, range(n)), n), cfg)

    return per_item_row(run_anyio(main), n)


def tiny_ashard_default(cfg: Config) -> Row:
    import ashard

    n = cfg.tiny_n

    async def main() -> list[float]:
        async with ashard_default_pool():
            return await arepeat(lambda: atimed(lambda: ashard.map(fns.noop, range(n)), n), cfg)

    return per_item_row(run_anyio(main), n)


def tiny_mp(cfg: Config) -> Row:
    n = cfg.tiny_n
    with mp_pool() as pool:
        seconds = repeat(lambda: timed(lambda: pool.map(fns.noop, range(n)), n), cfg)
    return per_item_row(seconds, n)


def tiny_ppe(cfg: Config, chunksize: int, context: str | None = None) -> Row:
    n = cfg.tiny_n
    with ppe_pool(context) as ex:
        run = lambda: list(ex.map(fns.noop, range(n), chunksize=chunksize))
        seconds = repeat(lambda: timed(run, n), cfg)
    return per_item_row(seconds, n)


def bench_tiny(cfg: Config) -> dict[str, Row]:
    chunk = mp_chunksize(cfg.tiny_n)
    return {
        "ashard Pool.map (auto)": guarded("ashard", lambda: tiny_ashard(cfg)),
        "ashard.map (default pool)": guarded("ashard.map", lambda: tiny_ashard_default(cfg)),
        f"multiprocessing.Pool.map (auto chunksize={chunk})": guarded(
            "mp.Pool", lambda: tiny_mp(cfg)
        ),
        "ProcessPoolExecutor.map (chunksize=1)": guarded(
            "PPE chunksize=1", lambda: tiny_ppe(cfg, 1)
        ),
        f"ProcessPoolExecutor.map (chunksize={chunk})": guarded(
            f"PPE chunksize={chunk}", lambda: tiny_ppe(cfg, chunk)
        ),
        f"ProcessPoolExecutor.map (forkserver, chunksize={chunk})": guarded(
            f"PPE forkserver chunksize={chunk}", lambda: tiny_ppe(cfg, chunk, "forkserver")
        ),
        f"pebble ProcessPool.map (chunksize={chunk})": guarded(
            "pebble", lambda: tiny_pebble(cfg, chunk)
        ),
    }


def tiny_pebble(cfg: Config, chunksize: int) -> Row:
    n = cfg.tiny_n
    with pebble_pool() as pool:
        run = lambda: list(pool.map(fns.noop, range(n), chunksize=chunksize).result())
        seconds = repeat(lambda: timed(run, n), cfg)
    return per_item_row(seconds, n)


# -- workload: chunk1 -------------------------------------------------------------------


def chunk1_ashard(cfg: Config) -> Row:
    n = cfg.chunk1_n

    async def main() -> list[float]:
        async with ashard_pool() as pool:
            run = lambda: pool.map(fns.noop, range(n), chunk_size=1)
            return await arepeat(lambda: atimed(run, n), cfg)

    return per_item_row(run_anyio(main), n)


def chunk1_mp(cfg: Config) -> Row:
    n = cfg.chunk1_n
    with mp_pool() as pool:
        run = lambda: pool.map(fns.noop, range(n), chunksize=1)
        seconds = repeat(lambda: timed(run, n), cfg)
    return per_item_row(seconds, n)


def chunk1_ppe(cfg: Config, context: str | None = None) -> Row:
    n = cfg.chunk1_n
    with ppe_pool(context) as ex:
        run = lambda: list(ex.map(fns.noop, range(n), chunksize=1))
        seconds = repeat(lambda: timed(run, n), cfg)
    return per_item_row(seconds, n)


def chunk1_pebble(cfg: Config) -> Row:
    n = cfg.pebble_n
    with pebble_pool() as pool:
        seconds = repeat(lambda: timed(lambda: pebble_schedule_all(pool, n), n), cfg)
    return per_item_row(seconds, n)


def bench_chunk1(cfg: Config) -> dict[str, Row]:
    return {
        "ashard Pool.map (chunk_size=1)": guarded("ashard", lambda: chunk1_ashard(cfg)),
        "multiprocessing.Pool.map (chunksize=1)": guarded("mp.Pool", lambda: chunk1_mp(cfg)),
        "ProcessPoolExecutor.map (chunksize=1)": guarded("PPE", lambda: chunk1_ppe(cfg)),
        "ProcessPoolExecutor.map (forkserver, chunksize=1)": guarded(
            "PPE forkserver", lambda: chunk1_ppe(cfg, "forkserver")
        ),
        "pebble ProcessPool.schedule": guarded("pebble", lambda: chunk1_pebble(cfg)),
    }


# -- workload: latency ------------------------------------------------------------------


def latency_row(runs: list[list[int]]) -> Row:
    medians = [statistics.median(r) / 1e3 for r in runs]
    p99s = [p99(r) / 1e3 for r in runs]
    return {
        "median_us": statistics.median(medians),
        "p99_us": statistics.median(p99s),
        "samples_median_us": medians,
        "samples_p99_us": p99s,
        "calls": len(runs[0]),
    }


def sample_latency(call: Callable[[], object], cfg: Config) -> list[int]:
    """Nanoseconds of each of `cfg.latency_calls` calls, after the warm-up calls."""
    for _ in range(cfg.latency_warmup):
        call()
    samples = []
    for _ in range(cfg.latency_calls):
        start = time.perf_counter_ns()
        call()
        samples.append(time.perf_counter_ns() - start)
    return samples


async def asample_latency(call: Callable[[], Awaitable[object]], cfg: Config) -> list[int]:
    for _ in range(cfg.latency_warmup):
        await call()
    samples = []
    for _ in range(cfg.latency_calls):
        start = time.perf_counter_ns()
        await call()
        samples.append(time.perf_counter_ns() - start)
    return samples


def latency_sync(call: Callable[[], object], cfg: Config) -> Row:
    return latency_row(repeat(lambda: sample_latency(call, cfg), cfg))


def latency_ashard(cfg: Config) -> Row:
    async def main() -> list[list[int]]:
        async with ashard_pool() as pool:
            return await arepeat(lambda: asample_latency(lambda: pool.call(fns.noop), cfg), cfg)

    return latency_row(run_anyio(main))


def latency_ashard_default(cfg: Config) -> Row:
    import ashard

    async def main() -> list[list[int]]:
        async with ashard_default_pool():
            return await arepeat(lambda: asample_latency(lambda: ashard.call(fns.noop), cfg), cfg)

    return latency_row(run_anyio(main))


def latency_ppe(cfg: Config, context: str | None = None) -> Row:
    with ppe_pool(context) as ex:
        return latency_sync(lambda: ex.submit(fns.noop).result(), cfg)


def latency_ppe_asyncio(cfg: Config) -> Row:
    import asyncio

    async def main(ex: ProcessPoolExecutor) -> list[list[int]]:
        loop = asyncio.get_running_loop()
        call = lambda: loop.run_in_executor(ex, fns.noop)
        return await arepeat(lambda: asample_latency(call, cfg), cfg)

    with ppe_pool() as ex:
        return latency_row(asyncio.run(main(ex)))


def latency_mp(cfg: Config) -> Row:
    with mp_pool() as pool:
        return latency_sync(lambda: pool.apply(fns.noop), cfg)


def latency_pebble(cfg: Config) -> Row:
    with pebble_pool() as pool:
        return latency_sync(lambda: pool.schedule(fns.noop).result(), cfg)


@contextlib.contextmanager
def echo_child() -> Iterator[socket.socket]:
    """One end of a socketpair whose other end is served by an echoing child process."""
    ours, theirs = socket.socketpair()
    fd = theirs.fileno()
    cmd = [sys.executable, "-c", ECHO_CODE, str(fd), str(BENCH_DIR)]
    proc = subprocess.Popen(cmd, pass_fds=(fd,), stdin=subprocess.DEVNULL)
    theirs.close()
    try:
        yield ours
    finally:
        ours.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def socket_round_trip(sock: socket.socket) -> None:
    sock.sendall(b"x")
    if not sock.recv(64):
        raise RuntimeError("echo child closed the socket")


def latency_socket(cfg: Config) -> Row:
    with echo_child() as sock:
        return latency_sync(lambda: socket_round_trip(sock), cfg)


def latency_socket_asyncio(cfg: Config) -> Row:
    import asyncio

    async def round_trip(sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"x")
        if not await loop.sock_recv(sock, 64):
            raise RuntimeError("echo child closed the socket")

    async def main(sock: socket.socket) -> list[list[int]]:
        return await arepeat(lambda: asample_latency(lambda: round_trip(sock), cfg), cfg)

    with echo_child() as sock:
        sock.setblocking(False)
        return latency_row(asyncio.run(main(sock)))


def bench_latency(cfg: Config) -> dict[str, Row]:
    return {
        "ashard await Pool.call": guarded("ashard", lambda: latency_ashard(cfg)),
        "ashard await ashard.call (default pool)": guarded(
            "ashard.call", lambda: latency_ashard_default(cfg)
        ),
        "ProcessPoolExecutor submit().result()": guarded("PPE", lambda: latency_ppe(cfg)),
        "ProcessPoolExecutor (forkserver) submit().result()": guarded(
            "PPE forkserver", lambda: latency_ppe(cfg, "forkserver")
        ),
        "asyncio run_in_executor(ProcessPoolExecutor)": guarded(
            "PPE asyncio", lambda: latency_ppe_asyncio(cfg)
        ),
        "multiprocessing.Pool.apply": guarded("mp.Pool", lambda: latency_mp(cfg)),
        "pebble schedule().result()": guarded("pebble", lambda: latency_pebble(cfg)),
        "baseline: socketpair echo (blocking)": guarded("socketpair", lambda: latency_socket(cfg)),
        "baseline: socketpair echo (asyncio)": guarded(
            "socketpair asyncio", lambda: latency_socket_asyncio(cfg)
        ),
    }


# -- workload: cpu ----------------------------------------------------------------------


def calibrate(task_s: float) -> int:
    """Loop count for which `fns.spin` takes about `task_s` seconds here, in the parent."""
    loops = 20_000
    for _ in range(3):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fns.spin(loops)
            times.append(time.perf_counter() - start)
        loops = max(1_000, round(loops * task_s / statistics.median(times)))
    return loops


def cpu_sample(run: Callable[[], Sequence[float]]) -> tuple[float, float]:
    """(wall seconds, summed task CPU seconds) of one run."""
    start = time.perf_counter()
    cpu_times = run()
    return time.perf_counter() - start, math.fsum(cpu_times)


async def acpu_sample(run: Callable[[], Awaitable[Sequence[float]]]) -> tuple[float, float]:
    start = time.perf_counter()
    cpu_times = await run()
    return time.perf_counter() - start, math.fsum(cpu_times)


def checked(cpu_times: Sequence[float], n: int) -> Sequence[float]:
    check_len(cpu_times, n)
    return cpu_times


def cpu_row(samples: list[tuple[float, float]]) -> Row:
    efficiencies = [cpu / (WORKERS * wall) for wall, cpu in samples]
    return {
        "efficiency": statistics.median(efficiencies),
        "wall_s": statistics.median(wall for wall, _ in samples),
        "cpu_s": statistics.median(cpu for _, cpu in samples),
        "samples_efficiency": efficiencies,
        "samples_wall_s": [wall for wall, _ in samples],
    }


def cpu_ashard_map(cfg: Config, loops: int) -> Row:
    n = cfg.cpu_tasks

    async def run(pool: ashard.Pool) -> Sequence[float]:
        return checked(await pool.map(fns.busy, [loops] * n), n)

    async def main() -> list[tuple[float, float]]:
        async with ashard_pool() as pool:
            return await arepeat(lambda: acpu_sample(lambda: run(pool)), cfg)

    return cpu_row(run_anyio(main))


def cpu_ashard_shard_map(cfg: Config, loops: int) -> Row:
    n = cfg.cpu_tasks

    import ashard

    async def run(pool: ashard.Pool) -> Sequence[float]:
        shards = ashard.shards(n, block_size=1)  # n shards of one task each
        result = await pool.shard_map(shards, fns.busy_shard, borrow={"loops": loops})
        return result.results

    async def main() -> list[tuple[float, float]]:
        async with ashard_pool() as pool:
            return await arepeat(lambda: acpu_sample(lambda: run(pool)), cfg)

    return cpu_row(run_anyio(main))


def cpu_ppe(cfg: Config, loops: int, context: str | None = None) -> Row:
    n = cfg.cpu_tasks
    with ppe_pool(context) as ex:
        run = lambda: checked(list(ex.map(fns.busy, [loops] * n)), n)
        return cpu_row(repeat(lambda: cpu_sample(run), cfg))


def cpu_mp(cfg: Config, loops: int) -> Row:
    n = cfg.cpu_tasks
    with mp_pool() as pool:
        run = lambda: checked(pool.map(fns.busy, [loops] * n), n)
        return cpu_row(repeat(lambda: cpu_sample(run), cfg))


def cpu_pebble(cfg: Config, loops: int) -> Row:
    n = cfg.cpu_tasks
    with pebble_pool() as pool:
        run = lambda: checked(list(pool.map(fns.busy, [loops] * n).result()), n)
        return cpu_row(repeat(lambda: cpu_sample(run), cfg))


def bench_cpu(cfg: Config) -> tuple[dict[str, Row], dict[str, Any]]:
    loops = calibrate(cfg.cpu_task_s)
    start = time.perf_counter()
    fns.busy(loops)
    params = {"loops": loops, "one_task_s_in_parent": time.perf_counter() - start}
    rows = {
        "ashard Pool.map (auto)": guarded("ashard map", lambda: cpu_ashard_map(cfg, loops)),
        "ashard Pool.shard_map (40 shards)": guarded(
            "ashard shard_map", lambda: cpu_ashard_shard_map(cfg, loops)
        ),
        "ProcessPoolExecutor.map (chunksize=1)": guarded("PPE", lambda: cpu_ppe(cfg, loops)),
        "ProcessPoolExecutor.map (forkserver, chunksize=1)": guarded(
            "PPE forkserver", lambda: cpu_ppe(cfg, loops, "forkserver")
        ),
        "pebble ProcessPool.map (chunksize=1)": guarded("pebble", lambda: cpu_pebble(cfg, loops)),
        "multiprocessing.Pool.map (auto)": guarded("mp.Pool", lambda: cpu_mp(cfg, loops)),
    }
    return rows, params


# -- workload: cold start (the parent side) ---------------------------------------------

COLD_PEERS = {
    "ashard": "ashard Pool (async with) + call",
    "ppe": "ProcessPoolExecutor (default context: {method})",
    "ppe-forkserver": "ProcessPoolExecutor (forkserver)",
    "mp-pool": "multiprocessing.Pool + apply",
    "anyio": "anyio.to_process.run_sync (lazy, 1st worker)",
    "pebble": "pebble ProcessPool + schedule",
}


def cold_once(peer: str) -> dict[str, Any]:
    """One cold start of `peer` in a fresh interpreter."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cold-child", peer]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COLD_TIMEOUT_S)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        raise RuntimeError(f"child exited with {proc.returncode}: {' | '.join(tail)}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = elapsed
    return result


def cold_row(peer: str, cfg: Config) -> Row:
    """Medians (in ms) of each time over `cfg.cold_reps` fresh interpreters."""
    samples = [cold_once(peer) for _ in range(cfg.cold_reps)]
    row: Row = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key.endswith("_s"):
            row[key[:-2] + "_ms"] = statistics.median(values) * 1e3
        row["samples_" + key] = values
    return row


def bench_cold(cfg: Config) -> dict[str, Row]:
    import multiprocessing

    method = multiprocessing.get_start_method()
    return {
        label.format(method=method): guarded(peer, lambda peer=peer: cold_row(peer, cfg))
        for peer, label in COLD_PEERS.items()
    }


# -- cold start (the child side: one fresh interpreter per measurement) -----------------


def cold_marks(t0: float, t1: float, t2: float, t3: float) -> dict[str, float]:
    """Import, first result and shutdown times from four time stamps."""
    return {"import_s": t1 - t0, "first_result_s": t2 - t1, "shutdown_s": t3 - t2}


def cold_ashard() -> dict[str, float]:
    t0 = time.perf_counter()
    import anyio

    from ashard import Pool

    stamps: list[float] = []

    async def main() -> None:
        async with Pool(WORKERS) as pool:
            await pool.call(fns.noop)
            stamps.append(time.perf_counter())

    t1 = time.perf_counter()
    anyio.run(main)
    return cold_marks(t0, t1, stamps[0], time.perf_counter())


def cold_anyio() -> dict[str, float]:
    t0 = time.perf_counter()
    import anyio
    import anyio.to_process

    stamps: list[float] = []

    async def main() -> None:
        limiter = anyio.CapacityLimiter(WORKERS)
        await anyio.to_process.run_sync(fns.noop, limiter=limiter)
        stamps.append(time.perf_counter())

    t1 = time.perf_counter()
    anyio.run(main)  # its workers are killed when the event loop ends
    return cold_marks(t0, t1, stamps[0], time.perf_counter())


def cold_ppe(context: str | None) -> dict[str, float]:
    t0 = time.perf_counter()
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    t1 = time.perf_counter()
    mp_context = multiprocessing.get_context(context) if context else None
    executor = ProcessPoolExecutor(WORKERS, mp_context=mp_context)
    executor.submit(fns.noop).result()
    t2 = time.perf_counter()
    executor.shutdown(wait=True)
    return cold_marks(t0, t1, t2, time.perf_counter())


def cold_mp() -> dict[str, float]:
    t0 = time.perf_counter()
    import multiprocessing

    t1 = time.perf_counter()
    pool = multiprocessing.Pool(WORKERS)
    pool.apply(fns.noop)
    t2 = time.perf_counter()
    pool.close()
    pool.join()
    return cold_marks(t0, t1, t2, time.perf_counter())


def cold_pebble() -> dict[str, float]:
    t0 = time.perf_counter()
    import pebble

    t1 = time.perf_counter()
    pool = pebble.ProcessPool(max_workers=WORKERS)
    pool.schedule(fns.noop).result()
    t2 = time.perf_counter()
    pool.close()
    pool.join()
    return cold_marks(t0, t1, t2, time.perf_counter())


COLD_CHILDREN: dict[str, Callable[[], dict[str, float]]] = {
    "ashard": cold_ashard,
    "ppe": lambda: cold_ppe(None),
    "ppe-forkserver": lambda: cold_ppe("forkserver"),
    "mp-pool": cold_mp,
    "anyio": cold_anyio,
    "pebble": cold_pebble,
}


def cold_child(peer: str) -> None:
    """Measure one cold start and print it as one JSON line (in a fresh interpreter)."""
    import psutil

    result: dict[str, Any] = dict(COLD_CHILDREN[peer]())
    # processes still alive after shutdown (a forkserver and its resource tracker
    # live until this interpreter exits)
    result["children_after_shutdown"] = len(psutil.Process().children(recursive=True))
    print(json.dumps(result), flush=True)


# -- environment, tables, output --------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, Any]:
    return {
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "versions": {name: package_version(name) for name in ("ashard", "anyio", "pebble")},
        "workers": WORKERS,
    }


def header(env: dict[str, Any], cfg: Config) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    mode = "QUICK smoke test (sizes /10, 1 repetition)" if cfg.quick else "full run"
    return "\n".join(
        [
            "# ashard core benchmarks",
            "",
            f"- date (UTC): {env['date_utc']}; {mode}",
            f"- platform: {env['platform']}",
            f"- CPU: {env['cpu_model']} (os.cpu_count() = {env['cpu_count']})",
            f"- Python: {env['python']}; {versions}",
            f"- workers: {WORKERS}; median of up to {cfg.reps} repetitions "
            f"({cfg.cold_reps} for cold start)",
        ]
    )


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    digits: int = 2


@dataclass(frozen=True)
class TableSpec:
    title: str
    columns: tuple[Column, ...]
    ratio_keys: tuple[str, ...]
    """Metrics divided by the reference (ashard) row's in the ratio column."""


TABLES = {
    "tiny": TableSpec(
        "tiny: map(noop, range(n)), automatic chunking",
        (Column("us", "µs per item", 3),),
        ("us",),
    ),
    "chunk1": TableSpec(
        "chunk1: one task per message",
        (Column("us", "µs per task", 1),),
        ("us",),
    ),
    "latency": TableSpec(
        "latency: round trip of one no-op call on a warm pool",
        (Column("median_us", "median µs", 1), Column("p99_us", "p99 µs", 1)),
        ("median_us", "p99_us"),
    ),
    "cpu": TableSpec(
        "cpu: 40 busy-loop tasks, parallel efficiency (shown as is; ratio is of wall time)",
        (
            Column("efficiency", "efficiency", 3),
            Column("wall_s", "wall s", 3),
            Column("cpu_s", "task CPU s", 3),
        ),
        ("wall_s",),
    ),
    "cold": TableSpec(
        "cold start: nothing to first result, then shutdown (fresh interpreter each)",
        (
            Column("first_result_ms", "first result ms", 1),
            Column("shutdown_ms", "shutdown ms", 1),
            Column("import_ms", "import ms", 1),
            Column("process_ms", "whole process ms", 1),
        ),
        ("first_result_ms", "shutdown_ms"),
    ),
}


def ratio_text(row: Row, reference: Row, keys: tuple[str, ...]) -> str:
    parts = []
    for key in keys:
        ours, theirs = row.get(key), reference.get(key)
        if isinstance(ours, float) and isinstance(theirs, float) and theirs > 0:
            parts.append(f"{ours / theirs:.2f}")
        else:
            parts.append("n/a")
    return " / ".join(parts)


def cell(row: Row, column: Column) -> str:
    value = row.get(column.key)
    return f"{value:.{column.digits}f}" if isinstance(value, float) else "—"


def markdown_table(name: str, rows: dict[str, Row]) -> str:
    spec = TABLES[name]
    reference = next(iter(rows.values()))  # the first row is ashard's
    names = {c.key: c.title for c in spec.columns}
    ratio_title = "ratio to ashard (" + " / ".join(names[k] for k in spec.ratio_keys) + ")"
    titles = ["library", *(c.title for c in spec.columns), ratio_title]
    lines = [f"## {spec.title}", "", "| " + " | ".join(titles) + " |"]
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(titles) - 1)) + "|")
    for label, row in rows.items():
        if "error" in row:
            blanks = ["—"] * (len(spec.columns) - 1)
            cells = [label, f"ERROR: {row['error']}", *blanks, "n/a"]
        else:
            values = [cell(row, c) for c in spec.columns]
            cells = [label, *values, ratio_text(row, reference, spec.ratio_keys)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


# -- cleanup ----------------------------------------------------------------------------


def shutdown_ashard() -> None:
    import anyio

    import ashard

    anyio.run(ashard.shutdown)


def leftover_children(wait_s: float = 5.0) -> list[str]:
    """Child processes still alive (after waiting up to `wait_s`); they are killed."""
    import psutil

    deadline = time.monotonic() + wait_s
    while (children := psutil.Process().children(recursive=True)) and time.monotonic() < deadline:
        time.sleep(0.05)
    found = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            found.append(f"{child.pid} {' '.join(child.cmdline())[:120]}")
            child.kill()
    return found


# -- main -------------------------------------------------------------------------------

WORKLOADS = ("tiny", "chunk1", "latency", "cpu", "cold")


def run_workload(name: str, cfg: Config) -> dict[str, Any]:
    log(f"[{name}]")
    params: dict[str, Any] = {}
    if name == "tiny":
        rows = bench_tiny(cfg)
        params = {"n": cfg.tiny_n}
    elif name == "chunk1":
        rows = bench_chunk1(cfg)
        params = {"n": cfg.chunk1_n, "pebble_n": cfg.pebble_n}
    elif name == "latency":
        rows = bench_latency(cfg)
        params = {"calls": cfg.latency_calls, "warmup": cfg.latency_warmup}
    elif name == "cpu":
        rows, params = bench_cpu(cfg)
        params |= {"tasks": cfg.cpu_tasks, "task_s": cfg.cpu_task_s}
    else:
        rows = bench_cold(cfg)
        params = {"reps": cfg.cold_reps}
    return {"title": TABLES[name].title, "params": params, "rows": rows}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes /10, 1 repetition")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--reps", type=int, help="repetitions per measurement (default 5)")
    parser.add_argument("--cold-reps", type=int, help="cold-start repetitions (default 5)")
    parser.add_argument("--budget", type=float, help="seconds per peer before fewer reps")
    parser.add_argument(
        "--only", help=f"comma-separated workloads to run, of {','.join(WORKLOADS)}"
    )
    parser.add_argument("--cold-child", choices=sorted(COLD_CHILDREN), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    cfg = Config().shrunk() if args.quick else Config()
    overrides = {"reps": args.reps, "cold_reps": args.cold_reps, "budget_s": args.budget}
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def selected_workloads(only: str | None) -> list[str]:
    if not only:
        return list(WORKLOADS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; choose from {list(WORKLOADS)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cold_child:
        cold_child(args.cold_child)
        return 0
    cfg = make_config(args)
    env = environment()
    print(header(env, cfg), flush=True)
    report: dict[str, Any] = {"environment": env, "config": asdict(cfg), "workloads": {}}
    try:
        for name in selected_workloads(args.only):
            report["workloads"][name] = run_workload(name, cfg)
            print("\n" + markdown_table(name, report["workloads"][name]["rows"]), flush=True)
            write_json(args.out, report)
    finally:
        shutdown_ashard()
        report["children_left"] = leftover_children()
        write_json(args.out, report)
    if report["children_left"]:
        print(f"\nWARNING: child processes left behind (killed): {report['children_left']}")
    print(f"\nraw results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

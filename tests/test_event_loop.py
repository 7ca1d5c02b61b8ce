"""The supervisor never stalls the caller's event loop."""

from __future__ import annotations

import subprocess
import sys
import time

import anyio
import pytest

import ashard
import workloads

pytestmark = pytest.mark.anyio


async def ticker(gaps: list[float], done: anyio.Event) -> None:
    """Tick every millisecond until `done`, recording the time between ticks."""
    last = time.perf_counter()
    while not done.is_set():
        await anyio.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


async def test_ticker_keeps_ticking_during_cpu_heavy_shard_map() -> None:
    gaps: list[float] = []
    done = anyio.Event()
    async with ashard.Pool(2) as pool, anyio.create_task_group() as tg:
        tg.start_soon(ticker, gaps, done)
        await anyio.sleep(0.05)
        res = await pool.shard_map(ashard.shards(40, block_size=1), lambda sh: workloads.busy(0.05))
        res2 = await pool.map(workloads.square, range(200_000))
        done.set()
    assert len(res.results) == 40 and res2[-1] == 199_999**2
    assert len(gaps) > 100
    assert max(gaps) < 0.05, f"event loop stalled for {max(gaps) * 1000:.1f} ms"


async def test_the_loop_keeps_ticking_while_a_fast_worker_always_has_answers() -> None:
    """Tiny tasks one per chunk: the worker's answers are always there to be read, so
    the reader never has to wait, and yields on its own (it held the loop for 150-400 ms
    at a time before it did)."""
    gaps: list[float] = []
    done = anyio.Event()
    async with ashard.Pool(2) as pool, anyio.create_task_group() as tg:
        tg.start_soon(ticker, gaps, done)
        await anyio.sleep(0.05)
        out = await pool.map(workloads.square, range(50_000), chunk_size=1)
        done.set()
    assert out == [k * k for k in range(50_000)]
    assert max(gaps) < 0.1, f"event loop stalled for {max(gaps) * 1000:.1f} ms"


def fail_on_multiples_of_7919(x: int) -> int:
    if x % 7919 == 0:
        raise ValueError(f"item {x}")
    return x + 1


async def test_the_loop_keeps_ticking_during_large_calls() -> None:
    """A 2M-item map over a range and over a list, a 200k-shard stream and a call
    borrowing a 100 MB array: every step of ashard's on the loop is short (a bound that
    catches a stall, not a benchmark: the figures are in benchmarks/RESULTS.md)."""
    import numpy as np

    n = 2_000_000
    gaps: list[float] = []
    done = anyio.Event()
    X = np.arange(100 << 20 >> 3, dtype=np.float64)
    async with ashard.Pool(2) as pool, anyio.create_task_group() as tg:
        tg.start_soon(ticker, gaps, done)
        await anyio.sleep(0.05)
        over_range = await pool.map(workloads.square, range(n))
        over_list = await pool.map(workloads.square, list(range(n)))
        seen = 0
        layout = ashard.shards(200_000, block_size=1)
        async with pool.shard_stream(layout, workloads.shard_sum) as stream:
            async for _ in stream:
                seen += 1
        for _ in range(2):  # shared, then reused after a comparison
            borrowed = await pool.shard_map(4, borrowed_total, borrow={"X": X})
        done.set()
    assert over_range == over_list == [k * k for k in range(n)]
    assert seen == 200_000
    assert borrowed.results == [float(X.sum())] * 4
    assert max(gaps) < 0.5, f"the event loop stalled for {max(gaps) * 1000:.0f} ms"


def borrowed_total(shard: ashard.Shard, X: object) -> float:
    return float(X.sum())  # type: ignore[attr-defined]


async def test_results_reported_in_pieces_keep_their_places() -> None:
    """Large chunks' results come back in several reports: values and errors land at
    their own positions, over a range and a list, with explicit and automatic chunks."""
    n = 100_000
    expected = [ValueError if k % 7919 == 0 else k + 1 for k in range(n)]
    async with ashard.Pool(2) as pool:
        for items in (range(n), list(range(n))):
            for chunk_size in (n // 2, "auto"):
                got = await pool.map(
                    fail_on_multiples_of_7919, items, chunk_size=chunk_size, errors="collect"
                )
                assert len(got) == n
                for k, (value, want) in enumerate(zip(got, expected, strict=True)):
                    if want is ValueError:
                        assert isinstance(value, ashard.ShardError), k
                        assert f"item {k}" in str(value), k
                    else:
                        assert value == want, k


def test_everything_runs_on_uvloop() -> None:
    """The same calls on uvloop's event loop (through anyio's asyncio backend)."""
    import numpy as np

    X = np.arange(2 << 20 >> 3, dtype=np.float64)

    async def main() -> None:
        import asyncio

        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        with anyio.fail_after(120):
            async with ashard.Pool(2) as pool:
                assert await pool.call(workloads.square, 7) == 49
                squares = await pool.map(workloads.square, range(100_000))
                assert squares == [k * k for k in range(100_000)]
                seen = []
                layout = ashard.shards(1000, block_size=1)
                async with pool.shard_stream(layout, workloads.shard_sum) as stream:
                    async for done in stream:
                        seen.append(done.value)
                assert sorted(seen) == list(range(1000))
                for _ in range(2):
                    res = await pool.shard_map(4, borrowed_total, borrow={"X": X})
                    assert res.results == [float(X.sum())] * 4

    anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})


_SEEN = """
import sys, threading
loop_thread = threading.get_ident()
seen, watching = [], True
def on_import(event, args):  # sys.addaudithook(on_import): imports on the loop's thread
    if event == "import" and watching and threading.get_ident() == loop_thread:
        seen.append(args[0])
"""


def run_fresh(script: str, *args: str) -> str:
    """What `script` prints, run in a fresh interpreter after `_SEEN`."""
    out = subprocess.run([sys.executable, "-c", _SEEN + script, *args],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


_IMPORTS_ON_THE_LOOP = """
import asyncio, sys, threading, ashard
import numpy as np
def ident(shard, **kwargs):
    return shard.id
def table_of(shard):
    return {"id": [shard.id]}
def fail(shard):
    raise ValueError(shard.id)
async def main():
    shards = ashard.shards(4, block_size=1)
    async with ashard.Pool(2) as pool:
        await pool.map(abs, [-1])  # the supervisor is loaded; cloudpickle is not yet
        X, buf = np.ones(1 << 18), ashard.buffer("f8", (4,))
        sys.addaudithook(on_import)
        await pool.shard_map(shards, ident, borrow={"X": X}, out={"out": buf})
        await pool.shard_map(shards, table_of, results="table")
        await pool.shard_map(shards, ident, results="disk")
        async with pool.shard_stream(shards, fail, seed=1, errors="collect") as stream:
            errors = [done.error.shard.id async for done in stream]
        print(len(errors), seen)
        buf.close()
asyncio.run(main())
"""


def test_a_calls_first_use_of_a_feature_imports_nothing_on_the_callers_loop() -> None:
    """A module a call needs (cloudpickle for functions from `__main__`, ashard's
    shared-memory and table modules) is loaded in a thread (pure-Python modules let the
    loop run between their steps) or not at all (pyarrow and numpy, whose imports hold
    the GIL for 80-100 ms: the caller never needs them for tables or seeds)."""
    assert run_fresh(_IMPORTS_ON_THE_LOOP) == "4 []"


_A_STREAM_FIRST = """
import asyncio, sys, threading, ashard
def table_of(shard):
    return {"id": [shard.id]}
lock = threading.Lock()
def holds_a_lock(shard):
    return lock is not None
async def main():
    global watching
    shards = ashard.shards(4, block_size=1)
    async with ashard.Pool(2) as pool:
        await pool.map(abs, [-1])  # the supervisor is loaded; cloudpickle and tables not
        assert "cloudpickle" not in sys.modules and "ashard.tables" not in sys.modules
        sys.addaudithook(on_import)
        stream = pool.shard_stream(shards, table_of, results="table")
        built = "cloudpickle" in sys.modules or "ashard.tables" in sys.modules
        async with stream:
            refs = [done.value async for done in stream]
            watching = False
            ids = sorted(ref.read().column("id")[0].as_py() for ref in refs)
        watching = True
        started = pool.stats.started
        refused = pool.shard_stream(shards, holds_a_lock)  # built: its fn is pickled later
        try:
            async with refused:
                pass
        except TypeError as exc:
            refusal = "fn" in str(exc)
        else:
            refusal = "nothing"
        print(built, ids, refusal, pool.stats.started == started, seen)
asyncio.run(main())
"""


def test_a_streams_first_use_of_a_feature_imports_nothing_on_the_callers_loop() -> None:
    """`shard_stream` is built in sync code, on the caller's loop: what it needs first
    (cloudpickle for a function from `__main__`, the table modules for
    ``results="table"``) is loaded in a thread once the stream is entered, and the
    function is pickled then; one that cannot be is refused by ``async with``."""
    assert run_fresh(_A_STREAM_FIRST) == "False [0, 1, 2, 3] True True []"


_A_FIRST_STREAM = """
import asyncio, sys, threading, ashard
def ident(shard):
    return shard.id
async def main():
    sys.addaudithook(on_import)
    pool = ashard.Pool(1) if sys.argv[1] == "pool" else None
    make = ashard.shard_stream if pool is None else pool.shard_stream
    try:
        make(4, ident, max_pending=0)
    except ValueError as exc:
        refused = "max_pending" in str(exc)
    else:
        refused = "nothing"
    stream = make(ashard.shards(4, block_size=1), ident)
    built = "ashard._calls" in sys.modules
    async with stream:
        ids = sorted([done.value async for done in stream])
    await (ashard.shutdown() if pool is None else pool.aclose())
    layer = ("ashard._calls", "ashard._job", "ashard._scheduler", "ashard.pool")
    print(refused, built, ids, [name for name in seen if name in layer])
asyncio.run(main())
"""


@pytest.mark.parametrize("where", ["default", "pool"])
def test_a_first_stream_checks_its_arguments_at_once_and_loads_the_call_layer_off_the_loop(
    where: str,
) -> None:
    """The first `shard_stream` of a process (on the default pool, or on a pool never
    used yet) is built before anything of the call layer is loaded: it checks its
    arguments at once, and the call layer (~50 ms of imports) loads in a thread once
    it is entered."""
    assert run_fresh(_A_FIRST_STREAM, where) == "True False [0, 1, 2, 3] []"


_A_FIRST_CALL = """
import sys, threading, ashard
def ident(shard):
    return shard.id
async def main():
    shard_map, call, shutdown = ashard.shard_map, ashard.call, ashard.shutdown
    sys.addaudithook(on_import)
    ids = (await shard_map(ashard.shards(4, block_size=1), ident)).results
    answer = await call(abs, -3)
    await shutdown()
    print(ids, answer, [name for name in seen if name.startswith(("ashard", "anyio"))])
if sys.argv[1] == "trio":
    import trio
    trio.run(main)
else:
    import asyncio
    asyncio.run(main())
"""


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_a_processes_first_call_imports_nothing_on_the_callers_loop(loop: str) -> None:
    """A process's first module-level call, in an app that has not imported anyio,
    imports anyio's backend, ashard's backend seam and the supervisor in a thread of
    the loop's own (asyncio's default executor, trio's threads): 30-70 ms of imports
    that otherwise ran in one step of the caller's loop. Only what launches the first
    worker ahead loads on the loop (`ashard._spawn`: under a millisecond, it imports
    nothing of ashard's supervisor)."""
    assert run_fresh(_A_FIRST_CALL, loop) == "[0, 1, 2, 3] 3 ['ashard._spawn', 'ashard._fds']"


_A_FIRST_TOUCH = """
import sys, threading, ashard
def ident(shard):
    return shard.id
async def main():
    sys.addaudithook(on_import)
    try:
        await ashard.map(abs, [1], chunk_size=0)  # the first name read: a stand-in
    except ValueError as exc:
        refused = "chunk_size" in str(exc)
    else:
        refused = "nothing"
    ids = (await ashard.shard_map(ashard.shards(4, block_size=1), ident)).results
    answer = await ashard.call(abs, -3)
    real = ashard.shard_map is sys.modules["ashard.api"].shard_map
    await ashard.shutdown()
    print(refused, ids, answer, real, [n for n in seen if n.startswith(("ashard", "anyio"))])
if sys.argv[1] == "trio":
    import trio
    trio.run(main)
else:
    import asyncio
    asyncio.run(main())
"""


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_a_module_level_call_first_read_on_the_loop_loads_its_module_off_the_loop(
    loop: str,
) -> None:
    """``await ashard.shard_map(...)`` (or `call`, `map`...) read first inside a coroutine,
    before `ashard.api` is loaded: the name is a stand-in that imports `ashard.api`
    (10-30 ms) in a thread of the loop's own, then runs the function itself, with its
    own refusals; once loaded, the name is the function itself."""
    launch = "['ashard._spawn', 'ashard._fds']"  # launches the first worker ahead: light
    assert run_fresh(_A_FIRST_TOUCH, loop) == f"True [0, 1, 2, 3] 3 True {launch}"

"""Several calls on one pool at once: each makes progress."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import ashard
import workloads

pytestmark = pytest.mark.anyio


async def test_two_concurrent_shard_maps_both_progress() -> None:
    finished: dict[str, float] = {}
    async with ashard.Pool(2) as pool:

        async def run(name: str, n: int, seconds: float) -> None:
            res = await pool.shard_map(
                ashard.shards(n, block_size=1), lambda sh: workloads.sleep_for(seconds)
            )
            assert len(res.results) == n
            finished[name] = time.monotonic()

        t0 = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "long", 30, 0.1)  # 1.5 s of work on 2 workers
            await anyio.sleep(0.2)
            tg.start_soon(run, "short", 4, 0.1)
    # the short job did not wait for the long one to finish
    assert finished["short"] < finished["long"]
    assert finished["short"] - t0 < 1.2


async def test_many_concurrent_calls() -> None:
    async with ashard.Pool(2) as pool:
        results: list[int] = []

        async def one(i: int) -> None:
            results.append(await pool.call(workloads.square, i))

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(one, i)
    assert sorted(results) == sorted(i * i for i in range(50))


async def test_map_and_calls_interleave() -> None:
    async with ashard.Pool(2) as pool:
        async with anyio.create_task_group() as tg:
            out: list[object] = []

            async def mapper() -> None:
                out.append(await pool.map(workloads.square, range(5000)))

            tg.start_soon(mapper)
            for _ in range(20):
                assert await pool.call(abs, -1) == 1
        assert out[0] == [i * i for i in range(5000)]


@pytest.mark.parametrize("item_bytes", [2_000, 20_000])
async def test_large_inputs_and_results_in_flight_both_ways_do_not_deadlock(
    item_bytes: int,
) -> None:
    # Chunks and results larger than a socket buffer, several in flight per worker: the
    # parent must keep reading results while it is still writing the next chunk.
    items = [bytes([i % 256]) * item_bytes for i in range(3000)]
    with anyio.fail_after(60):
        out = await ashard.map(workloads.identity, items, workers=2, chunk_size=100)
    assert out == items


async def test_a_pool_busy_on_one_threads_loop_refuses_another_threads_loop(
    tmp_path: Path,
) -> None:
    """A pool serves one event loop at a time: a call from another thread's loop while
    calls are under way is refused at once, naming why (it used to hang for good); once
    they are over, that loop may use the pool."""

    async def from_another_loop(pool: ashard.Pool) -> Any:
        return await pool.call(abs, -7)

    def in_a_thread(pool: ashard.Pool) -> Any:
        return anyio.run(from_another_loop, pool)

    with anyio.fail_after(60):
        async with ashard.Pool(2) as pool, anyio.create_task_group() as tg:
            busy = pool.shard_map(
                ashard.shards(1, block_size=1), workloads.shard_waiting_here,
                borrow={"directory": str(tmp_path)},
            )  # fmt: skip
            results: list[Any] = []

            async def run() -> None:
                results.append(await busy)

            tg.start_soon(run)
            while not (tmp_path / "started-0").exists():  # noqa: ASYNC110 (a worker writes it)
                await anyio.sleep(0.01)
            with pytest.raises(RuntimeError, match="event loop in another thread"):
                await anyio.to_thread.run_sync(in_a_thread, pool)
            (tmp_path / "release").touch()
        assert results[0].results == ["0"]
        async with ashard.Pool(1) as pool:
            await pool.call(abs, -1)
            assert await anyio.to_thread.run_sync(in_a_thread, pool) == 7

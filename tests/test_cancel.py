"""Cancelling the caller interrupts running shards, drops queued ones, propagates, and
leaves the pool usable."""

from __future__ import annotations

import functools
import time
from typing import Any

import anyio
import pytest

import ashard
import workloads

pytestmark = pytest.mark.anyio


async def _shards_then_cancel(pool: ashard.Pool, fn: object, after: float) -> float:
    """Start a long shard_map, cancel it after `after` s; seconds from cancel to return."""
    cancelled_at = 0.0
    with anyio.CancelScope() as scope:

        async def cancel_later() -> None:
            nonlocal cancelled_at
            await anyio.sleep(after)
            cancelled_at = time.monotonic()
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_later)
            await pool.shard_map(ashard.shards(200, block_size=1), fn)  # type: ignore[arg-type]
            pytest.fail("shard_map returned although it was cancelled")
    assert scope.cancelled_caught
    return time.monotonic() - cancelled_at


@pytest.mark.parametrize(
    "fn", [lambda sh: time.sleep(5), workloads.python_sleep, lambda sh: workloads.busy(5)]
)
async def test_cancelling_shard_map_stops_workers_promptly(fn: object) -> None:
    async with ashard.Pool(2) as pool:
        took = await _shards_then_cancel(pool, fn, 0.3)
        assert took < 2.0
        res = await pool.shard_map(ashard.shards(4, block_size=1), workloads.shard_sum)
        assert res.results == [0, 1, 2, 3]


async def test_cancel_kills_workers_that_do_not_yield() -> None:
    async with ashard.Pool(2) as pool:
        before = set(pool.pids)
        took = await _shards_then_cancel(pool, lambda sh: workloads.blocked_sleep(sh, sh.id), 0.3)
        assert took < 2.5
        assert not (before & set(pool.pids))  # both were killed (and replaced on demand)
        assert await pool.call(abs, -7) == 7


async def test_cancellation_propagates_as_cancellation() -> None:
    async with ashard.Pool(1) as pool:
        with anyio.move_on_after(0.3) as scope:
            await pool.map(workloads.sleep_for, [5.0, 5.0])
        assert scope.cancelled_caught
        assert await pool.map(abs, [-1, -2]) == [1, 2]


async def test_leaving_a_stream_early_cancels_the_rest() -> None:
    async with ashard.Pool(2) as pool:
        seen = []
        t0 = time.monotonic()
        async with pool.shard_stream(
            ashard.shards(100, block_size=1), lambda sh: time.sleep(0.05 if sh.id < 3 else 5)
        ) as stream:
            async for done in stream:
                seen.append(done.shard.id)
                if len(seen) == 2:
                    break
        assert time.monotonic() - t0 < 3.0
        assert len(seen) == 2
        assert (await pool.map(abs, [-5])) == [5]


async def test_cancelling_a_call() -> None:
    async with ashard.Pool(1) as pool:
        pid = pool.pids[0]
        with anyio.move_on_after(0.2):
            await pool.call(workloads.sleep_for, 10)
        assert await pool.call(abs, -1) == 1
        assert pool.pids == [pid]  # interrupted, not killed


@pytest.mark.parametrize("after", [0.3, 60.0], ids=["ends-soon", "never-ends"])
@pytest.mark.parametrize("fn", workloads.LATE_WRITERS)
async def test_a_cancelled_shards_thread_never_writes_after_the_call_returned(
    fn: Any, after: float
) -> None:
    """The caller cancels while shard 0 runs, having started a thread that writes over
    its slice of an out= buffer later: the cancellation returns only once that thread
    wrote (it ends within the cancellation's grace) or its worker is gone, so the
    buffer the caller fills afterwards keeps what the caller put there."""
    async with workloads.late_writer_setup() as (pool, pid, buf):
        async with anyio.create_task_group() as tg:
            four = ashard.shards(4, block_size=1)
            call = functools.partial(pool.shard_map, out={"out": buf})
            tg.start_soon(call, four, functools.partial(fn, after=after))
            while buf.array[0] != -2:  # noqa: ASYNC110 (shared memory: no event)
                await anyio.sleep(0.005)  # shard 0's thread is under way
            tg.cancel_scope.cancel()
        if after < 1:
            assert buf.array[0] == -1  # the thread wrote before the call returned
            assert pool.pids == [pid]  # and its worker goes on
        else:
            assert pid not in pool.pids  # it never will: its worker is gone
        buf.array[:] = 7
        if after < 1:
            await anyio.sleep(after + 0.3)  # when the thread would have written
        assert buf.array.tolist() == [7, 7, 7, 7]

"""Per-shard timeouts: stopped promptly, retried, reported; other results kept."""

from __future__ import annotations

import time

import pytest

import ashard
import workloads

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("fn", [workloads.python_sleep, workloads.blocked_sleep])
async def test_shard_past_timeout_is_stopped_retried_and_reported(fn: object) -> None:
    timeout, retries = 0.5, 1
    async with ashard.Pool(2) as pool:
        t0 = time.monotonic()
        res = await pool.shard_map(
            ashard.shards(6, block_size=1),
            fn,  # type: ignore[arg-type]
            timeout=timeout,
            max_retries=retries,
            errors="collect",
        )
        took = time.monotonic() - t0
        assert [f.shard_id for f in res.failures] == [1]
        err = res.failures[0]
        assert isinstance(err, ashard.ShardTimeout)
        assert isinstance(err, TimeoutError)
        assert err.attempts == retries + 1
        assert res.results == [0, None, 2, 3, 4, 5]
        # each attempt is stopped within timeout + 1 s
        assert took < (retries + 1) * (timeout + 1.0) + 1.0
        assert res.diagnostics.timeouts == retries + 1
        assert await pool.call(abs, -3) == 3


async def test_signal_ignoring_shard_gets_its_worker_killed() -> None:
    async with ashard.Pool(2) as pool:
        before = set(pool.pids)
        res = await pool.shard_map(
            ashard.shards(3, block_size=1),
            workloads.blocked_sleep,
            timeout=0.3,
            max_retries=0,
            errors="collect",
        )
        assert isinstance(res.failures[0], ashard.ShardTimeout)
        assert pool.stats.timed_out == 1
        assert len(before - set(pool.pids)) <= 1


async def test_timeout_then_success_on_retry() -> None:
    def slow_first(shard: ashard.Shard) -> int:
        if shard.attempt == 1:
            time.sleep(30)
        return shard.attempt

    res = await ashard.shard_map(ashard.shards(2, block_size=1), slow_first, timeout=0.3, workers=2)
    assert res.results == [2, 2]


async def test_call_timeout() -> None:
    t0 = time.monotonic()
    with pytest.raises(ashard.ShardTimeout):
        await ashard.call(workloads.sleep_for, 30, timeout=0.3)
    assert time.monotonic() - t0 < 1.3
    assert await ashard.call(abs, -2) == 2

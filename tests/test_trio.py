"""The core runs under trio as under asyncio (anyio all the way down)."""

from __future__ import annotations

import os

import pytest

import ashard
import workloads

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_shard_map_under_each_backend(anyio_backend: str) -> None:
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(ashard.shards(20, block_size=2), workloads.shard_sum)
        assert sum(res.results) == sum(range(20))
        assert await pool.map(workloads.square, range(100)) == [i * i for i in range(100)]
        assert await pool.call(os.getpid) in pool.pids


async def test_crash_recovery_and_stream_under_each_backend(anyio_backend: str) -> None:
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(ashard.shards(6, block_size=1), workloads.die_first_attempt)
        assert res.results == [i * 10 for i in range(6)]
        async with pool.shard_stream(ashard.shards(5, block_size=1), workloads.shard_sum) as s:
            assert sorted([d.value async for d in s]) == [0, 1, 2, 3, 4]

"""The supervisor never stalls the caller's event loop."""

from __future__ import annotations

import time

import anyio
import pytest

import ashard
import workloads

pytestmark = pytest.mark.anyio


async def test_ticker_keeps_ticking_during_cpu_heavy_shard_map() -> None:
    gaps: list[float] = []
    done = anyio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await anyio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with ashard.Pool(2) as pool, anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.sleep(0.05)
        res = await pool.shard_map(ashard.shards(40, block_size=1), lambda sh: workloads.busy(0.05))
        res2 = await pool.map(workloads.square, range(200_000))
        done.set()
    assert len(res.results) == 40 and res2[-1] == 199_999**2
    assert len(gaps) > 100
    assert max(gaps) < 0.05, f"event loop stalled for {max(gaps) * 1000:.1f} ms"

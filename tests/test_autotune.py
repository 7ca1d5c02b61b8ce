"""Automatic chunk sizes, as `Diagnostics.autotune` shows them (DESIGN 2.5): they start,
grow with cheap work, leave a tail for every worker, and shrink as a worker's memory
nears `mem_cap`, before the hard limit would stop it."""

from __future__ import annotations

import anyio
import pytest

import ashard
from workloads import leak_mib, square

pytestmark = pytest.mark.anyio


async def test_autotune_rows_show_the_sizes_chosen_and_why() -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(2) as pool:
            out = await pool.map(square, range(200_000))
            res = await pool.shard_map(ashard.shards(50_000, block_size=1), len)
    assert out[:3] == [0, 1, 4] and len(out) == 200_000
    rows = res.diagnostics.autotune
    assert rows[0][2] == "start" and rows[0][1] == 1
    assert any(why == "grow" for _, _, why in rows)
    assert rows[-1][2] == "tail"  # near the end: work left for both workers
    times = [t for t, _, _ in rows]
    assert times == sorted(times) and all(size >= 1 for _, size, _ in rows)


async def test_a_fixed_chunk_size_has_no_autotune_rows() -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(1) as pool:
            res = await pool.shard_map(ashard.shards(20, block_size=1), len, chunk_size=4)
    assert res.diagnostics.autotune == ()


async def test_chunks_shrink_as_memory_nears_mem_cap_before_any_hard_limit_kill() -> None:
    with anyio.fail_after(90):
        async with ashard.Pool(
            1, mem_cap="300MB", hard_cap=1.5, recycle=False, health_check_interval=0.05
        ) as pool:
            res = await pool.shard_map(
                ashard.shards(600, block_size=1), lambda shard: leak_mib(shard.id)
            )
            stats = pool.stats
    assert res.ok and res.results == list(range(600))
    reasons = [why for _, _, why in res.diagnostics.autotune]
    assert "shrink_mem" in reasons
    assert "mem_hard" not in stats.recycled_by and stats.crashed == 0
    assert res.diagnostics.retries == 0

"""`seed=`: per-shard streams that depend on (seed, shard id) only."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ashard
import workloads

pytestmark = pytest.mark.anyio

SHARDS = ashard.shards(12, block_size=1)


async def _draws(workers: int, chunk_size: int | str, fn: object = workloads.random_draws) -> list:
    async with ashard.Pool(workers) as pool:
        res = await pool.shard_map(SHARDS, fn, seed=42, chunk_size=chunk_size)  # type: ignore[arg-type]
    return res.results


async def test_same_seed_same_results_whatever_the_workers_and_chunking() -> None:
    reference = await _draws(1, 1)
    assert await _draws(2, "auto") == reference
    assert await _draws(2, 1) == reference
    assert await _draws(1, 5) == reference


async def test_results_survive_a_forced_retry() -> None:
    reference = await _draws(2, 1)
    assert await _draws(2, "auto", workloads.random_draws_crash_once) == reference


async def test_different_seeds_and_shards_differ() -> None:
    a = await _draws(2, "auto")
    async with ashard.Pool(2) as pool:
        b = (await pool.shard_map(SHARDS, workloads.random_draws, seed=7)).results
    assert a != b
    assert len({tuple(r[0]) for r in a}) == len(a)  # every shard its own stream


async def test_map_seed_is_per_item() -> None:
    import random

    out1 = await ashard.map(lambda x: random.random(), range(20), seed=3, workers=2)
    out2 = await ashard.map(lambda x: random.random(), range(20), seed=3, workers=1, chunk_size=7)
    assert out1 == out2 and len(set(out1)) == 20


async def test_no_seed_means_a_fresh_generator_per_shard() -> None:
    """v2 contract: `shard.rng` is always a Generator (fresh entropy without `seed`)."""
    layout = ashard.shards(4, block_size=1)
    one = await ashard.shard_map(layout, lambda sh: sh.rng.random(), workers=1)
    two = await ashard.shard_map(layout, lambda sh: sh.rng.random(), workers=1)
    assert len(set(one.results) | set(two.results)) == 8


_LAZY_RNG = """
import asyncio, sys, ashard
def first_draw(shard):
    if shard.id == 2:
        raise ValueError(shard.id)
    return float(shard.rng.random())
async def main():
    async with ashard.Pool(2) as pool:
        shards = ashard.shards(6, block_size=1)
        async with pool.shard_stream(shards, first_draw, seed=11, errors="collect") as stream:
            done = sorted([d async for d in stream], key=lambda d: d.shard.id)
        imported = "numpy" in sys.modules
        same = [d.shard.rng.random() == d.value for d in done if d.error is None]
        print(imported, all(same), len(same), done[2].error.shard.rng.random() > 0)
asyncio.run(main())
"""


def test_a_shards_rng_is_made_when_used_and_is_the_one_its_run_drew_from() -> None:
    """The caller's copy of a seeded shard (in a `ShardDone`, a `ShardError`) makes its
    generator only when asked: numpy is not imported on the caller's loop for it (a
    tenth of a second, once), nor 20 us spent per shard. Asked, it starts where the
    worker's did."""
    out = subprocess.run([sys.executable, "-c", _LAZY_RNG],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "5", "True"]

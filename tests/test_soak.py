"""Memory stays bounded however much runs: a stream keeps per-shard state only while a
shard is in flight or waiting for its consumer, and `map` holds little beyond its
result list. Peak RSS of the parent is sampled by a thread every 10 ms."""

from __future__ import annotations

import gc
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import psutil
import pytest

import ashard

pytestmark = pytest.mark.anyio

MiB = 1 << 20


class PeakRSS:
    """The parent's peak resident memory while the `with` block runs, over its start."""

    def __init__(self) -> None:
        self.base = self.peak = 0

    @property
    def growth(self) -> int:
        return self.peak - self.base


@asynccontextmanager
async def peak_rss() -> AsyncIterator[PeakRSS]:
    gc.collect()
    proc = await anyio.to_thread.run_sync(psutil.Process)
    reading = PeakRSS()
    reading.base = reading.peak = await anyio.to_thread.run_sync(lambda: proc.memory_info().rss)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            reading.peak = max(reading.peak, proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield reading
    finally:
        stop.set()
        await anyio.to_thread.run_sync(sampler.join)


def shard_id(shard: ashard.Shard) -> int:
    return shard.id * 1000  # not a cached small int: each result is a new object


def kilobyte(shard: ashard.Shard) -> bytes:
    return bytes(1024)


@pytest.mark.parametrize(("n", "ordered", "fn"), [(200_000, False, shard_id),
                                                   (50_000, True, kilobyte)])  # fmt: skip
async def test_a_stream_keeps_memory_flat_however_many_shards(
    n: int, ordered: bool, fn: object
) -> None:
    seen = 0
    with anyio.fail_after(60):
        async with ashard.Pool(2) as pool:
            await pool.map(abs, range(10_000))  # warm: buffers, caches
            async with (
                peak_rss() as rss,
                pool.shard_stream(
                    ashard.shards(n, block_size=1),
                    fn,
                    ordered=ordered,  # type: ignore[arg-type]
                ) as stream,
            ):
                async for _ in stream:
                    seen += 1
    assert seen == n
    assert rss.growth < 50 * MiB, f"parent grew by {rss.growth / MiB:.0f} MiB"


async def test_map_of_a_million_items_holds_little_beyond_its_results() -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(2) as pool:
            await pool.map(abs, range(10_000))
            async with peak_rss() as rss:
                out = await pool.map(abs, range(-1_000_000, 0))
    assert out[0] == 1_000_000 and out[-1] == 1 and len(out) == 1_000_000
    results = sys.getsizeof(out) + 1_000_000 * sys.getsizeof(1_000_000)
    beyond = rss.growth - results
    assert beyond < 100 * MiB, f"{beyond / MiB:.0f} MiB beyond the {results / MiB:.0f} MiB list"

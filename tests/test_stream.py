"""`shard_stream`: completion or shard order, and backpressure."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

import ashard
import workloads

pytestmark = pytest.mark.anyio


def _slow_first(shard: ashard.Shard) -> int:
    time.sleep(0.6 if shard.id == 0 else 0.01)
    return shard.id


async def test_unordered_yields_in_completion_order() -> None:
    async with ashard.shard_stream(ashard.shards(10, block_size=1), _slow_first, workers=2) as s:
        order = [done.shard.id async for done in s]
    assert sorted(order) == list(range(10))
    assert order[-1] == 0  # the slow shard finishes last


async def test_ordered_yields_in_shard_order() -> None:
    async with ashard.shard_stream(
        ashard.shards(10, block_size=1), _slow_first, workers=2, ordered=True
    ) as s:
        dones = [done async for done in s]
    assert [d.shard.id for d in dones] == list(range(10))
    assert [d.value for d in dones] == list(range(10))


async def test_done_records_describe_the_shard() -> None:
    async with ashard.Pool(2) as pool:
        async with pool.shard_stream(["a", "b", "c"], workloads.shard_items) as s:
            dones = [d async for d in s]
        assert sorted(d.value[0] for d in dones) == ["a", "b", "c"]
        for d in dones:
            assert d.error is None and d.attempts == 1
            assert d.worker in pool.pids
            assert d.elapsed >= 0
            assert d.shard.items == d.value


async def test_a_value_let_go_is_held_by_nothing_while_the_next_shard_runs(
    tmp_path: Path,
) -> None:
    gate = str(tmp_path / "gate")
    with anyio.fail_after(60):
        async with ashard.shard_stream(
            ashard.shards(2, block_size=1), workloads.shard_payload_past_gate, workers=1,
            ordered=True, borrow={"gate": gate},
        ) as s:  # fmt: skip
            await workloads.first_value_is_let_go(s, gate)


async def test_slow_consumer_holds_at_most_max_pending() -> None:
    max_pending = 3
    held = []
    async with ashard.shard_stream(
        ashard.shards(40, block_size=1),
        workloads.shard_sum,
        workers=2,
        max_pending=max_pending,
    ) as s:
        async for _ in s:
            held.append(s.pending)
            await anyio.sleep(0.02)
    assert len(held) == 40
    assert max(held) <= max_pending


async def test_collect_yields_failures_and_raise_raises() -> None:
    async with ashard.shard_stream(
        ashard.shards(6, block_size=1), workloads.fail_on, errors="collect", workers=2
    ) as s:
        dones = [d async for d in s]
    errors = [d for d in dones if d.error is not None]
    assert [d.shard.id for d in errors] == [3]
    assert isinstance(errors[0].error, ashard.ShardFailed)

    with pytest.raises(ashard.ShardMapError):
        async with ashard.shard_stream(
            ashard.shards(6, block_size=1), workloads.fail_on, workers=2
        ) as s:
            async for _ in s:
                pass


async def test_a_slow_consumer_holds_a_bounded_amount_of_value_bytes() -> None:
    """1 MB values, a consumer slower than the workers: at most about `max_held_bytes` of
    finished values wait (max_pending alone would let a thousand)."""
    async with ashard.Pool(2) as pool:
        most = 0
        layout = ashard.shards(30, block_size=1)
        async with pool.shard_stream(layout, workloads.megabyte_value,
                                     max_held_bytes="4MB") as stream:  # fmt: skip
            async for done in stream:
                assert len(done.value) == 1_000_000
                most = max(most, stream.pending)
                await anyio.sleep(0.02)
    assert most <= 4

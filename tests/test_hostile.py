"""A worker that writes hostile bytes into its channel breaks only itself: it is killed and
replaced, its shards run again, the call goes on, the parent's memory stays bounded and
its event loop keeps ticking.

The bytes are written from inside `fn`, straight into the worker's end of the channel,
so they arrive between (or in front of) the worker's own frames.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import anyio
import psutil
import pytest

import ashard
import ashard._channel
import workloads

pytestmark = pytest.mark.anyio

KINDS = [
    "garbage",
    "claims-1GiB",
    "over-limit",
    "many-buffers",
    "unknown-message",
    "bad-pickle",
    "stale-result",
    "array-unsealed",
    "array-size-lie",
    "array-without-fd",
]
MiB = 1 << 20


@pytest.fixture(autouse=True)
def short_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame that never completes is given up on after a second, not ten."""
    monkeypatch.setattr(ashard._channel, "FRAME_STALL_SECONDS", 1.0)


def parent_rss() -> int:
    return int(psutil.Process().memory_info().rss)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_hostile_worker_is_replaced_and_the_call_goes_on(kind: str, tmp_path: Path) -> None:
    armed = str(tmp_path / "armed")
    await anyio.Path(armed).touch()
    fn = functools.partial(workloads.shard_writing_hostile_once, armed=armed, kind=kind)
    gaps: list[float] = []
    done = anyio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await anyio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    rss_before = await anyio.to_thread.run_sync(parent_rss)
    with anyio.fail_after(60):
        async with ashard.Pool(2) as pool, anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            res = await pool.shard_map(ashard.shards(6, block_size=1), fn, max_retries=2)
            rss_after = await anyio.to_thread.run_sync(parent_rss)
            done.set()
            assert res.results == [i * 10 for i in range(6)]
            assert pool.stats.crashed == 1
            assert [r.ended for r in res.diagnostics.per_worker].count("protocol") == 1
            assert await pool.call(abs, -1) == 1
    assert await anyio.Path(armed + ".claimed").exists()
    assert rss_after - rss_before < 64 * MiB
    assert max(gaps) < 0.05, f"the event loop stalled for {max(gaps) * 1000:.0f} ms"


async def test_a_hostile_worker_fails_its_shard_when_no_retry_is_left(tmp_path: Path) -> None:
    armed = str(tmp_path / "armed")
    await anyio.Path(armed).touch()
    fn = functools.partial(workloads.shard_writing_hostile_once, armed=armed, kind="garbage")
    async with ashard.Pool(1) as pool:
        res = await pool.shard_map(
            ashard.shards(3, block_size=1), fn, max_retries=0, errors="collect"
        )
    (failure,) = res.failures
    assert isinstance(failure, ashard.WorkerCrashed) and failure.shard_id == 0
    assert "broke the channel protocol (it sent bytes that are not a frame)" in str(failure)
    assert res.results == [None, 10, 20]


async def test_a_call_on_a_hostile_worker_raises_worker_crashed(tmp_path: Path) -> None:
    armed = str(tmp_path / "armed")
    await anyio.Path(armed).touch()
    async with ashard.Pool(1) as pool:
        with pytest.raises(ashard.WorkerCrashed, match="broke the channel protocol"):
            await pool.call(workloads.write_hostile_once, armed, "unknown-message")
        assert await pool.call(abs, -2) == 2


async def test_a_result_over_max_message_fails_its_shard_not_the_worker() -> None:
    async with ashard.Pool(1, max_message="1MB") as pool:
        pid = pool.pids[0]
        res = await pool.shard_map(
            ashard.shards(3, block_size=1),
            lambda sh: bytes(2_000_000) if sh.id == 1 else sh.id,
            errors="collect",
        )
        assert pool.pids == [pid]
    (failure,) = res.failures
    assert isinstance(failure, ashard.ShardFailed) and failure.shard_id == 1
    assert "too large to send back" in str(failure) and "1,000,000" in str(failure)
    assert res.results == [0, None, 2]


async def test_results_too_large_together_but_not_alone_all_come_back() -> None:
    async with ashard.Pool(1, max_message="1MB") as pool:
        pid = pool.pids[0]
        res = await pool.shard_map(  # one chunk of four results of 0.4 MB: 1.6 MB in all
            ashard.shards(4, block_size=1), lambda sh: bytes(400_000), chunk_size=4
        )
        assert pool.pids == [pid]
    assert res.results == [bytes(400_000)] * 4


async def test_max_message_is_checked() -> None:
    with pytest.raises(ValueError, match="max_message must be a number of bytes"):
        ashard.Pool(1, max_message="huge")
    with pytest.raises(TypeError, match="max_message must be a number of bytes"):
        ashard.Pool(1, max_message=None)  # type: ignore[arg-type]
    # too small for a worker's own messages: its start would fail as a broken protocol
    with pytest.raises(ValueError, match=r"max_message must be at least 65,536 bytes, got 1\.5"):
        ashard.Pool(1, max_message=1.5)  # type: ignore[arg-type]
    async with ashard.Pool(1, max_message=1 << 16) as pool:  # the least works
        assert await pool.map(abs, range(-50_000, 0)) == list(range(50_000, 0, -1))

"""Memory pause (DESIGN 2.5): a worker over ``mem_pause * mem_cap`` gets no new work; it
resumes below (with hysteresis), is recycled after `pause_timeout`, and when every
worker is paused the largest is recycled at once, so no call stalls."""

from __future__ import annotations

from functools import partial

import anyio
import psutil
import pytest

import ashard
from workloads import hoard, pid_of, sleep_pid

pytestmark = pytest.mark.anyio


def pausing_pool(workers: int, mem_cap: str, mem_pause: float, timeout: float) -> ashard.Pool:
    """A pool that pauses at `mem_pause` of `mem_cap`, reads memory every 50 ms and
    does not recycle for growth (so only pauses and their timeouts act)."""
    return ashard.Pool(workers, mem_cap=mem_cap, mem_pause=mem_pause, pause_timeout=timeout,
                       health_check_interval=0.05, recycle=False)  # fmt: skip


async def test_a_paused_worker_gets_no_work_and_is_recycled_after_pause_timeout() -> None:
    with anyio.fail_after(90):
        async with pausing_pool(2, "600MB", 0.5, 0.6) as pool:
            first = await pool.shard_map(1, partial(hoard, mib=400))
            (hoarder,) = first.results
            assert first.diagnostics.memory.pauses == 1
            assert pool.stats.paused == 1
            res = await pool.shard_map(
                ashard.shards(30, block_size=1), partial(sleep_pid, seconds=0.1)
            )
            assert res.ok and hoarder not in res.results  # paused: no work
            assert res.diagnostics.memory.recycled == {"pause_timeout": 1}
            assert ("pause_timeout") in [why for _, _, _, why in res.diagnostics.scaling]
            assert pool.stats.recycled_by["pause_timeout"] == 1 and pool.stats.crashed == 0
            assert not psutil.pid_exists(hoarder) or psutil.Process(hoarder).status() == "zombie"
            assert pool.stats.paused == 0


async def test_when_every_worker_is_paused_the_largest_is_recycled_at_once() -> None:
    with anyio.fail_after(90):
        async with pausing_pool(2, "800MB", 0.25, 600) as pool:
            sizes = [300, 450]
            first = await pool.shard_map(
                ashard.shards(2, block_size=1),
                lambda shard: hoard(shard, mib=sizes[shard.id], hold=0.5),
            )
            small, large = first.results
            assert small != large and pool.stats.paused == 2
            res = await pool.shard_map(ashard.shards(4, block_size=1), pid_of)
            assert res.ok and not {small, large} & set(res.results)
            assert res.diagnostics.memory.recycled == {"all_paused": 1}
            assert pool.stats.recycled_by["all_paused"] == 1
            assert small in pool.pids and large not in pool.pids
            assert pool.stats.paused == 1


async def test_the_last_worker_to_pause_has_the_largest_recycled_at_once() -> None:
    """Workers that pause one after the other, as their shards end: when the last of
    them goes idle, paused, the largest is recycled there and then. Waiting for the
    next health check (100 s here) stalled the call that long, again and again."""
    with anyio.fail_after(60):
        async with ashard.Pool(2, mem_cap="800MB", mem_pause=0.25, pause_timeout=600,
                               health_check_interval=100, recycle=False) as pool:  # fmt: skip
            hoarders = partial(hoard, mib=250, hold=0.1)  # each shard pauses its worker
            res = await pool.shard_map(ashard.shards(6, block_size=1), hoarders)
            assert res.ok and res.diagnostics.memory.recycled["all_paused"] >= 2


async def test_a_worker_that_falls_back_below_resumes() -> None:
    with anyio.fail_after(90):
        async with pausing_pool(1, "600MB", 0.5, 600) as pool:
            first = await pool.shard_map(1, partial(hoard, mib=400, free_after=0.5))
            (pid,) = first.results
            assert pool.stats.paused == 1
            while pool.stats.paused:  # noqa: ASYNC110 (the monitor reads it again)
                await anyio.sleep(0.05)
            res = await pool.shard_map(ashard.shards(3, block_size=1), pid_of)
            assert res.ok and set(res.results) == {pid}  # it resumed and took the work
            assert pool.stats.paused == 0 and pool.stats.recycled == 0


async def test_calls_are_not_sent_to_a_paused_worker() -> None:
    with anyio.fail_after(90):
        async with pausing_pool(2, "600MB", 0.5, 600) as pool:
            first = await pool.shard_map(1, partial(hoard, mib=400))
            (hoarder,) = first.results
            pids = {await pool.call(sleep_pid, None, 0.05) for _ in range(6)}
            assert hoarder not in pids


@pytest.mark.parametrize(
    ("option", "value", "error", "match"),
    [
        ("mem_pause", 0, ValueError, "mem_pause must be a share of mem_cap above 0"),
        ("mem_pause", 1.5, ValueError, "mem_pause must be a share of mem_cap above 0"),
        ("mem_pause", "high", TypeError, "mem_pause must be a share of mem_cap such as 0.8"),
        ("pause_timeout", 0, ValueError, "pause_timeout must be a positive"),
        ("pause_timeout", "soon", TypeError, "pause_timeout must be a positive number"),
    ],
)
def test_bad_pause_settings_are_refused_naming_them(
    option: str, value: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        ashard.Pool(2, mem_cap="1GB", **{option: value})


async def test_a_mem_cap_an_idle_worker_is_over_fails_at_start_saying_so() -> None:
    """A worker over `mem_pause` of `mem_cap` before it ran anything (``mem_cap=1000``:
    bytes, meant as megabytes?) could never take work: the pool would crawl, recycling
    one paused worker per health check. Its start fails at once, saying why."""
    with anyio.fail_after(60):
        with pytest.raises(ashard.WorkerStartError, match=r"holds [\d.]+ MiB .* before it runs"):
            async with ashard.Pool(2, mem_cap=1000):
                pass
        pool = ashard.Pool(1, mem_cap="1MB")
        try:
            with pytest.raises(ashard.WorkerStartError, match="Raise mem_cap"):
                await pool.call(abs, -1)
        finally:
            await pool.aclose()

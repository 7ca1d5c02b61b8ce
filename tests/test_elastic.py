"""Elastic pools (DESIGN 2.5): workers between `min_workers` and `workers`, started as
queued work needs them (no start-up storm) and leaving after `idle_timeout` idle, never
below the minimum and never while busy; the scaling events in `Diagnostics.scaling`."""

from __future__ import annotations

import os
import signal
from functools import partial

import anyio
import psutil
import pytest

import ashard
from ashard._workers import IDLE_TIMEOUT
from workloads import die_first_attempt, pid_of, sleep_pid

pytestmark = pytest.mark.anyio


async def wait_alive(pool: ashard.Pool, n: int) -> None:
    while pool.stats.alive != n:  # noqa: ASYNC110 (polling the pool from outside)
        await anyio.sleep(0.02)


async def test_entering_starts_min_workers_when_given_else_all() -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(3, min_workers=1) as pool:
            assert pool.stats.alive == 1 and len(pool.pids) == 1
        async with ashard.Pool(3, min_workers=0) as pool:
            assert pool.stats.alive == 0
        async with ashard.Pool(2) as pool:  # today's behaviour: a warm pool
            assert pool.stats.alive == 2
        async with ashard.Pool(2, idle_timeout=30) as pool:  # v1: all, leaving when idle
            assert pool.stats.alive == 2


async def test_it_grows_on_backlog_and_shrinks_to_the_minimum_after_idle() -> None:
    with anyio.fail_after(90):
        async with ashard.Pool(
            4, min_workers=1, idle_timeout=0.5, health_check_interval=0.05
        ) as pool:
            first = pool.pids
            res = await pool.shard_map(ashard.shards(24, block_size=1), sleep_pid)
            assert res.ok
            ran_on = set(res.results)
            assert first[0] in ran_on and len(ran_on) == 4  # grew to the maximum, no more
            starts = [e for e in res.diagnostics.scaling if e[2] > e[1]]
            assert [(b, a, why) for _, b, a, why in starts] == [
                (1, 2, "backlog"), (2, 3, "backlog"), (3, 4, "backlog"),
            ]  # fmt: skip
            assert pool.stats.started == 4
            await wait_alive(pool, 1)
            assert pool.stats.recycled_by["idle"] == 3
            await anyio.sleep(1.5)  # three times idle_timeout more: never below the minimum
            assert pool.stats.alive == 1 and pool.stats.recycled_by["idle"] == 3
            (kept,) = pool.pids
            assert psutil.pid_exists(kept)
            gone = ran_on - {kept}
            assert not any(psutil.pid_exists(p) for p in gone)


async def test_the_scale_down_is_in_the_diagnostics_of_a_call_running_meanwhile() -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(
            2, min_workers=0, idle_timeout=0.3, health_check_interval=0.05
        ) as pool:
            await pool.shard_map(ashard.shards(8, block_size=1), partial(sleep_pid, seconds=0.1))
            assert pool.stats.alive == 2
            # one long shard keeps one worker busy while the other idles out
            res = await pool.shard_map(1, partial(sleep_pid, seconds=1.5))
            assert res.ok
            stops = [(b, a, why) for _, b, a, why in res.diagnostics.scaling if a < b]
            assert stops == [(2, 1, "idle")]
            assert res.results[0] in pool.pids  # the busy one was never stopped
            assert pool.stats.crashed == 0


async def test_a_busy_worker_is_never_stopped_to_scale_down() -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(
            1, min_workers=0, idle_timeout=0.2, health_check_interval=0.02
        ) as pool:
            res = await pool.shard_map(1, partial(sleep_pid, seconds=1.5))
            assert res.ok and res.diagnostics.retries == 0 and pool.stats.crashed == 0
            assert not [e for e in res.diagnostics.scaling if e[2] < e[1]]


async def test_no_flapping_between_bursts_closer_than_idle_timeout() -> None:
    with anyio.fail_after(90):
        async with ashard.Pool(3, min_workers=0, idle_timeout=2.0) as pool:
            seen: set[int] = set()
            for _ in range(5):
                res = await pool.shard_map(
                    ashard.shards(9, block_size=1), partial(sleep_pid, seconds=0.1)
                )
                seen.update(res.results)
                await anyio.sleep(0.2)
            assert pool.stats.recycled_by.get("idle", 0) == 0
            assert pool.stats.started == len(seen) <= 3  # no worker was stopped and restarted


async def test_starts_come_about_one_per_live_worker_at_a_time() -> None:
    """On an empty pool a burst of work starts one worker, then two, then four: the
    number starting at once never exceeds the live workers (one when there is none)."""
    with anyio.fail_after(90):
        async with ashard.Pool(6, min_workers=0) as pool:
            workers = (await pool.backend()).workers  # type: ignore[attr-defined]
            start = workers._start
            most = {"over": 0, "starting": 0}
            starting = 0

            async def spy() -> object:
                nonlocal starting
                live = len(workers._workers)
                starting += 1
                most["starting"] = max(most["starting"], starting)
                if starting > max(1, live):
                    most["over"] += 1
                try:
                    return await start()
                finally:
                    starting -= 1

            workers._start = spy
            res = await pool.shard_map(ashard.shards(30, block_size=1), sleep_pid)
            assert res.ok and len(set(res.results)) == 6
            assert most["over"] == 0
            assert most["starting"] >= 2  # starts did overlap once workers were live


async def test_a_crash_is_a_stop_then_a_start_in_the_scaling_events() -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(2) as pool:
            res = await pool.shard_map(ashard.shards(4, block_size=1), die_first_attempt)
            assert res.ok
            events = [(b, a, why) for _, b, a, why in res.diagnostics.scaling]
            assert (2, 1, "crash") in events
            assert events.index((2, 1, "crash")) < next(
                i for i, e in enumerate(events) if e[1] > e[0]
            )
            assert pool.stats.alive == 2


async def test_the_default_pool_keeps_no_minimum_and_idles_out_after_the_default() -> None:
    pool = ashard.default_pool()
    try:
        await ashard.call(os.getpid)
        workers = (await pool.backend()).workers  # type: ignore[attr-defined]
        assert workers.min_workers == 0 and workers.idle_limit == IDLE_TIMEOUT
        explicit = ashard.Pool(2, min_workers=1)
        assert (await explicit.backend()).workers.idle_limit == IDLE_TIMEOUT  # type: ignore[attr-defined]
        await explicit.aclose()
        full = ashard.Pool(2)
        assert (await full.backend()).workers.idle_limit is None  # type: ignore[attr-defined]
        await full.aclose()
    finally:
        await ashard.shutdown()


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (-1, ValueError, r"min_workers must be from 0 to workers \(2\), got -1"),
        (3, ValueError, r"min_workers must be from 0 to workers \(2\), got 3"),
        ("1", TypeError, "min_workers must be an int from 0 to workers, got str '1'"),
        (True, TypeError, "min_workers must be an int"),
        (1.0, TypeError, "min_workers must be an int"),
    ],
)
def test_bad_min_workers_is_refused_before_anything_starts(
    value: object, error: type[Exception], match: str
) -> None:
    before = psutil.Process().children()
    with pytest.raises(error, match=match):
        ashard.Pool(2, min_workers=value)  # type: ignore[arg-type]
    assert psutil.Process().children() == before


async def test_a_killed_idle_worker_above_the_minimum_is_not_replaced_until_needed() -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(2, min_workers=0, idle_timeout=30) as pool:
            await pool.shard_map(ashard.shards(6, block_size=1), partial(sleep_pid, seconds=0.1))
            victim = pool.pids[0]
            os.kill(victim, signal.SIGKILL)
            res = await pool.shard_map(ashard.shards(4, block_size=1), pid_of)
            assert res.ok and victim not in res.results

"""Worker health and lifecycle: memory caps, drift, max_tasks, idle exit, init, storms."""

from __future__ import annotations

import functools
import itertools
import os
import time
from collections import Counter
from pathlib import Path

import anyio
import psutil
import pytest

import ashard
from ashard._workers import BACKOFF_MAX, spawn_delay

pytestmark = pytest.mark.anyio

MiB = 1 << 20
_HOARD: list[bytes] = []  # per worker process: what the leaking functions keep


def private_rss() -> int:
    info = psutil.Process().memory_info()
    return int(info.rss - info.shared)


def leak(shard: ashard.Shard, mib: int = 10) -> tuple[int, int]:
    """Keep `mib` more MiB each shard; report pid and private memory at the peak."""
    _HOARD.append(b"\x01" * (mib * MiB))
    time.sleep(0.02)
    return os.getpid(), private_rss()


def runaway_first(shard: ashard.Shard) -> int:
    """The first attempt of shard 0 allocates without end (until it is killed)."""
    if shard.id == 0 and shard.attempt == 1:
        hog = []
        while True:
            hog.append(b"\x01" * (8 * MiB))
            time.sleep(0.01)
    return shard.attempt


def runaway_always(shard: ashard.Shard) -> None:
    hog = []
    while True:
        hog.append(b"\x01" * (8 * MiB))
        time.sleep(0.01)


def pid_of(shard: ashard.Shard) -> int:
    return os.getpid()


def exit_now(shard: ashard.Shard) -> None:
    os._exit(3)


def record_init(directory: str) -> None:
    Path(directory, str(os.getpid())).touch(exist_ok=False)  # a second run would raise


def init_fails_when_marked(marker: str) -> None:
    if os.path.exists(marker):
        raise RuntimeError("init refused: marker present")


async def test_leaking_fn_under_mem_cap_is_recycled_below_the_hard_limit() -> None:
    with anyio.fail_after(90):
        async with ashard.Pool(2, mem_cap="100MB", health_check_interval=0.1) as pool:
            layout = ashard.shards(40, block_size=1)
            res = await pool.shard_map(layout, leak, chunk_size=1)
            stats = pool.stats
    assert res.ok
    hard = 150 * 10**6
    peaks = [rss for _, rss in res.results]
    assert max(peaks) <= hard, f"a worker reached {max(peaks) / MiB:.0f} MiB"
    # paused above mem_pause (0.8 x mem_cap) first: both paused, the largest goes at
    # once; or past mem_cap between shards
    memory = ("mem_cap", "all_paused", "pause_timeout")
    assert sum(stats.recycled_by.get(reason, 0) for reason in memory) >= 2
    assert stats.recycled == sum(stats.recycled_by.values())
    assert stats.crashed == 0
    assert len({pid for pid, _ in res.results}) >= 4
    ended = Counter(row.ended for row in res.diagnostics.per_worker)
    assert sum(ended[reason] for reason in memory) >= 2
    assert all(row.peak_rss <= hard for row in res.diagnostics.per_worker)


async def test_runaway_allocation_is_killed_at_once_and_its_shard_retried() -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(
            1, mem_cap="100MB", hard_cap=2.0, health_check_interval=0.05
        ) as pool:
            res = await pool.shard_map(ashard.shards(3, block_size=1), runaway_first)
            assert res.results == [2, 1, 1]
            assert res.diagnostics.retries == 1
            assert pool.stats.recycled_by.get("mem_hard") == 1
            assert pool.stats.crashed == 0
            killed = [row for row in res.diagnostics.per_worker if row.ended == "mem_hard"]
            assert len(killed) == 1

            res = await pool.shard_map(1, runaway_always, max_retries=0, errors="collect")
    (failure,) = res.failures
    assert isinstance(failure, ashard.WorkerCrashed)
    assert "past the hard limit of 191 MiB" in str(failure)
    assert failure.oom  # ashard's hard limit ended it: named as out of memory


async def test_max_tasks_replaces_a_worker_after_that_many_shards() -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(1, max_tasks=5) as pool:
            res = await pool.shard_map(ashard.shards(20, block_size=1), pid_of)
            calls = [await pool.call(os.getpid) for _ in range(6)]
            stats = pool.stats
    per_pid = Counter(res.results)
    assert len(per_pid) == 4 and set(per_pid.values()) == {5}
    assert len(set(calls)) == 2  # calls count as tasks too: 5 on one worker, 1 on the next
    assert stats.recycled_by["max_tasks"] >= 5
    rows = res.diagnostics.per_worker
    assert [row.pid for row in rows] == sorted(per_pid)
    assert all(row.shards == 5 and row.ended == "max_tasks" for row in rows)
    assert all(row.busy >= 0 and row.peak_rss > 0 for row in rows)
    assert str(rows[0].pid) in res.diagnostics.table()


async def test_idle_workers_exit_and_come_back_on_demand() -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(2, idle_timeout=0.3, health_check_interval=0.05) as pool:
            first = pool.pids
            assert len(first) == 2
            while pool.stats.alive:  # noqa: ASYNC110 (polling the pool from outside)
                await anyio.sleep(0.05)
            assert pool.stats.recycled_by["idle"] == 2
            assert not any(psutil.pid_exists(p) for p in first)  # exited and reaped
            res = await pool.shard_map(4, pid_of)
            assert res.ok and not set(res.results) & set(first)
            assert pool.stats.crashed == 0


async def test_init_runs_exactly_once_in_every_worker_including_replacements(
    tmp_path: Path,
) -> None:
    init = functools.partial(record_init, str(tmp_path))
    with anyio.fail_after(60):
        async with ashard.Pool(2, init=init, max_tasks=3) as pool:
            res = await pool.shard_map(ashard.shards(18, block_size=1), pid_of)
            started = pool.stats.started
    names = await anyio.to_thread.run_sync(os.listdir, tmp_path)
    ran_init = sorted(int(name) for name in names)
    assert set(res.results) <= set(ran_init)
    assert len(ran_init) == started >= 6


async def test_init_failing_in_a_replacement_ends_the_call_not_in_a_respawn_loop(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "marker"
    init = functools.partial(init_fails_when_marked, str(marker))
    with anyio.fail_after(30):
        async with ashard.Pool(1, init=init, max_tasks=1) as pool:
            await anyio.Path(marker).touch()  # the first worker started; its replacements cannot
            with pytest.raises(ashard.WorkerStartError, match="init refused"):
                await pool.shard_map(ashard.shards(5, block_size=1), pid_of)
            assert pool.stats.started == 1


async def test_a_function_that_kills_every_worker_ends_in_bounded_failures() -> None:
    with anyio.fail_after(90):
        async with ashard.Pool(2) as pool:
            res = await pool.shard_map(
                ashard.shards(4, block_size=1), exit_now, max_retries=2, errors="collect"
            )
            stats = pool.stats
    assert len(res.failures) == 4
    assert all(isinstance(f, ashard.WorkerCrashed) and f.attempts == 3 for f in res.failures)
    assert not any(f.oom for f in res.failures)  # exits, not out of memory
    assert stats.crashed == 12
    assert stats.started <= 2 + 12


def test_spawn_backoff_grows_and_is_bounded() -> None:
    delays = [spawn_delay(n) for n in range(30)]
    assert delays[:3] == [0.0, 0.0, 0.0]  # a lone crash is replaced at once
    assert all(a <= b for a, b in itertools.pairwise(delays))
    assert delays[3] > 0 and delays[-1] == BACKOFF_MAX


def leak_small(shard: ashard.Shard) -> int:
    _HOARD.append(b"\x01" * (4 * MiB))
    time.sleep(0.01)
    return os.getpid()


@pytest.mark.parametrize(
    ("profile", "recycle", "drifts"),
    [("default", True, False), ("memory", True, True), ("memory", False, False)],
)
async def test_drift_recycling_follows_the_profile(
    profile: str, recycle: bool, drifts: bool
) -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(1, recycle=recycle) as pool:
            res = await pool.shard_map(
                ashard.shards(15, block_size=1), leak_small, chunk_size=1, profile=profile
            )  # 60 MiB of growth: past the memory profile's floor, under the default's
            drift = pool.stats.recycled_by.get("drift", 0)
    assert res.ok
    assert (drift > 0) is drifts
    assert (len(set(res.results)) > 1) is drifts


async def test_bad_health_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="mem_cap must be a number of bytes or a size"):
        ashard.Pool(1, mem_cap="lots")
    with pytest.raises(ValueError, match="mem_cap must be a positive size"):
        ashard.Pool(1, mem_cap=-5)
    with pytest.raises(ValueError, match="max_tasks must be a positive int"):
        ashard.Pool(1, max_tasks=0)
    with pytest.raises(ValueError, match="idle_timeout must be a positive"):
        ashard.Pool(1, idle_timeout=0)
    with pytest.raises(ValueError, match="recycle must be True, False or a positive"):
        ashard.Pool(1, recycle=-1)
    with pytest.raises(ValueError, match="hard_cap must be a factor of mem_cap above 1"):
        ashard.Pool(1, hard_cap=1)
    with pytest.raises(ValueError, match="profile must be one of"):
        await ashard.shard_map(2, pid_of, profile="fast")  # type: ignore[arg-type]
    assert ashard.Pool(1, mem_cap="1.5GiB")._make().policy.mem_cap == 3 * 2**29  # type: ignore[attr-defined]


def fast_runaway(shard: ashard.Shard) -> int:
    """Shard 0 allocates and touches memory as fast as it can (GB/s), without end."""
    import numpy as np

    if shard.id == 0:
        hoard = []
        while True:
            hoard.append(np.ones(16 * MiB, dtype=np.uint8))
    return shard.id


async def test_a_fast_allocator_never_passes_the_hard_limit_by_more_than_ten_percent() -> None:
    import threading

    hard = int(300e6 * 1.5)
    async with ashard.Pool(2, mem_cap="300MB") as pool:
        pids = pool.pids
        peak = dict.fromkeys(pids, 0)
        stop = threading.Event()

        def sample() -> None:  # the parent's view of each worker, every half millisecond
            procs = [psutil.Process(p) for p in pids]
            while not stop.wait(0.0005):
                for proc in procs:
                    try:
                        info = proc.memory_info()
                    except psutil.Error:
                        continue
                    peak[proc.pid] = max(peak[proc.pid], info.rss - info.shared)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            res = await pool.shard_map(
                ashard.shards(6, block_size=1), fast_runaway, max_retries=0, errors="collect"
            )
        finally:
            stop.set()
            await anyio.to_thread.run_sync(sampler.join)
    (failure,) = res.failures
    assert isinstance(failure, ashard.WorkerCrashed) and failure.shard_id == 0
    assert "past the hard limit of 429 MiB" in str(failure)
    assert res.results[1:] == [1, 2, 3, 4, 5]
    assert max(peak.values()) > hard * 0.8  # the sampler did see the runaway
    assert max(peak.values()) <= hard * 1.1, f"{max(peak.values()) / hard:.2f} x the hard limit"


async def test_a_call_that_meets_idle_workers_leaving_gets_new_ones() -> None:
    """Calls that arrive while the monitor is stopping idle workers must not wait for a
    worker that will never come back."""
    with anyio.fail_after(60):
        async with ashard.Pool(2, idle_timeout=0.1, health_check_interval=0.01) as pool:
            for i in range(8):
                await anyio.sleep(0.09 + i * 0.005)  # before, at and past the deadline
                res = await pool.shard_map(ashard.shards(4, block_size=1), pid_of)
                assert res.ok
            assert pool.stats.recycled_by["idle"] >= 2

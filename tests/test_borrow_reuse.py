"""A pool shares a borrowed array once and reuses it while unchanged, and never hands it
back stale: changed in place, other data under the same name or at the same address,
views, two calls at once, writes a worker made under ``cow="allow"``. Its copies go with
the pool (the default pool keeps none). A large array that `fn` captured (a closure's,
a notebook's global), or that a `call` passes, travels the same way."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable
from pathlib import Path

import anyio
import numpy as np
import pytest

import ashard
from ashard._borrowed import MIN_BYTES
from ashard._shm import PARALLEL_COPY_BYTES

pytestmark = pytest.mark.anyio

N = 2 * MIN_BYTES // 8  # float64s: large enough to be kept between calls


def total(shard: ashard.Shard, X: np.ndarray) -> float:
    return float(X.sum())


def total_and_segment(shard: ashard.Shard, X: np.ndarray) -> tuple[float, str]:
    """The sum and the inode of the segment `X` lies in, as this worker maps it."""
    return float(X.sum()), segment_of(X)


def segment_of(X: np.ndarray) -> str:
    """The inode of the mapping `X` lies in ("0": private memory)."""
    address = X.__array_interface__["data"][0]
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, _, _, _, inode, *_ = line.split()
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= address < hi:
                return inode
    raise AssertionError("X is not in any mapping")


def overwrite(shard: ashard.Shard, X: np.ndarray) -> float:
    X[:] = -1.0
    return float(X.sum())


def wait_then_total(shard: ashard.Shard, X: np.ndarray, started: str, go: str) -> float:
    """Sum `X` after the test says so: the test changes the array meanwhile."""
    import time

    Path(started).touch()
    deadline = time.monotonic() + 60
    while not Path(go).exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the test never said go")
        time.sleep(0.005)
    return float(X.sum())


def count_memfds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += "memfd:ashard-" in os.readlink(f"/proc/self/fd/{fd}")
    return n


async def test_an_unchanged_array_is_shared_once_and_a_changed_one_again() -> None:
    X = np.arange(N, dtype=np.float64)
    async with ashard.Pool(2) as pool:
        first = await pool.shard_map(4, total_and_segment, borrow={"X": X})
        memfds = await anyio.to_thread.run_sync(count_memfds)
        again = await pool.shard_map(4, total_and_segment, borrow={"X": X})
        assert {s for _, s in again.results} == {s for _, s in first.results}  # the same memory
        assert await anyio.to_thread.run_sync(count_memfds) == memfds
        assert [t for t, _ in again.results] == [float(X.sum())] * 4

        X *= 3
        changed = await pool.shard_map(4, total_and_segment, borrow={"X": X})
        assert [t for t, _ in changed.results] == [float(X.sum())] * 4
        assert {s for _, s in changed.results}.isdisjoint({s for _, s in first.results})
        del X
        gc.collect()
        assert await anyio.to_thread.run_sync(count_memfds) == 0  # gone with the array


@pytest.mark.parametrize("where", ["first", "middle", "last byte"])
async def test_a_change_anywhere_is_seen(where: str) -> None:
    X = np.zeros(N, dtype=np.float64)
    async with ashard.Pool(2) as pool:
        assert (await pool.shard_map(2, total, borrow={"X": X})).results == [0.0, 0.0]
        if where == "last byte":
            X.view(np.uint8)[-1] = 0x3F  # a tiny float's top byte
        else:
            X[0 if where == "first" else N // 2] = 1.5
        assert (await pool.shard_map(2, total, borrow={"X": X})).results == [float(X.sum())] * 2
        assert float(X.sum()) != 0.0


async def test_a_large_array_compared_in_pieces_sees_a_change_in_its_last_piece() -> None:
    X = np.zeros(PARALLEL_COPY_BYTES // 8 + N, dtype=np.float64)
    async with ashard.Pool(1) as pool:
        assert (await pool.shard_map(1, total, borrow={"X": X})).results == [0.0]
        X[-1] = 7.0
        assert (await pool.shard_map(1, total, borrow={"X": X})).results == [7.0]
        assert (await pool.shard_map(1, total, borrow={"X": X})).results == [7.0]


async def test_bytes_not_values_decide() -> None:
    """NaN payloads and signed zeros compare equal as values, not as bytes."""
    X = np.full(N, np.nan)
    async with ashard.Pool(1) as pool:
        await pool.shard_map(1, total, borrow={"X": X})
        X[:] = 0.0
        X[5] = -0.0
        assert (await pool.shard_map(1, total_and_bits, borrow={"X": X})).results == [(0.0, True)]


def total_and_bits(shard: ashard.Shard, X: np.ndarray) -> tuple[float, bool]:
    return float(X.sum()), bool(np.signbit(X[5]))


async def test_other_data_under_the_same_name_or_at_the_same_address() -> None:
    async with ashard.Pool(2) as pool:
        for k in range(4):
            X = np.full(N, float(k))  # often lands where the last one was freed
            assert (await pool.shard_map(2, total, borrow={"X": X})).results == [k * N] * 2
            del X
        A, B = np.full(N, 1.0), np.full(N, 2.0)
        assert (await pool.shard_map(1, total, borrow={"X": A})).results == [N]
        assert (await pool.shard_map(1, total, borrow={"X": B})).results == [2.0 * N]
        assert (await pool.shard_map(1, total, borrow={"X": A})).results == [N]


async def test_views_of_one_array_are_told_apart() -> None:
    X = np.arange(2 * N, dtype=np.float64)
    halves = X[:N], X[N:]
    async with ashard.Pool(2) as pool:
        for _ in range(2):
            for half in halves:
                got = await pool.shard_map(1, total, borrow={"X": half})
                assert got.results == [float(half.sum())]
        X[N:] = 0.0  # through the owner
        assert (await pool.shard_map(1, total, borrow={"X": X[N:]})).results == [0.0]


async def test_a_workers_private_writes_never_reach_a_reused_copy() -> None:
    X = np.ones(N)
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(4, overwrite, borrow={"X": X}, cow="allow")
        assert res.results == [-float(N)] * 4
        assert (await pool.shard_map(4, total, borrow={"X": X})).results == [float(N)] * 4
    assert X.sum() == N


async def test_a_running_call_keeps_its_data_while_a_second_call_sees_the_change(
    tmp_path: Path,
) -> None:
    X = np.ones(N)
    started, go = tmp_path / "started", tmp_path / "go"
    async with ashard.Pool(2) as pool, anyio.create_task_group() as tg:
        first: list[float] = []

        async def run_first() -> None:
            borrow = {"X": X, "started": str(started), "go": str(go)}
            res = await pool.shard_map(1, wait_then_total, borrow=borrow)
            first.extend(res.results)

        tg.start_soon(run_first)
        with anyio.fail_after(60):
            while not started.exists():  # noqa: ASYNC110 (another process writes it)
                await anyio.sleep(0.01)
        X[:] = 2.0  # while the first call runs on its copy
        second = await pool.shard_map(1, total, borrow={"X": X})
        assert second.results == [2.0 * N]
        go.touch()
    assert first == [float(N)]  # the copy it started with, never written over


async def test_two_calls_at_once_with_one_array() -> None:
    X = np.arange(N, dtype=np.float64)
    async with ashard.Pool(2) as pool:
        results: list[list[float]] = []

        async def run() -> None:
            results.append((await pool.shard_map(8, total, borrow={"X": X})).results)

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(run)
    assert results == [[float(X.sum())] * 8] * 3


async def test_idle_copies_are_bounded_least_recently_used_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ashard import _borrowed

    limit = await anyio.to_thread.run_sync(_borrowed.limit_bytes)
    monkeypatch.setattr(_borrowed, "IDLE_FRACTION", 3 * MIN_BYTES / limit)
    A, B = np.full(N, 1.0), np.full(N, 2.0)  # one 2 MiB copy fits in the bound, not two
    async with ashard.Pool(1) as pool:
        first = await pool.shard_map(1, total_and_segment, borrow={"X": A})
        one_copy = await anyio.to_thread.run_sync(count_memfds)  # its fd and its mapping's
        await pool.shard_map(1, total_and_segment, borrow={"X": B})
        assert await anyio.to_thread.run_sync(count_memfds) == one_copy  # A's went: B's is newer
        again = await pool.shard_map(1, total_and_segment, borrow={"X": A})
    assert again.results[0][0] == first.results[0][0] == float(N)
    assert again.results[0][1] != first.results[0][1]  # copied afresh


async def test_copies_go_with_the_pool_and_the_default_pool_keeps_none() -> None:
    """A pool's kept copies go when it closes, the array still alive; the default pool
    and ``keep_borrowed=False`` let each call's copy go when the call ends."""
    X = np.arange(N, dtype=np.float64)
    async with ashard.Pool(1) as pool:
        await pool.shard_map(1, total, borrow={"X": X})
        assert await anyio.to_thread.run_sync(count_memfds) > 0  # kept for the next call
    assert await anyio.to_thread.run_sync(count_memfds) == 0
    for _ in range(2):
        got = await ashard.shard_map(2, total_and_segment, borrow={"X": X}, workers=1)
        assert [t for t, _ in got.results] == [float(X.sum())] * 2
        assert await anyio.to_thread.run_sync(count_memfds) == 0
    async with ashard.Pool(1, keep_borrowed=False) as pool:
        first = await pool.shard_map(1, total_and_segment, borrow={"X": X})
        assert await anyio.to_thread.run_sync(count_memfds) == 0
        again = await pool.shard_map(1, total_and_segment, borrow={"X": X})
    assert first.results[0][1] != again.results[0][1]  # a copy each call
    with pytest.raises(TypeError, match="keep_borrowed must be True or False"):
        ashard.Pool(keep_borrowed="yes")  # type: ignore[arg-type]


def closing_over(X: np.ndarray) -> Callable[[ashard.Shard], tuple[float, str]]:
    """A function that captured `X`: a closure, pickled by value with `X` in it."""

    def run(shard: ashard.Shard) -> tuple[float, str]:
        return total_and_segment(shard, X)

    return run


async def test_an_array_a_function_captured_is_shared_once_and_a_changed_one_again() -> None:
    X = np.arange(N, dtype=np.float64)
    fn = closing_over(X)
    async with ashard.Pool(2) as pool:
        first = await pool.shard_map(4, fn)
        assert "0" not in {s for _, s in first.results}  # in a segment, not a private copy
        memfds = await anyio.to_thread.run_sync(count_memfds)
        again = await pool.shard_map(4, fn)
        assert {s for _, s in again.results} == {s for _, s in first.results}
        assert await anyio.to_thread.run_sync(count_memfds) == memfds
        assert [t for t, _ in again.results] == [float(X.sum())] * 4

        X *= 3
        changed = await pool.shard_map(4, fn)
        assert [t for t, _ in changed.results] == [float(X.sum())] * 4
        assert {s for _, s in changed.results}.isdisjoint({s for _, s in first.results})
        del X, fn
        gc.collect()
        assert await anyio.to_thread.run_sync(count_memfds) == 0  # gone with the array


async def test_a_function_writes_to_its_own_copy_of_an_array_it_captured() -> None:
    """As with the copy it unpickled from its channel: a worker's writes reach neither
    the caller's array, nor another call, nor the pool's kept copy."""
    X = np.ones(N)

    def overwrite_captured(shard: ashard.Shard) -> float:
        X[:] = -1.0
        return float(X.sum())

    def total_captured(shard: ashard.Shard) -> float:
        return float(X.sum())

    async with ashard.Pool(2) as pool:
        assert (await pool.shard_map(4, overwrite_captured)).results == [-float(N)] * 4
        assert (await pool.shard_map(4, total_captured)).results == [float(N)] * 4
        assert (await pool.shard_map(4, overwrite_captured)).results == [-float(N)] * 4
    assert X.sum() == N


async def test_other_data_captured_under_the_same_name_or_at_the_same_address() -> None:
    async with ashard.Pool(2) as pool:
        for k in range(4):
            X = np.full(N, float(k))  # often lands where the last one was freed
            got = await pool.shard_map(2, closing_over(X))
            assert [t for t, _ in got.results] == [k * N] * 2
            del X
    for k in range(2):  # the default pool: a copy for each call, let go when it ends
        X = np.full(N, float(k))
        got = await ashard.shard_map(2, closing_over(X), workers=1)
        assert [t for t, _ in got.results] == [k * N] * 2
        assert await anyio.to_thread.run_sync(count_memfds) == 0


async def test_captured_arrays_past_the_descriptors_a_call_may_send_go_in_its_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ashard import _export

    monkeypatch.setattr(_export, "MAX_FDS", 2)
    arrays = [np.full(N, float(k)) for k in range(3)]
    B = np.full(N, 10.0)

    def totals(shard: ashard.Shard, B: np.ndarray) -> list[float]:
        return [float(a.sum()) for a in (*arrays, B)]

    async with ashard.Pool(1) as pool:
        got = await pool.shard_map(1, totals, borrow={"B": B})
    assert got.results == [[0.0, float(N), 2.0 * N, 10.0 * N]]


def sum_and_segment(X: np.ndarray, scale: float = 1.0) -> tuple[float, str]:
    return float(X.sum()) * scale, segment_of(X)


async def test_an_array_a_call_passes_is_shared_once_and_a_changed_one_again() -> None:
    X = np.arange(N, dtype=np.float64)
    async with ashard.Pool(1) as pool:
        total, first = await pool.call(sum_and_segment, X)
        assert total == float(X.sum())
        memfds = await anyio.to_thread.run_sync(count_memfds)
        assert await pool.call(sum_and_segment, X, scale=2.0) == (2.0 * X.sum(), first)
        assert await anyio.to_thread.run_sync(count_memfds) == memfds
        X *= 3
        total, changed = await pool.call(sum_and_segment, X)
        assert total == float(X.sum()) and changed != first
        assert await pool.call(closing_over(X), None) == (float(X.sum()), changed)
    assert await anyio.to_thread.run_sync(count_memfds) == 0


def overwrite_arg(X: np.ndarray) -> float:
    X[:] = -1.0
    return float(X.sum())


def writeable(X: np.ndarray) -> bool:
    return bool(X.flags.writeable)


async def test_a_call_writes_to_its_own_copy_of_an_array_it_was_passed() -> None:
    X = np.ones(N)
    async with ashard.Pool(1) as pool:
        assert await pool.call(overwrite_arg, X) == -float(N)
        assert (await pool.call(sum_and_segment, X))[0] == float(N)
        assert await pool.call(writeable, X)
        X.flags.writeable = False
        assert not await pool.call(writeable, X)  # as pickle gives it back: read-only
    assert X.sum() == N


async def test_calls_with_one_array_at_once_and_after_their_worker_died(tmp_path: Path) -> None:
    X = np.arange(N, dtype=np.float64)
    async with ashard.Pool(2) as pool:
        sums: list[float] = []

        async def run() -> None:
            sums.append((await pool.call(sum_and_segment, X))[0])

        async with anyio.create_task_group() as tg:
            for _ in range(12):
                tg.start_soon(run)
        assert sums == [float(X.sum())] * 12
        marker = tmp_path / "died"
        assert await pool.call(dies_once_then_sums, X, str(marker), max_retries=1) == X.sum()
        assert marker.exists()


def dies_once_then_sums(X: np.ndarray, marker: str) -> float:
    """Kill this worker the first time (the retry runs on a new one), then sum `X`."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(3)
    return float(X.sum())


async def test_an_array_with_no_room_for_a_segment_goes_with_its_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A captured array, or a call's argument, that cannot be copied into shared memory
    (ENOSPC, say) travels through the worker's channel, as it always could."""
    import errno

    def no_room(cls: type, array: np.ndarray) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ashard.SharedArray, "copy_of", classmethod(no_room))
    X = np.arange(N, dtype=np.float64)
    async with ashard.Pool(1) as pool:
        got = await pool.shard_map(2, closing_over(X))
        assert [t for t, _ in got.results] == [float(X.sum())] * 2
        assert (await pool.call(sum_and_segment, X))[0] == float(X.sum())
        assert await anyio.to_thread.run_sync(count_memfds) == 0
        with pytest.raises(OSError, match=r"borrow\['X'\]: No space left"):
            await pool.shard_map(1, total, borrow={"X": X})  # a borrow still says so


def test_the_memory_limit_is_the_tightest_cgroup_limit_above(tmp_path: Path) -> None:
    """`limit_bytes` (what bounds the idle copies) inside a cgroup with a memory limit."""
    import subprocess
    import sys

    from ashard._memory import limit_bytes, physical_bytes

    assert 0 < limit_bytes() <= physical_bytes()
    with open("/proc/self/cgroup") as f:
        lines = [line.split(":", 2) for line in f.read().splitlines()]
    v1 = [path for _, controllers, path in lines if "memory" in controllers.split(",")]
    if v1:
        folder = Path("/sys/fs/cgroup/memory" + v1[0].rstrip("/")) / f"ashard-test-{os.getpid()}"
        limit_file = "memory.limit_in_bytes"
    else:
        v2 = [path for _, controllers, path in lines if controllers == ""]
        folder = (
            Path("/sys/fs/cgroup" + (v2[0].rstrip("/") if v2 else "")) / f"ashard-{os.getpid()}"
        )
        limit_file = "memory.max"
    try:
        folder.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup here ({exc}): the host case above still ran")
    child = None
    try:
        (folder / limit_file).write_text(str(512 << 20))
        code = (
            "import sys; sys.stdin.readline(); "
            "from ashard._memory import limit_bytes; print(limit_bytes())"
        )
        child = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        (folder / "cgroup.procs").write_text(str(child.pid))
        out, _ = child.communicate("go\n", timeout=60)
        assert int(out) == min(512 << 20, physical_bytes())
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        folder.rmdir()

"""Shared inputs and outputs: zero-copy borrow, share(), buffer(), cow modes, lifetime."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import psutil
import pytest

import ashard
import workloads

pytestmark = pytest.mark.anyio

GiB = 1 << 30


def slice_sum_and_uss(shard: ashard.Shard, X: np.ndarray) -> tuple[int, int]:
    total = int(X[shard.idx.start : shard.idx.stop].sum())
    return total, psutil.Process().memory_full_info().uss


def worker_uss() -> int:
    return psutil.Process().memory_full_info().uss


def first_then_write(shard: ashard.Shard, X: np.ndarray) -> int:
    first = int(X[0])
    X[0] = -1
    return first


def read_first(shard: ashard.Shard, X: np.ndarray) -> int:
    return int(X[0])


def write_if_even(shard: ashard.Shard, X: np.ndarray) -> int:
    if shard.id % 2 == 0:
        X[shard.id] = 99
    return int(X[shard.id])


def fill_my_slice(shard: ashard.Shard, out: np.ndarray) -> None:
    out[shard.idx.start : shard.idx.stop] = np.arange(shard.idx.start, shard.idx.stop) * 3


def describe(shard: ashard.Shard, X: np.ndarray) -> tuple[str, tuple[int, ...], bool, float]:
    return str(X.dtype), X.shape, bool(X.flags.c_contiguous), float(np.real(X.sum()))


def table_summary(shard: ashard.Shard, T: object) -> tuple[str, int, float, bool]:
    """The table's type, rows, a column sum, and whether its data lies in an ashard segment."""
    import pyarrow as pa
    import pyarrow.compute as pc

    assert isinstance(T, pa.Table | pa.RecordBatch)
    column = T.column("x")
    chunk = column.chunk(0) if isinstance(column, pa.ChunkedArray) else column
    address = chunk.buffers()[1].address
    return type(T).__name__, T.num_rows, float(pc.sum(column).as_py()), in_segment(address)


def is_segment(name: str) -> bool:
    """A descriptor or mapping of an ashard segment: memfd, or the named fallback."""
    return "memfd:ashard-" in name or "/dev/shm/ashard-" in name


def in_segment(address: int) -> bool:
    with open("/proc/self/maps") as maps:
        for line in maps:
            span = line.split()[0]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= address < hi:
                return is_segment(line)
    return False


def weighted_sum(shard: ashard.Shard, X: np.ndarray) -> tuple[tuple[int, ...], int]:
    """Shape and an order-sensitive checksum: a misplaced chunk changes it."""
    flat = X.reshape(-1)
    return X.shape, int((flat * (np.arange(flat.size) % 7)).sum())


def count_memfds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += is_segment(os.readlink(f"/proc/self/fd/{fd}"))
    return n


async def test_borrowing_a_gib_array_costs_workers_no_copy() -> None:
    n = GiB // 8
    X = np.arange(n, dtype=np.int64)
    async with ashard.Pool(2) as pool:
        before = {}
        for _ in range(4):  # both workers, psutil imported in each
            before[await pool.call(os.getpid)] = await pool.call(worker_uss)
        layout = ashard.shards(n, block_size=n // 8)
        res = await pool.shard_map(layout, slice_sum_and_uss, borrow={"X": X})
    for shard, (total, _) in zip(res.shards, res.results, strict=True):
        lo, hi = shard.idx.start, shard.idx.stop
        assert total == (lo + hi - 1) * (hi - lo) // 2
    growth = max(uss for _, uss in res.results) - max(before.values())
    assert growth < 64 << 20, f"a worker's unique memory grew by {growth >> 20} MiB"


async def test_borrowed_arrays_are_read_only_under_deny() -> None:
    X = np.zeros(10)
    res = await ashard.shard_map(2, first_then_write, borrow={"X": X}, errors="collect", workers=2)
    assert len(res.failures) == 2
    for failure in res.failures:
        assert isinstance(failure.__cause__, ValueError)
        assert "read-only" in str(failure.__cause__)
    assert X[0] == 0


@pytest.mark.parametrize("chunk_size", [1, "auto"])
async def test_allow_writes_stay_private_to_the_shard(chunk_size: int | str) -> None:
    """Under cow="allow" a shard writes to a private copy: never seen by another shard
    (not even a later one of its worker's, in the same call), another call or the
    parent."""
    X = np.arange(10, dtype=np.int64)
    with ashard.share(X) as shared:
        async with ashard.Pool(2) as pool:
            res = await pool.shard_map(ashard.shards(20, block_size=1), first_then_write,
                                       borrow={"X": shared}, cow="allow",
                                       chunk_size=chunk_size)  # fmt: skip
            assert res.results == [0] * 20
            assert res.diagnostics.cow_writes == ()
            seen = await pool.shard_map(
                ashard.shards(20, block_size=1), read_first, borrow={"X": shared}
            )
        assert seen.results == [0] * 20  # no other call, worker or the parent saw it
        assert shared.array[0] == 0
    assert X[0] == 0


async def test_audit_lists_each_shard_that_wrote() -> None:
    X = np.zeros(40, dtype=np.int64)
    res = await ashard.shard_map(
        ashard.shards(40, block_size=1), write_if_even, borrow={"X": X}, cow="audit", workers=2
    )
    assert res.results == [99 if k % 2 == 0 else 0 for k in range(40)]
    assert res.diagnostics.cow_writes == tuple((k, "X") for k in range(0, 40, 2))
    assert not X.any()


async def test_out_buffer_collects_disjoint_writes_without_a_copy() -> None:
    n = 100_000
    with ashard.buffer(np.int64, n, fill=-1) as buf:
        view = buf.array
        res = await ashard.shard_map(
            ashard.shards(n, block_size=1000), fill_my_slice, out={"out": buf}, workers=2
        )
        assert res.ok
        assert len(res.diagnostics.workers) == 2
        assert np.array_equal(view, np.arange(n) * 3)  # the view taken before the call


async def test_a_buffer_in_borrow_is_shared_as_is() -> None:
    with ashard.buffer("f8", (100, 100)) as buf:
        buf.array[:] = np.arange(10_000).reshape(100, 100)
        memfds = await anyio.to_thread.run_sync(count_memfds)

        async def run() -> ashard.ShardResult:
            return await ashard.shard_map(4, describe, borrow={"X": buf}, workers=2)

        async with anyio.create_task_group() as tg:
            results: list[ashard.ShardResult] = []

            async def go() -> None:
                results.append(await run())

            tg.start_soon(go)
            while not results:
                # no new segment: nothing was copied
                assert await anyio.to_thread.run_sync(count_memfds) == memfds
                await anyio.sleep(0.005)
    assert results[0].results == [("float64", (100, 100), True, float(np.arange(10_000).sum()))] * 4


async def test_shared_array_is_reused_across_calls_and_closes() -> None:
    X = np.arange(1000, dtype=np.float32)
    shared = ashard.share(X)
    async with ashard.Pool(2) as pool:
        for _ in range(3):
            res = await pool.shard_map(2, describe, borrow={"X": shared})
            assert res.results[0] == ("float32", (1000,), True, float(X.sum()))
        shared.close()
        shared.close()  # twice is fine
        with pytest.raises(ValueError, match=r"borrow\['X'\] is a closed SharedArray"):
            await pool.shard_map(2, describe, borrow={"X": shared})
    assert shared.closed and await anyio.to_thread.run_sync(count_memfds) == 0


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.int8).reshape(2, 3, 4),
        np.array([True, False, True]),
        np.arange(6, dtype=np.complex128) * 1j,
        np.arange(100, dtype=np.float64)[::3],  # not contiguous
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.zeros((0, 5)),
    ],
    ids=["int8-3d", "bool", "complex", "strided", "fortran", "empty"],
)
async def test_any_numeric_dtype_and_shape_arrives_intact(array: np.ndarray) -> None:
    res = await ashard.shard_map(1, describe, borrow={"X": array}, workers=1)
    assert res.results == [(str(array.dtype), array.shape, True, float(np.real(array.sum())))]


async def test_arrow_tables_and_batches_are_mapped_zero_copy() -> None:
    import pyarrow as pa

    x = np.arange(100_000, dtype=np.float64)
    table = pa.table({"x": x, "name": [str(k) for k in range(len(x))]})
    batch = pa.record_batch({"x": x})
    async with ashard.Pool(2) as pool:
        for data, kind in [(table, "Table"), (batch, "RecordBatch")]:
            res = await pool.shard_map(4, table_summary, borrow={"T": data})
            assert res.results == [(kind, len(x), float(x.sum()), True)] * 4
    assert await anyio.to_thread.run_sync(count_memfds) == 0  # auto-shared, then released


async def test_shared_table_is_reused_across_calls_and_closes() -> None:
    import pyarrow as pa

    table = pa.table({"x": np.arange(1000, dtype=np.int64)})
    shared = ashard.share(table)
    assert isinstance(shared, ashard.SharedTable)
    assert shared.table.equals(table)
    async with ashard.Pool(2) as pool:
        for _ in range(3):
            res = await pool.shard_map(2, table_summary, borrow={"T": shared})
            assert res.results == [("Table", 1000, float(np.arange(1000).sum()), True)] * 2
        with shared:
            pass
        with pytest.raises(ValueError, match=r"borrow\['T'\] is a closed SharedTable"):
            await pool.shard_map(2, table_summary, borrow={"T": shared})
    assert shared.closed and await anyio.to_thread.run_sync(count_memfds) == 0
    with pytest.raises(TypeError, match="numpy array or a pyarrow Table"):
        ashard.share([1, 2, 3])


def named_in_dev_shm() -> list[str]:
    return [n for n in os.listdir("/dev/shm") if "ashard" in n]


def mapped_segment_names(shard: ashard.Shard, X: np.ndarray, out: np.ndarray) -> list[str]:
    with open("/proc/self/maps") as maps:
        return sorted({line.split(None, 5)[-1].strip() for line in maps if is_segment(line)})


async def test_named_fallback_is_unlinked_while_workers_map_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ASHARD_SHM", "named")
    X = np.arange(100_000, dtype=np.int64)
    async with ashard.Pool(2) as pool:
        with ashard.share(X) as shared, ashard.buffer(np.int64, 1000) as buf:
            assert not await anyio.to_thread.run_sync(named_in_dev_shm)
            res = await pool.shard_map(
                4, mapped_segment_names, borrow={"X": shared}, out={"out": buf}
            )
            for names in res.results:
                assert len(names) == 2  # the borrowed array and the out buffer
                assert all(n.startswith("/dev/shm/ashard-") and "(deleted)" in n for n in names)
            layout = ashard.shards(len(X), block_size=25_000)
            total = await pool.shard_map(layout, slice_sum_and_uss, borrow={"X": shared})
            assert sum(t for t, _ in total.results) == int(X.sum())
    assert await anyio.to_thread.run_sync(count_memfds) == 0


async def test_a_memmap_cut_short_fails_by_name_and_the_caller_lives_on(tmp_path: Path) -> None:
    path = tmp_path / "cut"
    m = np.memmap(path, dtype=np.float64, mode="w+", shape=(100_000,))
    m[:] = 1.0
    m.flush()
    os.truncate(path, 4 * 4096)  # reading past this would be a SIGBUS in the caller
    with pytest.raises(OSError, match=r"borrow\['X'\]: .*cut short"):
        await ashard.shard_map(2, describe, borrow={"X": m}, workers=1)
    with pytest.raises(OSError, match=r"share\(\)'s array: .*cut short"):
        ashard.share(m)
    assert await anyio.to_thread.run_sync(count_memfds) == 0  # the segments went with it


def maps_library(pid: int, name: str) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        return name in maps.read()


@pytest.mark.parametrize("kind", ["array", "table"])
async def test_a_call_borrowing_data_has_every_worker_import_what_reads_it(kind: str) -> None:
    import pyarrow as pa

    library = "_multiarray_umath" if kind == "array" else "libarrow."
    data = np.arange(1000, dtype=np.int64)
    fn = describe if kind == "array" else table_summary
    borrowed = data if kind == "array" else pa.table({"x": data})
    with anyio.fail_after(60):
        async with ashard.Pool(2) as pool:
            assert not any(maps_library(pid, library) for pid in pool.pids)  # not at start
            res = await pool.shard_map(1, fn, borrow={"X" if kind == "array" else "T": borrowed})
            assert res.ok  # one worker ran it; the other imports it in its turn, all the same
            while not all(maps_library(pid, library) for pid in pool.pids):  # noqa: ASYNC110 (another process)
                await anyio.sleep(0.01)


@pytest.mark.timeout(60)
async def test_a_worker_imports_what_it_is_asked_to_preload_in_its_turn() -> None:
    # the parent asks its workers to import numpy while it copies a borrowed array
    from ashard._framing import encode
    from ashard._handle import WorkerConfig, WorkerHandle
    from ashard._protocol import ITEMS, JOB, RUN, JobSpec
    from ashard._reports import receive
    from ashard._serialize import pack

    probe = "'numpy' in __import__('sys').modules"
    w = await WorkerHandle.start(WorkerConfig())
    try:
        spec = JobSpec(ITEMS, pack(eval), None, None, None, None, list(sys.path))

        async def ask(seq: int) -> object:
            await w.channel.send(encode((RUN, 7, seq, seq, 1, None, pack([probe]), None)))
            answers: list = []
            while not answers:
                answers = await receive(w)
            [(report, values)] = answers
            assert report.seq == seq and not report.errors
            return values[0]

        await w.channel.send(encode((JOB, 7, spec)))
        assert await ask(0) is False  # a worker starts without numpy
        w.preload(["numpy", "no_such_module_anywhere"])  # one that fails is passed over
        w.preload(["numpy"])  # asked once
        assert await ask(1) is True
        assert await ask(2) is True
    finally:
        w.close_channel()
        with anyio.CancelScope(shield=True):
            await w.kill()


@pytest.mark.parametrize("layout", ["strided", "fortran"])
async def test_large_arrays_copied_by_several_threads_arrive_intact(layout: str) -> None:
    from ashard._shm import PARALLEL_COPY_BYTES

    base = np.arange(3 * PARALLEL_COPY_BYTES // 8, dtype=np.int64)
    array = base[::2] if layout == "strided" else np.asfortranarray(base.reshape(-1, 3))
    assert array.nbytes >= PARALLEL_COPY_BYTES and not array.flags.c_contiguous
    res = await ashard.shard_map(1, weighted_sum, borrow={"X": array}, workers=1)
    assert res.results == [weighted_sum(None, np.ascontiguousarray(array))]  # type: ignore[arg-type]


def test_the_copy_threads_run_nicer_than_the_caller() -> None:
    import threading

    from ashard._shm import COPY_NICE, PARALLEL_COPY_BYTES, copy_into_segment

    caller = os.getpriority(os.PRIO_PROCESS, 0)
    segment = copy_into_segment(np.ones(PARALLEL_COPY_BYTES // 8, dtype=np.float64))
    segment.close()
    copiers = [t.native_id for t in threading.enumerate() if t.name.startswith("ashard-copy")]
    assert copiers
    assert {os.getpriority(os.PRIO_PROCESS, tid) for tid in copiers if tid} == {
        min(caller + COPY_NICE, 19)
    }
    assert os.getpriority(os.PRIO_PROCESS, 0) == caller  # the caller's own thread is as it was


async def test_replacement_worker_gets_the_shared_inputs() -> None:
    X = np.arange(1000, dtype=np.int64)
    res = await ashard.shard_map(
        ashard.shards(8, block_size=1), workloads.die_first_attempt_sum, borrow={"X": X}, workers=2
    )
    assert res.results == [int(X.sum())] * 8
    assert res.diagnostics.crashes >= 1


async def test_a_shared_array_closed_during_a_call_still_reaches_a_joining_worker(
    tmp_path: Path,
) -> None:
    """Closed while a call uses it, a `SharedArray` stays that call's until it ends: a
    worker that joins later (a crashed one's replacement) gets this array's data, never
    what its descriptor's number names after the close (another array, shared at once)."""
    X = np.arange(1 << 16, dtype=np.int64)
    shared = ashard.share(X)
    borrow = {"X": shared, "directory": str(tmp_path)}
    got: list[Any] = []
    with anyio.fail_after(60):
        async with ashard.Pool(1) as pool:
            done = anyio.Event()

            async def call() -> None:
                res = await pool.shard_map(
                    ashard.shards(4, block_size=1), workloads.sum_once_released, borrow=borrow
                )
                got.extend(res.results)
                assert res.diagnostics.crashes == 1
                done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                while not (tmp_path / "started-0").exists():  # noqa: ASYNC110 (a file)
                    await anyio.sleep(0.01)
                shared.close()
                assert shared.closed
                with ashard.share(np.zeros_like(X)) as other:  # may take the number
                    (tmp_path / "release").touch()
                    await done.wait()
                    assert other.array.sum() == 0
    assert got == [int(X.sum())] * 4
    assert await anyio.to_thread.run_sync(count_memfds) == 0


async def test_objects_that_are_not_arrays_are_still_pickled() -> None:
    res = await ashard.shard_map(
        2, workloads.shard_sum_plus, borrow={"offset": 5, "table": {"a": 1}}, workers=1
    )
    assert res.ok


async def test_bad_shared_arguments_are_refused_before_running() -> None:
    X = np.zeros(4)
    with ashard.buffer("i4", 4) as buf:
        with pytest.raises(ValueError, match="'X' is both in borrow and in out"):
            await ashard.shard_map(2, describe, borrow={"X": X}, out={"X": buf})
        with pytest.raises(TypeError, match=r"out\['y'\] must be an ashard.Buffer"):
            await ashard.shard_map(2, describe, borrow={"X": X}, out={"y": X})
    with pytest.raises(ValueError, match=r"out\['y'\] is a closed Buffer"):
        await ashard.shard_map(2, describe, borrow={"X": X}, out={"y": buf})
    with pytest.raises(TypeError, match="buffer dtype must be numeric or bool"):
        ashard.buffer(object, 3)
    with pytest.raises(ValueError, match="buffer shape must not be negative"):
        ashard.buffer("f8", (3, -1))
    with pytest.raises(TypeError, match="numeric or bool dtype"):
        ashard.share(np.array(["a", "b"], dtype=object))


@pytest.mark.parametrize("backend", ["memfd", "named"])
def test_parent_killed_mid_call_leaves_no_worker_and_no_segment(
    tmp_path: Path, backend: str
) -> None:
    script = tmp_path / "victim.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, time
            import anyio, numpy as np
            import ashard

            def slow(shard, X):
                time.sleep(60)

            async def main():
                async with ashard.Pool(2) as pool:
                    print(" ".join(map(str, pool.pids)), flush=True)
                    await pool.shard_map(4, slow, borrow={"X": np.ones(50_000_000 // 8)})

            anyio.run(main)
            """
        )
    )
    shm_before = set(named_in_dev_shm())
    env = {**os.environ, "ASHARD_SHM": backend}
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        time.sleep(1.0)  # the call is running: the array is shared and mapped
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
            time.sleep(0.05)
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        assert not alive, f"workers outlived their parent: {alive}"
        assert set(named_in_dev_shm()) - shm_before == set()  # other programs' come and go
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

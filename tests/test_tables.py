"""Table sinks and results stores: one file per shard, committed atomically and exactly
once whatever the workers do (crash after writing, time out, fail, get cancelled),
schemas checked, local and on S3; results="table" and "disk"; shard_reduce."""

from __future__ import annotations

import functools
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from pyarrow import fs as pafs

import ashard
import workloads
from s3server import Bucket

pytestmark = pytest.mark.anyio

asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])


def assert_exactly_once(sink: ashard.TableSink, ok_ids: set[int], layout: ashard.Shards) -> None:
    """The sink's directory holds one committed file per shard in `ok_ids`, nothing
    hidden or partial, and each of those shards' rows exactly once."""
    names = sorted(os.listdir(sink.path))
    assert not [n for n in names if n.startswith(".")], names
    ext = "parquet" if sink.format == "parquet" else "arrow"
    assert names == [f"part-{i:06d}.{ext}" for i in sorted(ok_ids)]
    assert [r.shard_id for r in sink.refs] == sorted(ok_ids)
    fmt = "parquet" if sink.format == "parquet" else "ipc"
    table = pads.dataset(sink.path, format=fmt).to_table()  # plain pyarrow, no ashard
    want = sorted(i for s in ok_ids for i in layout[s].idx for _ in range(2))
    assert sorted(table.column("id").to_pylist()) == want
    assert sink.read().num_rows == len(want)


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
async def test_sink_writes_one_file_per_shard_in_shard_order(fmt: str) -> None:
    layout = ashard.shards(40, block_size=5)
    with anyio.fail_after(60), ashard.table_sink(format=fmt) as sink:  # type: ignore[arg-type]
        res = await ashard.shard_map(layout, workloads.write_rows, out={"rows": sink}, workers=2)
        assert res.results == list(range(8))
        assert_exactly_once(sink, set(range(8)), layout)
        refs = sink.refs
        assert [r.rows for r in refs] == [10] * 8  # two writes of five rows
        assert all(r.bytes == os.path.getsize(r.path) for r in refs)
        assert refs[3].read().column("id").to_pylist() == [15, 16, 17, 18, 19] * 2
        assert sink.read().column("id").to_pylist()[:10] == [0, 1, 2, 3, 4] * 2  # shard order
        assert isinstance(sink.dataset(), pads.Dataset)
        path = sink.path
    assert not os.path.exists(path)  # a temporary sink goes with close()


async def test_empty_writes_commit_a_file_and_no_write_commits_none(tmp_path: str) -> None:
    target = os.path.join(tmp_path, "out")
    with anyio.fail_after(60):
        sink = ashard.table_sink(target)
        await ashard.shard_map(4, workloads.write_empty, out={"rows": sink}, workers=2)
        assert [(r.shard_id, r.rows) for r in sink.refs] == [(0, 0), (2, 1), (3, 1)]
        sink.close()
    assert sorted(os.listdir(target)) == ["part-000000.parquet", "part-000002.parquet",
                                          "part-000003.parquet"]  # fmt: skip


@pytest.mark.parametrize("how", ["sigkill", "exit"])
async def test_crash_after_writing_rows_keeps_them_once(how: str) -> None:
    layout = ashard.shards(20, block_size=5)
    async with ashard.Pool(2) as pool:
        with anyio.fail_after(60), ashard.table_sink() as sink:
            fn = functools.partial(workloads.write_then, how=how)
            res = await pool.shard_map(layout, fn, out={"rows": sink}, chunk_size=1)
            assert res.ok and res.diagnostics.crashes == 1
            assert_exactly_once(sink, {0, 1, 2, 3}, layout)
            assert sink.refs[1].read().column("attempt").to_pylist() == [2] * 10


async def test_a_shard_that_always_crashes_leaves_nothing() -> None:
    layout = ashard.shards(20, block_size=5)
    with anyio.fail_after(60), ashard.table_sink() as sink:
        fn = functools.partial(workloads.write_then, how="sigkill", always=True)
        res = await ashard.shard_map(layout, fn, out={"rows": sink}, workers=2, chunk_size=1,
                                     max_retries=1, errors="collect")  # fmt: skip
        assert [f.shard_id for f in res.failures] == [1]
        assert isinstance(res.failures[0], ashard.WorkerCrashed)
        assert_exactly_once(sink, {0, 2, 3}, layout)


async def test_timeout_after_writing_keeps_rows_once() -> None:
    layout = ashard.shards(20, block_size=5)
    with anyio.fail_after(60), ashard.table_sink() as sink:
        fn = functools.partial(workloads.write_then, how="sleep")
        res = await ashard.shard_map(layout, fn, out={"rows": sink}, workers=2, chunk_size=1,
                                     timeout=1.0)  # fmt: skip
        assert res.ok and res.diagnostics.timeouts == 1
        assert_exactly_once(sink, {0, 1, 2, 3}, layout)


async def test_collect_with_a_shard_that_always_fails_after_writing() -> None:
    layout = ashard.shards(20, block_size=5)
    with anyio.fail_after(60), ashard.table_sink(format="arrow") as sink:
        fn = functools.partial(workloads.write_then, how="raise", always=True)
        res = await ashard.shard_map(layout, fn, out={"rows": sink}, workers=2,
                                     errors="collect", retry_errors=True,
                                     max_retries=2)  # fmt: skip
        assert [f.shard_id for f in res.failures] == [1]
        assert res.failures[0].attempts == 3
        assert_exactly_once(sink, {0, 2, 3}, layout)


async def test_cancellation_keeps_committed_partitions_and_nothing_else() -> None:
    layout = ashard.shards(30, block_size=5)
    with ashard.table_sink() as sink:
        with anyio.move_on_after(4.0) as scope:
            await ashard.shard_map(layout, workloads.write_then_sleep, out={"rows": sink},
                                   workers=2, chunk_size=1)  # fmt: skip
        assert scope.cancelled_caught
        assert_exactly_once(sink, {0, 1}, layout)


async def test_schema_given_casts_safely_and_refuses_what_does_not_fit() -> None:
    schema = pa.schema([("x", pa.int64())])
    with anyio.fail_after(60):
        for kind, fields in [("int32", None), ("float", ["x"]), ("string", ["x"]),
                             ("extra", ["y"]), ("renamed", ["x", "z"])]:  # fmt: skip
            with ashard.table_sink(schema=schema) as sink:
                fn = functools.partial(workloads.write_typed, kind=kind)
                res = await ashard.shard_map(3, fn, out={"rows": sink}, errors="collect")
                if fields is None:
                    assert res.ok and sink.read().schema == schema
                    continue
                (failure,) = res.failures
                assert isinstance(failure, ashard.ShardFailed) and failure.shard_id == 1
                cause = failure.__cause__
                assert isinstance(cause, ashard.SchemaMismatch) and isinstance(cause, ValueError)
                assert list(cause.fields) == fields, (kind, cause)
                for name in fields:
                    assert repr(name) in str(cause)
                assert [r.shard_id for r in sink.refs] == [0, 2]


async def test_without_schema_the_first_committed_partition_sets_it() -> None:
    with anyio.fail_after(60), ashard.table_sink() as sink:
        fn = functools.partial(workloads.write_typed, kind="string")
        res = await ashard.shard_map(3, fn, out={"rows": sink}, workers=1, chunk_size=1,
                                     errors="collect")  # fmt: skip
        (failure,) = res.failures
        assert failure.shard_id == 1 and isinstance(failure.__cause__, ashard.SchemaMismatch)
        assert "'x'" in str(failure.__cause__) and failure.__cause__.fields == ("x",)
        assert [r.shard_id for r in sink.refs] == [0, 2]
        assert sorted(os.listdir(sink.path)) == ["part-000000.parquet", "part-000002.parquet"]
        assert sink.read().column("x").type == pa.int64()


async def test_write_of_an_unsupported_type_fails_that_shard_naming_it() -> None:
    with anyio.fail_after(60), ashard.table_sink() as sink:
        res = await ashard.shard_map(2, workloads.write_bad, out={"rows": sink}, errors="collect")
        assert len(res.failures) == 2
        cause = res.failures[0].__cause__
        assert isinstance(cause, TypeError)
        assert "list" in str(cause) and "pyarrow Table" in str(cause)
        assert sink.refs == [] and os.listdir(sink.path) == []  # nothing kept of failed shards


async def test_sink_on_s3(s3: Bucket) -> None:
    layout = ashard.shards(20, block_size=5)
    with anyio.fail_after(90):
        by_uri = ashard.table_sink(s3.uri("by-uri"))
        fn = functools.partial(workloads.write_then, how="sigkill")
        res = await ashard.shard_map(layout, fn, out={"rows": by_uri}, workers=2, chunk_size=1)
        assert res.ok and res.diagnostics.crashes == 1
        infos = s3.fs.get_file_info(pafs.FileSelector(s3.path("by-uri")))
        names = sorted(i.base_name for i in infos)
        assert names == [f"part-{i:06d}.parquet" for i in range(4)]
        assert sorted(by_uri.read().column("id").to_pylist()) == sorted(list(range(20)) * 2)
        assert by_uri.refs[1].read().column("attempt").to_pylist() == [2] * 10

        given = ashard.table_sink(s3.path("given"), filesystem=s3.fs, format="arrow")
        await ashard.shard_map(layout, workloads.write_rows, out={"rows": given}, workers=2)
        assert given.dataset().count_rows() == 40
        with pytest.raises(ValueError, match="not empty"):
            ashard.table_sink(s3.path("given"), filesystem=s3.fs)


# -- results="table" / "disk" -------------------------------------------------------------


async def test_results_table() -> None:
    layout = ashard.shards(30, block_size=5)
    with await ashard.shard_map(layout, workloads.table_of, results="table") as res:
        assert [r is None for r in res.refs] == [False, True, False, False, False, False]
        assert res.results[1] is None
        assert res.results[2].column("id").to_pylist() == [10, 11, 12, 13, 14]
        table = res.table()
        assert table.column("id").to_pylist() == [i for i in range(30) if not 5 <= i < 10]
        assert res.dataset().count_rows() == 25
        with pytest.raises(ashard.GatherTooLarge, match="max_bytes=100") as info:
            res.table(max_bytes=100)
        assert isinstance(info.value, ValueError) and info.value.size > 100
        for bad in (0, -1, "1GB"):
            with pytest.raises((TypeError, ValueError), match="max_bytes"):
                res.table(max_bytes=bad)  # type: ignore[arg-type]
        directory = os.path.dirname(res.refs[0].path)
    assert not os.path.exists(directory)


@asyncio_only
async def test_results_disk_keeps_parent_memory_flat() -> None:
    me = psutil.Process()
    with anyio.fail_after(120):
        async with ashard.Pool(2) as pool:
            await pool.shard_map(4, workloads.blob)  # warm up
            before = me.memory_info().rss
            many = ashard.shards(2000, block_size=1)
            res = await pool.shard_map(many, workloads.blob, results="disk", chunk_size=10)
            grown = me.memory_info().rss - before
            with res:
                assert len(res.results) == 2000 and res.ok
                assert grown < 60 * 2**20, grown  # the values total 400 MB
                assert res.results[1234][:4] == (1234).to_bytes(4, "little")
                assert res.refs[7].load() == workloads.blob(many[7])
                assert sum(r.bytes for r in res.refs) > 400_000_000


async def test_results_disk_none_failures_and_results_path(tmp_path: str) -> None:
    target = os.path.join(tmp_path, "kept")
    with anyio.fail_after(60):
        six = ashard.shards(6, block_size=1)
        res = await ashard.shard_map(six, workloads.fail_on, results="disk", results_path=target,
                                     errors="collect")  # fmt: skip
        with res:
            assert res.refs[3] is None and res.results[3] is None
            assert res.results[4] == 4
        assert sorted(os.listdir(target)) == [f"result-{i:06d}.pickle" for i in (0, 1, 2, 4, 5)]
        with pytest.raises(ValueError, match="not empty"):
            await ashard.shard_map(six, workloads.fail_on, results="disk", results_path=target)
        with pytest.raises(ValueError, match="results_path"):
            await ashard.shard_map(six, workloads.fail_on, results_path=str(tmp_path) + "/x")
        with pytest.raises(ValueError, match="results must be one of"):
            await ashard.shard_map(six, workloads.fail_on, results="x")  # type: ignore[typeddict-item]


def _results_dirs() -> set[str]:
    tmp = tempfile.gettempdir()
    return {os.path.join(tmp, n) for n in os.listdir(tmp) if n.startswith("ashard-results-")}


def _wrote_a_result(dirs: set[str]) -> bool:
    return any(n.startswith("result-") for d in dirs for n in os.listdir(d))


async def test_a_cancelled_calls_results_go_at_once_and_a_cancelled_retrys_stay() -> None:
    """A `shard_map` cancelled mid-run gives nobody its results: its temporary directory
    goes as the cancellation leaves the call, not whenever a reference cycle holding
    the call is collected (the collector is off here to tell the two apart). A
    cancelled `retry_failed` writes into its first run's directory: that one stays."""
    gc.disable()
    try:
        with anyio.fail_after(60):
            async with ashard.Pool(2) as pool:
                before = _results_dirs()
                slow = functools.partial(workloads.python_sleep, victim=1)  # 60 s
                async with anyio.create_task_group() as tg:
                    call = functools.partial(pool.shard_map, results="disk")
                    tg.start_soon(call, ashard.shards(6, block_size=1), slow)
                    while not _wrote_a_result(_results_dirs() - before):  # noqa: ASYNC110
                        await anyio.sleep(0.01)  # (files: nothing to wait on)
                    tg.cancel_scope.cancel()
                assert _results_dirs() == before

                six = ashard.shards(6, block_size=1)
                first = await pool.shard_map(six, workloads.fail_on, results="disk",
                                             errors="collect")  # fmt: skip
                with first:
                    assert [f.shard_id for f in first.failures] == [3]
                    stuck = functools.partial(workloads.python_sleep, victim=3)
                    with anyio.move_on_after(0.5) as scope:
                        await ashard.retry_failed(first, stuck, pool=pool)
                    assert scope.cancelled_caught
                    assert first.results[5] == 5 and first.refs[0] is not None
                    assert first.refs[0].load() == 0
    finally:
        gc.enable()


async def test_stream_yields_refs_that_live_until_the_block_ends() -> None:
    with anyio.fail_after(60):
        async with ashard.shard_stream(20, workloads.shard_sum, results="disk") as stream:
            refs = [done.value async for done in stream]
            assert all(isinstance(r, ashard.ResultRef) for r in refs)
            assert sorted(r.load() for r in refs) == sorted(workloads.shard_sum(s)
                                                           for s in ashard.shards(20))  # fmt: skip
            directory = os.path.dirname(refs[0].path)
    assert not os.path.exists(directory)


# -- large arrays through shared memory -----------------------------------------------------


def _anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


@asyncio_only
async def test_a_200_mb_array_arrives_without_a_copy_in_the_parent() -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(1) as pool:
            before = _anon_bytes()
            res = await pool.shard_map(1, functools.partial(workloads.big_array, mib=200))
            (array,) = res.results
            grown = _anon_bytes() - before
            assert grown < 20 * 2**20, grown  # the array's pages are the worker's segment
            assert array.shape == (200 * 2**20 // 8,) and array[-1] == array.size - 1
            assert array.flags.writeable and array.flags.owndata is False
            array[:10] = -1  # an ordinary, writable array (copy-on-write pages)
            assert array[0] == -1
            fortran = await pool.call(workloads.make_big_array, 16, "F")
            assert fortran.flags.f_contiguous and not fortran.flags.c_contiguous
            assert np.array_equal(fortran, workloads.make_big_array(16, "F"))
            del array, res, fortran
            with open("/proc/self/maps") as f:
                assert "ashard-result" not in f.read()  # freed with the arrays


async def test_a_large_result_neither_c_nor_fortran_ordered_arrives_intact() -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(1) as pool:
            strided = await pool.call(workloads.every_other, workloads.make_big_array, 16)
    assert np.array_equal(strided, workloads.make_big_array(16)[::2])
    assert strided.flags.c_contiguous  # the segment holds it in C order


async def test_a_worker_dying_mid_transfer_leaks_no_segment(tmp_path: str) -> None:
    armed = os.path.join(tmp_path, "armed")
    open(armed, "w").close()
    fn = functools.partial(workloads.shard_dying_mid_array_once, armed=armed)
    with anyio.fail_after(60):
        res = await ashard.shard_map(ashard.shards(4, block_size=1), fn, workers=2)
    assert res.results == [0, 10, 20, 30] and res.diagnostics.crashes == 1
    assert os.path.exists(armed + ".claimed")
    # the leak check after the test fails it if the segment's descriptor stayed open


async def test_small_and_nested_arrays_take_the_socket() -> None:
    with anyio.fail_after(30):
        value = await ashard.call(workloads.identity, {"a": np.arange(300_000.0)})
        assert np.array_equal(value["a"], np.arange(300_000.0))
        small = await ashard.call(workloads.identity, np.arange(1000))
        assert small.flags.owndata or small.base is not None


# -- shard_reduce ---------------------------------------------------------------------------


def _add(acc: float, value: float) -> float:
    return acc + value


async def test_ordered_reduce_is_bit_identical_across_workers_and_chunks() -> None:
    layout = ashard.shards(400, block_size=1)
    expected = 0.0
    for shard in layout:
        expected = expected + workloads.floats_of(shard)
    with anyio.fail_after(90):
        for workers, chunk in [(1, 1), (2, 7), (2, "auto")]:
            red = await ashard.shard_reduce(layout, workloads.floats_of, _add, init=0.0,
                                            ordered=True, workers=workers, chunk_size=chunk,
                                            max_pending=16)  # fmt: skip
            assert red.ok and red.value == expected  # bit-identical, not approximately
        unordered = await ashard.shard_reduce(layout, workloads.floats_of, _add)
        assert unordered.value == pytest.approx(expected)


async def test_ordered_reduce_holds_at_most_max_pending_values(tmp_path: str) -> None:
    log = os.path.join(tmp_path, "ends.log")
    fn = functools.partial(workloads.slow_first_logged, log=log)
    with anyio.fail_after(60):
        red = await ashard.shard_reduce(ashard.shards(40, block_size=1), fn, _add, ordered=True,
                                        max_pending=4, workers=2, chunk_size=1)  # fmt: skip
    assert red.value == sum(range(40))
    with open(log) as f:
        ends = dict(line.split() for line in f)
    first = float(ends.pop("0"))
    early = [s for s, t in ends.items() if float(t) < first]
    assert len(early) <= 4, early  # waiting for shard 0, no more than max_pending ran ahead


async def test_reduce_with_crashes_failures_and_a_failing_combine() -> None:
    six = ashard.shards(6, block_size=1)
    with anyio.fail_after(60):
        red = await ashard.shard_reduce(six, workloads.die_first_attempt, _add, init=0,
                                        ordered=True, chunk_size=1)  # fmt: skip
        assert red.value == sum(i * 10 for i in range(6)) and red.diagnostics.crashes == 1
        red = await ashard.shard_reduce(six, workloads.fail_on, _add, errors="collect")
        assert red.value == sum(i for i in range(6) if i != 3)
        assert [f.shard_id for f in red.failures] == [3] and not red.ok
        with pytest.raises(ashard.ShardMapError) as info:
            await ashard.shard_reduce(six, workloads.fail_on, _add)
        assert isinstance(info.value.result, ashard.ReduceResult)

        def boom(acc: int, value: int) -> int:
            raise ZeroDivisionError("combine broke")

        with pytest.raises(ZeroDivisionError, match="combine broke"):
            await ashard.shard_reduce(six, workloads.shard_sum, boom)


# -- bad input ----------------------------------------------------------------------------


async def test_bad_sink_input_is_refused_before_anything_runs(tmp_path: str) -> None:
    full = os.path.join(tmp_path, "full")
    os.makedirs(full)
    open(os.path.join(full, "data.csv"), "w").close()
    with pytest.raises(ValueError, match="not empty"):
        ashard.table_sink(full)
    with pytest.raises(ValueError, match="format"):
        ashard.table_sink(format="csv")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="schema"):
        ashard.table_sink(schema={"x": "int64"})  # type: ignore[arg-type]
    with anyio.fail_after(60):
        sink = ashard.table_sink()
        sink.close()
        with pytest.raises(ValueError, match="closed TableSink"):
            await ashard.shard_map(2, workloads.write_rows, out={"rows": sink})
        with ashard.table_sink() as sink, pytest.raises(TypeError, match="out="):
            await ashard.shard_map(2, workloads.write_rows, borrow={"rows": sink})
        with ashard.table_sink() as sink:
            with pytest.raises(TypeError, match="pickled"):
                await ashard.shard_map(2, workloads.shard_sum_taking_any, borrow={"x": [sink]})
            assert not os.path.exists(sink.path)  # made when a call starts writing
            await ashard.shard_map(2, workloads.write_rows, out={"rows": sink})
            with pytest.raises(ValueError, match="already holds the output"):
                await ashard.shard_map(2, workloads.write_rows, out={"rows": sink})


async def test_a_sink_used_by_two_concurrent_calls_is_refused() -> None:
    errors: list[BaseException] = []

    async def run(sink: ashard.TableSink) -> None:
        try:
            fn = functools.partial(workloads.write_then_sleep, quick=4)
            await ashard.shard_map(4, fn, out={"rows": sink})
        except ValueError as exc:
            errors.append(exc)

    with anyio.fail_after(60), ashard.table_sink() as sink:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, sink)
            tg.start_soon(run, sink)
        assert len(errors) == 1 and "in use by another call" in str(errors[0])
        assert len(sink.refs) == len(ashard.shards(4))


async def test_a_temporary_sink_closed_during_its_call_goes_once_the_call_is_over(
    tmp_path: Path,
) -> None:
    """Closing a temporary sink while its call writes puts the removal off to the call's
    end: every shard still commits, and then the directory goes (it went at once, and a
    shard failed naming the part file it could not write)."""
    with anyio.fail_after(60):
        sink = ashard.table_sink()
        fn = functools.partial(workloads.write_rows_once_released, directory=str(tmp_path))
        async with anyio.create_task_group() as tg:
            results: list[Any] = []

            async def run() -> None:
                results.append(await ashard.shard_map(3, fn, out={"rows": sink}, workers=1))

            tg.start_soon(run)
            while not (tmp_path / "started-0").exists():  # noqa: ASYNC110 (a worker writes it)
                await anyio.sleep(0.01)
            sink.close()
            assert sink.closed and os.path.isdir(sink.path)
            (tmp_path / "release").touch()
        assert results[0].ok and len(sink.refs) == len(ashard.shards(3))
        assert not os.path.exists(sink.path)
        with pytest.raises(ValueError, match="closed"):
            sink.read()


def _contents(path: str) -> dict[str, bytes]:
    return {name: open(os.path.join(path, name), "rb").read() for name in os.listdir(path)}


async def test_two_sinks_made_on_one_empty_directory_never_overwrite_each_other(
    tmp_path: str,
) -> None:
    """`table_sink()` looks at its directory when it is made; a second sink made there
    before the first one's call wrote must not replace (or sweep) what that call kept."""
    path = os.path.join(tmp_path, "rows")
    first, second = ashard.table_sink(path), ashard.table_sink(path)  # both: empty then
    layout = ashard.shards(4)
    with anyio.fail_after(60):
        async with ashard.Pool(2) as pool:
            await pool.shard_map(layout, workloads.write_rows, out={"rows": first})
            kept = _contents(path)
            other = functools.partial(workloads.write_rows, times=1)  # other files
            with pytest.raises(ValueError, match=r"out\['rows'\]: table_sink path .* not empty"):
                await pool.shard_map(layout, other, out={"rows": second})
            assert _contents(path) == kept  # nothing ran
            assert second.refs == []
            assert_exactly_once(first, set(range(len(layout))), layout)


@pytest.mark.parametrize("where", ["table_sink", "results_path"])
async def test_two_running_calls_never_write_one_directory(tmp_path: str, where: str) -> None:
    """A second call given the directory a running call writes (another sink made on the
    same path, or the same `results_path`) is refused before it runs, even before the
    first committed anything: each would otherwise take the other's files for its own.
    Once the first call is over, its files keep the directory from new calls."""
    path = os.path.join(tmp_path, "out")
    started, go = os.path.join(tmp_path, "started"), os.path.join(tmp_path, "go")
    layout = ashard.shards(2)

    def options() -> dict[str, Any]:
        if where == "table_sink":
            return {"out": {"rows": ashard.table_sink(path)}}
        return {"results": "disk", "results_path": path}

    def fn(tag: int) -> Any:
        return functools.partial(workloads.write_when_told, tag=tag, started=started, go=go)

    with anyio.fail_after(60):
        async with ashard.Pool(2) as pool, anyio.create_task_group() as tg:
            first = options()
            box: list[ashard.ShardResult] = []

            async def run_first() -> None:
                box.append(await pool.shard_map(layout, fn(100), **first))

            tg.start_soon(run_first)
            while not os.path.exists(started):  # noqa: ASYNC110 (a worker writes it)
                await anyio.sleep(0.01)
            name = r"out\['rows'\]: table_sink path" if where == "table_sink" else "results_path"
            with pytest.raises(ValueError, match=f"{name} .* being written by another call"):
                await pool.shard_map(layout, fn(200), **options())
            open(go, "w").close()
        (res,) = box
        with res:
            if where == "table_sink":
                table = first["out"]["rows"].read()
                assert table.column("tag").to_pylist() == [100, 100]
                assert res.results == [100, 101]
            else:
                assert list(res.results) == [100, 101]
            with pytest.raises(ValueError, match="not empty"):  # a sink: when made
                await ashard.shard_map(layout, fn(300), **options())


@pytest.mark.parametrize("where", ["table_sink", "results_path"])
async def test_a_retry_refuses_a_directory_another_call_wrote_since(
    tmp_path: str, where: str
) -> None:
    """A call whose shards all failed leaves its directory empty, so another call may
    write there; `retry_failed` of the first must then refuse it (it writes beside its
    own first run's files only, and its end sweeps what it did not keep)."""
    path = os.path.join(tmp_path, "out")
    layout = ashard.shards(3)
    if where == "table_sink":
        failing = {"out": {"rows": ashard.table_sink(path)}}
        other = {"out": {"rows": ashard.table_sink(path)}}
        fails, writes = workloads.write_bad, workloads.write_rows
        name = r"out\['rows'\]: table_sink path"
    else:
        failing = other = {"results": "disk", "results_path": path}
        fails, writes = workloads.raise_custom, workloads.shard_sum
        name = "results_path"
    with anyio.fail_after(60):
        async with ashard.Pool(2) as pool:
            first = await pool.shard_map(layout, fails, errors="collect", **failing)
            assert len(first.failures) == len(layout)
            assert not os.listdir(path)
            await pool.shard_map(layout, writes, **other)
            kept = _contents(path)
            with pytest.raises(ValueError, match=f"{name} .* did not write"):
                await pool.retry_failed(first, writes)
            assert _contents(path) == kept


TEMPORARY_DIRS = """
import asyncio, json, os, signal, sys, tempfile
import ashard, ashard._places, workloads

async def main(then):
    async with ashard.Pool(1) as pool:
        res = await pool.shard_map(4, workloads.shard_sum, results="disk")
        sink = ashard.table_sink()
        await pool.shard_map(2, workloads.write_rows, out={"rows": sink})
    token = ashard._places._own()
    tmp = tempfile.gettempdir()
    print(json.dumps(sorted(os.path.join(tmp, n) for n in os.listdir(tmp) if token in n)))
    sys.stdout.flush()
    if then == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if then == "wait":
        sys.stdin.read()
    if then == "fork":  # a child that exits normally, holding copies of both
        child = os.fork()
        if child == 0:
            sys.exit(0)
        os.waitpid(child, 0)
        print(json.dumps([list(res.results), sink.read().num_rows]))

asyncio.run(main(sys.argv[1]))
"""


def _start(then: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", TEMPORARY_DIRS, then], text=True, stdout=subprocess.PIPE,
        cwd=os.path.dirname(__file__), **kwargs,
    )  # fmt: skip


def test_the_temporary_directories_of_a_killed_caller_go_with_the_next_callers_first() -> None:
    """A caller killed (say by the OOM killer) never ran its finalizers; the next process
    that makes a temporary directory removes what it left, and nothing of a caller that
    still lives. One that ends normally leaves nothing, not even its lock."""
    live = _start("wait", stdin=subprocess.PIPE)
    try:
        assert live.stdout is not None
        kept = json.loads(live.stdout.readline())
        killed = _start("die")
        gone = json.loads(killed.communicate(timeout=60)[0].splitlines()[0])
        assert killed.returncode == -signal.SIGKILL
        assert len(gone) == len(kept) == 3  # results, sink, lock
        assert all(os.path.exists(p) for p in gone)
        sweeper = _start("end")
        mine = json.loads(sweeper.communicate(timeout=60)[0])
        assert sweeper.returncode == 0
        deadline = time.monotonic() + 30  # the sweep runs in a thread of the sweeper's
        while any(os.path.exists(p) for p in gone) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not any(os.path.exists(p) for p in gone)
        assert all(os.path.exists(p) for p in kept)
        assert not any(os.path.exists(p) for p in mine)  # it ended normally
    finally:
        live.communicate(timeout=60)
    assert live.returncode == 0
    assert not any(os.path.exists(p) for p in kept)


def test_a_forked_child_that_exits_leaves_its_parents_temporary_results_alone() -> None:
    """The child's copies of a result and a sink are finalized when it exits; the files
    are the parent's, and the parent still reads them."""
    out = subprocess.run(
        [sys.executable, "-c", TEMPORARY_DIRS, "fork"], capture_output=True, text=True,
        cwd=os.path.dirname(__file__), timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results, rows = json.loads(out.stdout.splitlines()[1])
    assert results == [0, 1, 2, 3] and rows == 4


_NO_PYARROW_IN_THE_CALLER = """
import asyncio, sys, ashard
def table_of(shard):
    return {"id": list(shard.idx)}
def write(shard, rows):
    rows.write({"id": list(shard.idx)})
async def main():
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(ashard.shards(6, block_size=1), table_of, results="table")
        with ashard.table_sink() as sink:
            await pool.shard_map(ashard.shards(6, block_size=1), write, out={"rows": sink})
            during = "pyarrow" in sys.modules
            print(during, res.table().num_rows, sink.read().num_rows, sink.schema.names)
asyncio.run(main())
"""


def test_a_table_call_never_imports_pyarrow_in_the_caller() -> None:
    """Workers write the tables; the caller keeps their schemas as bytes until asked.
    pyarrow's import holds the GIL for a tenth of a second: in the caller, during a
    call, it would stall the event loop that long, whatever thread ran it."""
    out = subprocess.run([sys.executable, "-c", _NO_PYARROW_IN_THE_CALLER],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "6", "6", "['id']"]

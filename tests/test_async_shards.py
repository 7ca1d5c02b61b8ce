"""`async def` shard functions (DESIGN 2.7) on the workers' own event loops: shards of a
worker overlap up to `shard_concurrency`, a timeout cancels a coroutine (its `finally`
runs), a coroutine that blocks its loop is stopped as a hung shard, a killed worker's
in-flight shards all run again once, exceptions keep their type, seeds hold, the caller
can cancel; map, call and stream take async fns; trio and uvloop worker loops. Real
workers, under asyncio and trio in the caller."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

import ashard
import workloads

pytestmark = pytest.mark.anyio


async def test_shards_overlap_up_to_shard_concurrency() -> None:
    async with ashard.Pool(2) as pool:
        t0 = time.monotonic()
        res = await pool.shard_map(ashard.shards(64, block_size=1), workloads.nap,
                                   shard_concurrency=32)  # fmt: skip
        took = time.monotonic() - t0
    assert res.results == list(range(64)) and res.ok
    assert took < 8  # one at a time would take 16 s per worker


async def test_chunks_join_to_keep_shard_concurrency_in_flight() -> None:
    """Chunks smaller than `shard_concurrency` run together on the worker's loop (the
    next joins as the ones under way are all started), never more than that many at
    once; each chunk still answers in order, a failure in a joined one included."""
    res = await ashard.shard_map(ashard.shards(12, block_size=1), workloads.nap_span,
                                 borrow={"fail": 7}, chunk_size=2, shard_concurrency=4,
                                 workers=1, errors="collect")  # fmt: skip
    assert [f.shard_id for f in res.failures] == [7]
    spans = [v for v in res.results if v is not None]
    assert len(spans) == 11 and res.results[7] is None
    assert 2 < workloads.most_at_once(spans) <= 4  # over a chunk's 2: chunks joined


async def test_a_timeout_cancels_the_coroutine_and_its_finally_runs(tmp_path: Path) -> None:
    """Two shards, each a chunk, the second joined to the first."""
    async with ashard.Pool(1) as pool:
        res = await pool.shard_map(
            ashard.shards(2, block_size=1), workloads.nap_with_finally,
            borrow={"directory": str(tmp_path)}, timeout=0.5, max_retries=0,
            errors="collect", shard_concurrency=2, chunk_size=1,
        )  # fmt: skip
        assert [type(f) for f in res.failures] == [ashard.ShardTimeout] * 2
        stacks = [f.stack for f in res.failures]  # type: ignore[attr-defined]
        assert all("nap_with_finally" in (s or "") for s in stacks), stacks
        assert sorted(p.name for p in tmp_path.iterdir()) == ["finally-0", "finally-1"]
        assert pool.stats.crashed == 0 and (await pool.shard_map(2, workloads.nap)).ok


async def test_a_coroutine_blocking_its_loop_is_stopped_in_its_frame() -> None:
    async with ashard.Pool(1) as pool:
        pid = (await pool.call(workloads.otel_loaded), pool.pids)[1]
        res = await pool.shard_map(1, workloads.block_the_loop, timeout=0.5, max_retries=0,
                                   errors="collect")  # fmt: skip
        (error,) = res.failures
        assert isinstance(error, ashard.ShardTimeout)
        assert "block_the_loop" in (error.stack or "")
        assert pool.pids == pid  # stopped in Python: the worker lives on


async def test_a_shard_holding_its_loop_is_named_in_the_notes() -> None:
    res = await ashard.shard_map(ashard.shards(3, block_size=1), workloads.block_briefly,
                                 chunk_size=3, workers=1)  # fmt: skip
    assert res.ok and res.results == [0, 1, 2]
    (note,) = [n for n in res.diagnostics.notes if "event loop" in n]
    assert re.search(r"was blocked for [1-9][0-9]*\.[0-9] s", note) and "shards 1 ran" in note


@pytest.mark.parametrize("chunk_size", ["auto", 4])
async def test_a_killed_worker_runs_each_in_flight_shard_again_once(
    tmp_path: Path, chunk_size: Any
) -> None:
    """16 shards in flight (one chunk, or four joined) when the worker is SIGKILLed."""
    log = tmp_path / "runs.log"
    async with ashard.Pool(1) as pool:
        with anyio.fail_after(60):
            res = await pool.shard_map(
                ashard.shards(16, block_size=1), workloads.all_in_flight_then_die,
                borrow={"log": str(log), "count": 16}, shard_concurrency=16,
                chunk_size=chunk_size,
            )  # fmt: skip
    assert res.ok and sorted(v[0] for v in res.results) == list(range(16))
    runs = Counter(int(line.split()[0]) for line in log.read_text().splitlines())
    assert runs == dict.fromkeys(range(16), 2)  # in flight when it died, then once more
    assert res.diagnostics.crashes == 1


async def test_exceptions_keep_their_type() -> None:
    res = await ashard.shard_map(ashard.shards(3, block_size=1), workloads.raise_custom_async,
                                 errors="collect", workers=1)  # fmt: skip
    assert [type(f.__cause__) for f in res.failures] == [workloads.CustomError] * 3
    assert [f.__cause__.code for f in res.failures] == [0, 1, 2]  # type: ignore[union-attr]


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_a_cancellederror_fn_raises_itself_is_its_outcome_and_a_stopped_loop_goes_on(
    concurrency: int,
) -> None:
    """asyncio's `CancelledError` raised by `fn` (no cancellation asked) is the shard's
    failure, and ``loop.stop()`` in a shard does not end the worker: both crashed it
    (five attempts, then "exited with code 1")."""
    fn, three = workloads.misbehave_on_the_loop, ashard.shards(3, block_size=1)
    async with ashard.Pool(1) as pool:
        res = await pool.shard_map(three, fn, borrow={"how": "cancel"}, errors="collect",
                                   shard_concurrency=concurrency)  # fmt: skip
        assert res.results == [0, None, 2]
        assert [type(f.__cause__).__name__ for f in res.failures] == ["CancelledError"]
        assert "raised by fn" in str(res.failures[0].__cause__)
        with pytest.raises(asyncio.CancelledError, match="raised by fn"):
            await pool.call(fn, three[1], "cancel")
        res = await pool.shard_map(three, fn, borrow={"how": "stop"},
                                   shard_concurrency=concurrency)  # fmt: skip
        assert res.results == [0, 1, 2]
        assert pool.stats.crashed == 0


async def test_seeds_per_shard_as_for_a_plain_function() -> None:
    async with ashard.Pool(2) as pool:
        plain = await pool.shard_map(ashard.shards(8, block_size=1), workloads.draw_sync, seed=5)
        both = await pool.shard_map(ashard.shards(8, block_size=1), workloads.draw_async,
                                    seed=5, shard_concurrency=4)  # fmt: skip
    assert both.results == plain.results


async def test_the_caller_cancelling_cancels_the_coroutines(tmp_path: Path) -> None:
    """The caller cancels while 4 coroutines run, in four chunks joined."""
    async with ashard.Pool(1) as pool:
        t0 = time.monotonic()
        with anyio.move_on_after(1.0):
            await pool.shard_map(
                ashard.shards(4, block_size=1), workloads.nap_with_finally,
                borrow={"directory": str(tmp_path)}, shard_concurrency=4, chunk_size=1,
            )  # fmt: skip
        assert time.monotonic() - t0 < 10
        assert len(list(tmp_path.iterdir())) == 4  # each coroutine's finally ran
        assert (await pool.shard_map(2, workloads.nap)).ok  # the worker is fine


async def test_what_async_shards_print_reaches_the_callers_stdout() -> None:
    """Lines of shards in flight together (joined chunks too) reach the stdout of the
    call that ran them, whole, by the time it returns."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        res = await ashard.shard_map(ashard.shards(12, block_size=1), workloads.print_async,
                                     borrow={"tag": "A"}, chunk_size=2, shard_concurrency=6,
                                     workers=1)  # fmt: skip
    assert res.ok
    lines = [line for line in out.getvalue().splitlines() if line.startswith("A ")]
    expected = [f"A {i} {which}" for i in range(12) for which in ("first", "second")]
    assert sorted(lines) == sorted(expected)


async def test_map_call_and_stream_take_async_functions() -> None:
    async with ashard.Pool(2) as pool:
        assert await pool.map(workloads.nap_item, range(20), shard_concurrency=8) == [
            2 * x for x in range(20)
        ]
        assert await pool.call(workloads.nap_item, 21) == 42
        seen = []
        async with pool.shard_stream(ashard.shards(6, block_size=1), workloads.nap,
                                     shard_concurrency=3) as stream:  # fmt: skip
            async for done in stream:
                seen.append(done.value)
        assert sorted(seen) == list(range(6))


def test_the_executor_takes_async_functions() -> None:
    with ashard.Executor(max_workers=1) as ex:
        assert ex.submit(workloads.nap_item, 4).result() == 8
        assert list(ex.map(workloads.nap_item, [1, 2, 3])) == [2, 4, 6]


@pytest.mark.parametrize(("loop", "fn"), [("trio", "nap_trio"), ("uvloop", "nap")])
async def test_trio_and_uvloop_worker_loops(loop: str, fn: str) -> None:
    pytest.importorskip(loop)  # the test extra installs both
    async with ashard.Pool(1, worker_loop=loop) as pool:  # type: ignore[arg-type]
        t0 = time.monotonic()
        res = await pool.shard_map(ashard.shards(8, block_size=1), getattr(workloads, fn),
                                   borrow={"seconds": 0.3}, shard_concurrency=8)  # fmt: skip
        assert res.results == list(range(8)) and time.monotonic() - t0 < 5


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: ashard.shard_map(2, workloads.nap, shard_concurrency=0), "shard_concurrency"),
        (
            lambda: ashard.shard_map(2, workloads.shard_sum, shard_concurrency=4),
            "shard_concurrency=4 .* fn must be an async def function",
        ),
        (lambda: ashard.map(workloads.square, [1], shard_concurrency=2), "async def"),
    ],
)
async def test_bad_concurrency_is_refused(call: Any, match: str) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        await call()


@pytest.mark.parametrize("together", [1, 4])
async def test_outputs_of_async_shards_each_their_own(tmp_path: Path, together: int) -> None:
    """Table sinks, stored results and output buffers take async shards one at a time
    and several at once: each shard's writes land in its own partition, and a shard
    that fails after writing leaves nothing."""
    async with ashard.Pool(2) as pool:
        with ashard.buffer("i8", (6,)) as buf:
            res = await pool.shard_map(ashard.shards(6, block_size=1), workloads.fill_async,
                                       out={"out": buf}, shard_concurrency=together)  # fmt: skip
            assert res.ok and list(buf.array) == [0, 2, 4, 6, 8, 10]
        sink = ashard.table_sink(tmp_path / "rows")
        res = await pool.shard_map(ashard.shards(8, block_size=1), workloads.write_rows_async,
                                   borrow={"fail": 3}, out={"rows": sink}, chunk_size=4,
                                   errors="collect", shard_concurrency=together)  # fmt: skip
        table = await anyio.to_thread.run_sync(sink.read)
        kept = sorted(i for i in range(8) if i != 3)
        assert sorted(table.column("id").to_pylist()) == sorted(kept * 2)
        assert [f.shard_id for f in res.failures] == [3]
        assert [res.results[i] for i in kept] == kept
        with await pool.shard_map(ashard.shards(8, block_size=1), workloads.table_async,
                                  results="table", chunk_size=4,
                                  shard_concurrency=together) as stored:  # fmt: skip
            assert sorted(stored.table().column("id").to_pylist()) == list(range(8))


@pytest.mark.parametrize("cow", ["audit", "allow"])
@pytest.mark.parametrize("size", [1 << 18, 1 << 20])  # 2 and 8 MiB: each way to see writes
@pytest.mark.parametrize("together", [1, 3])
async def test_cow_keeps_async_shards_apart_and_audit_names_the_writer(
    together: int, size: int, cow: str
) -> None:
    """Under cow="audit" or "allow" each async shard sees the original data, even while
    another shard of its worker that wrote to it is in flight, or once it ended; audit
    names the writer."""
    import numpy as np

    X = np.zeros(size)
    res = await ashard.shard_map(ashard.shards(3, block_size=1), workloads.write_borrowed_async,
                                 borrow={"X": X}, cow=cow, workers=1, chunk_size=3,
                                 shard_concurrency=together)  # fmt: skip
    assert res.results == [0.0, 99.0, 0.0] and X[0] == 0.0  # private, and seen only by shard 1
    assert res.diagnostics.cow_writes == (((1, "X"),) if cow == "audit" else ())


def test_a_worker_loop_that_cannot_be_had_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="worker_loop must be one of"):
        ashard.Pool(1, worker_loop="curio")  # type: ignore[arg-type]

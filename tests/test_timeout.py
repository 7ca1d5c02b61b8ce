"""Per-shard timeouts: stopped promptly, retried, reported; other results kept."""

from __future__ import annotations

import functools
import socket
import threading
import time
import traceback
from typing import Any

import anyio
import pytest

import ashard
import workloads

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("fn", [workloads.python_sleep, workloads.blocked_sleep])
async def test_shard_past_timeout_is_stopped_retried_and_reported(fn: object) -> None:
    timeout, retries = 0.5, 1
    async with ashard.Pool(2) as pool:
        t0 = time.monotonic()
        res = await pool.shard_map(
            ashard.shards(6, block_size=1),
            fn,  # type: ignore[arg-type]
            timeout=timeout,
            max_retries=retries,
            errors="collect",
        )
        took = time.monotonic() - t0
        assert [f.shard_id for f in res.failures] == [1]
        err = res.failures[0]
        assert isinstance(err, ashard.ShardTimeout)
        assert isinstance(err, TimeoutError)
        assert err.attempts == retries + 1
        assert res.results == [0, None, 2, 3, 4, 5]
        # each attempt is stopped within timeout + 1 s
        assert took < (retries + 1) * (timeout + 1.0) + 1.0
        assert res.diagnostics.timeouts == retries + 1
        assert await pool.call(abs, -3) == 3


async def test_signal_ignoring_shard_gets_its_worker_killed() -> None:
    async with ashard.Pool(2) as pool:
        before = set(pool.pids)
        res = await pool.shard_map(
            ashard.shards(3, block_size=1),
            workloads.blocked_sleep,
            timeout=0.3,
            max_retries=0,
            errors="collect",
        )
        assert isinstance(res.failures[0], ashard.ShardTimeout)
        assert pool.stats.timed_out == 1
        assert len(before - set(pool.pids)) <= 1


async def test_timeout_then_success_on_retry() -> None:
    def slow_first(shard: ashard.Shard) -> int:
        if shard.attempt == 1:
            time.sleep(30)
        return shard.attempt

    res = await ashard.shard_map(ashard.shards(2, block_size=1), slow_first, timeout=0.3, workers=2)
    assert res.results == [2, 2]


async def test_call_timeout() -> None:
    t0 = time.monotonic()
    with pytest.raises(ashard.ShardTimeout):
        await ashard.call(workloads.sleep_for, 30, timeout=0.3)
    assert time.monotonic() - t0 < 1.3
    assert await ashard.call(abs, -2) == 2


async def test_a_python_hang_carries_the_stack_where_it_was_stopped() -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(2) as pool:
            res = await pool.shard_map(
                ashard.shards(3, block_size=1), workloads.python_sleep, timeout=0.3,
                max_retries=0, errors="collect",
            )  # fmt: skip
            (err,) = res.failures
            assert isinstance(err, ashard.ShardTimeout) and err.stack is not None
            assert "python_sleep" in err.stack and "time.sleep(60)" in err.stack
            assert any("python_sleep" in note for note in err.__notes__)
            assert "python_sleep" in "".join(traceback.format_exception(err))
            with pytest.raises(ashard.ShardTimeout) as raised:
                await pool.call(workloads.sleep_for, 30, timeout=0.3)
            assert raised.value.stack is not None and "sleep_for" in raised.value.stack


async def test_a_worker_that_cannot_answer_has_no_stack_and_the_note_says_why() -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(2) as pool:
            res = await pool.shard_map(
                ashard.shards(3, block_size=1), workloads.deaf_sleep, timeout=0.3,
                max_retries=0, errors="collect",
            )  # fmt: skip
    (err,) = res.failures
    assert isinstance(err, ashard.ShardTimeout) and err.stack is None
    assert any("no stack" in note and "killed" in note for note in err.__notes__)


@pytest.mark.parametrize("fn", [workloads.blocked_sleep_but_dump])
async def test_a_c_hang_has_every_threads_stack_from_a_dump_before_the_kill(fn: Any) -> None:
    """Every signal but the dump signal blocked in the hung thread: the worker's
    faulthandler answers the dump signal with every thread's stack, before the kill."""
    with anyio.fail_after(60):
        async with ashard.Pool(2) as pool:
            res = await pool.shard_map(
                ashard.shards(3, block_size=1), fn, timeout=0.3, max_retries=0,
                errors="collect",
            )  # fmt: skip
            assert pool.stats.timed_out == 1  # killed: the interrupt did not reach it
    (err,) = res.failures
    assert isinstance(err, ashard.ShardTimeout) and err.stack is not None
    assert fn.__name__ in err.stack and "hread 0x" in err.stack
    rows = res.diagnostics.shards_table().to_pylist()
    assert [r["outcome"] for r in rows if r["shard_id"] == 1] == ["timeout"]


@pytest.mark.parametrize("after", [0.3, 60.0], ids=["ends-soon", "never-ends"])
@pytest.mark.parametrize("fn", workloads.LATE_WRITERS)
async def test_a_timed_out_shards_thread_never_writes_after_its_retry(
    fn: Any, after: float
) -> None:
    """A shard stopped at its timeout leaves a thread that writes over its slice of an
    out= buffer later (a thread cannot be stopped): the retry's value must be the one
    that stays. Its report waits for the thread (which ends within the parent's grace,
    or not: then the worker is killed, silent past the timeout, and reaped before the
    shard runs again). Only shard 0's first attempt is charged. A worker whose thread
    ended goes on, although `asyncio.to_thread`'s executor keeps its thread, idle."""
    async with workloads.late_writer_setup() as (pool, pid, buf):
        fn_after = functools.partial(fn, after=after)
        four = ashard.shards(4, block_size=1)
        res = await pool.shard_map(four, fn_after, out={"out": buf}, timeout=0.2,
                                   max_retries=1)  # fmt: skip
        assert res.results == [0, 1, 2, 3]
        assert buf.array.tolist() == [0, 1, 2, 3]
        rows = res.diagnostics.shards_table().to_pylist()
        stopped = [(r["shard_id"], r["attempt"]) for r in rows if r["outcome"] != "ok"]
        assert stopped == [(0, 1)]
        # a worker whose thread ended (idle executor threads aside) goes on
        assert (pool.pids == [pid]) == (after < 1)
        if after < 1:
            await anyio.sleep(after + 0.3)  # when the thread would have written
            assert buf.array.tolist() == [0, 1, 2, 3]


async def test_a_report_is_cut_before_its_timed_out_position_and_the_rest_waits() -> None:
    """The worker's side of the fence, on a real socketpair: a report whose position 1
    timed out, while a thread of the shard's runs on, sends position 0 at once and the
    rest only once that thread ended. (Through a pool, the positions before a timed-out
    one have always been reported already: they started first and would have timed out
    too, so this cut only guards a race.)"""
    from ashard._channel import Channel
    from ashard._protocol import TIMEOUT, parse_result
    from ashard._worker.reports import Reporter

    parent, child = socket.socketpair()
    report = Reporter(child)
    report.fence, report.with_rss = True, False
    ended = threading.Event()
    writer = threading.Thread(target=ended.wait, name="late-writer")
    # this process's other threads (pytest's, trio's thread cache) are none of its doing
    report.idle_threads = lambda: set(threading.enumerate()) - {writer}
    writer.start()
    stopped = (1, TIMEOUT, (0.2, None))
    sender = threading.Thread(  # ashard's own, as the worker's main thread is
        target=report.result, name="ashard-sender",
        args=(7, 0, [10, None, 12], [stopped], [0.1, 0.2, 0.1], True),
    )  # fmt: skip
    channel = Channel(parent)
    try:
        with anyio.fail_after(30):
            sender.start()
            (first,) = [parse_result(m) for m in await channel.receive()]
            assert (first.k0, first.n, first.final, first.errors) == (0, 1, False, [])
            await anyio.sleep(0.2)
            assert channel.receive_nowait() == [] and sender.is_alive()
            ended.set()
            (rest,) = [parse_result(m) for m in await channel.receive()]
            assert (rest.k0, rest.n, rest.final, rest.errors) == (1, 2, True, [(0, *stopped[1:])])
            assert rest.elapsed == [0.2, 0.1]
    finally:
        ended.set()
        sender.join()
        channel.close()
        child.close()

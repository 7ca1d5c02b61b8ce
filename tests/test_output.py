"""Worker prints never corrupt the channel, and reach the parent's stdout/stderr."""

from __future__ import annotations

import functools

import anyio
import pytest

import ashard
import workloads


def test_prints_and_raw_fd_writes_do_not_corrupt_results(
    capfd: pytest.CaptureFixture[str],
) -> None:
    async def run() -> None:
        async with ashard.Pool(2) as pool:  # started inside the test: inherits the capture
            res = await pool.shard_map(ashard.shards(10, block_size=1), workloads.chatty)
            assert res.results == list(range(10))
            squares = await pool.map(workloads.square, range(1000))
            assert squares == [i * i for i in range(1000)]

    anyio.run(run)
    out, err = capfd.readouterr()  # outside the event loop: reading a file blocks
    assert out.count("chatty 7 line 49") == 1
    assert out.count("raw bytes straight to fd 1") == 10
    assert err.count("raw bytes straight to fd 2") == 10


@pytest.mark.parametrize("how", ["close-fd1", "close-fd2", "replace-fd1", "close-sys-stdout"])
def test_fn_breaking_stdio_cannot_send_output_into_shared_memory(
    how: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """After `fn` closed or replaced its stdout, the next descriptor the worker gets (a
    shared segment) would take that number and later prints would land in it."""

    async def run() -> None:
        async with ashard.Pool(1) as pool:
            pid = pool.pids[0]
            await pool.shard_map(
                ashard.shards(1, block_size=1), functools.partial(workloads.break_stdio, how=how)
            )
            buf = ashard.buffer("int64", 4096)  # read-only in borrow: must stay all zeros
            res = await pool.shard_map(
                ashard.shards(3, block_size=1), workloads.print_then_sum, borrow={"X": buf}
            )
            assert res.results == [0, 0, 0]
            assert not buf.array.any(), "worker output landed in shared memory"
            assert pool.pids == [pid]  # the same worker went on
            buf.close()

    anyio.run(run)
    out, err = capfd.readouterr()
    assert all(f"line from shard {i} " in out for i in range(3))
    assert all(f"err from shard {i}" in err for i in range(3))

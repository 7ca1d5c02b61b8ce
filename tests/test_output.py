"""Worker prints never corrupt the channel, and reach the parent's stdout/stderr."""

from __future__ import annotations

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

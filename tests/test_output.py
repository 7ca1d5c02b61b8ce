"""Worker prints never corrupt the channel, and reach the parent's stdout/stderr."""

from __future__ import annotations

import pytest
import workloads

import ashard

pytestmark = pytest.mark.anyio


async def test_prints_and_raw_fd_writes_do_not_corrupt_results(
    capfd: pytest.CaptureFixture[str],
) -> None:
    async with ashard.Pool(2) as pool:  # started inside the test: it inherits the capture
        res = await pool.shard_map(ashard.shards(10, block_size=1), workloads.chatty)
        assert res.results == list(range(10))
        assert await pool.map(workloads.square, range(1000)) == [i * i for i in range(1000)]
    out, err = capfd.readouterr()
    assert out.count("chatty 7 line 49") == 1
    assert out.count("raw bytes straight to fd 1") == 10
    assert err.count("raw bytes straight to fd 2") == 10

"""A worker's queue is its own: when it has said nothing for a while with single shards
queued behind the one it runs, and another worker has nothing left to do, the queued
ones are asked back (RECALL) and run wherever a worker is free first, uncharged."""

from __future__ import annotations

import sys

import anyio
import pytest

import ashard
import workloads
from ashard._framing import encode
from ashard._handle import WorkerConfig, WorkerHandle
from ashard._protocol import INTERRUPTED, ITEMS, JOB, RECALL, RUN, JobSpec
from ashard._reports import receive
from ashard._serialize import pack


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_a_worker_gives_back_the_chunks_it_had_not_started_in_their_turn() -> None:
    w = await WorkerHandle.start(WorkerConfig())
    try:
        spec = JobSpec(ITEMS, pack(workloads.doze), None, None, None, None, list(sys.path))
        runs = [(RUN, 7, seq, seq, 1, None, pack([0.3 if seq == 0 else 0.0]), None)
                for seq in range(4)]  # fmt: skip
        await w.channel.send(encode((JOB, 7, spec)) + [p for r in runs for p in encode(r)])
        await anyio.sleep(0.1)  # chunk 0 runs; 1, 2 and 3 wait behind it
        await w.channel.send(encode((RECALL, 7, 2)))
        answers = []
        while len(answers) < 4:
            answers += [report for report, _ in await receive(w)]
        assert [a.seq for a in answers] == [0, 1, 2, 3]  # in their turn
        assert [a.n for a in answers] == [1, 1, 0, 0]  # 0 and 1 ran; 2 and 3 never did
        assert all(a.final for a in answers)
        assert [a.errors for a in answers[2:]] == [[(0, INTERRUPTED, None)]] * 2
    finally:
        w.close_channel()
        with anyio.CancelScope(shield=True):
            await w.kill()


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_slow_shards_queued_behind_a_slow_one_each_run_once_uncharged() -> None:
    # quick shards first: each worker holds many of them at once; then slow ones, of
    # which a worker may hold many behind the first when the others have run out
    delays = [0.0] * 3000 + [0.02] * 30
    layout = ashard.shards(len(delays), block_size=1)
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(
            layout, workloads.spin_for_shard, borrow={"delays": delays}, chunk_size=1
        )
    assert res.results == list(range(len(delays)))
    runs = res.diagnostics.shards_table().to_pydict()
    assert sorted(runs["shard_id"]) == list(range(len(delays)))  # once each: none cancelled
    assert set(runs["outcome"]) == {"ok"} and set(runs["attempt"]) == {1}
    assert res.diagnostics.retries == 0

"""`retry_failed` (DESIGN 2.6): only the failed and skipped shards of a call run again,
with its shards, borrow, out, seed and options; earlier successes are kept (their
stored files too), and the new result is the whole call's. Real workers, asyncio and
trio; the sync API at the end."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import anyio
import pytest

import ashard
import ashard.sync
import workloads

pytestmark = pytest.mark.anyio

N = 10
LAYOUT = ashard.shards(N, block_size=1)


class Armed:
    """A file that makes the planned shards fail while it exists, and the run log."""

    def __init__(self, tmp_path: Path) -> None:
        self.armed = tmp_path / "armed"
        self.armed.touch()
        self.log = tmp_path / "runs.log"

    def borrow(self, bad: dict[int, str], **more: Any) -> dict[str, Any]:
        return {"armed": str(self.armed), "bad": bad, "log": str(self.log), **more}

    def disarm(self) -> None:
        self.armed.unlink()

    def ran(self) -> list[int]:
        """The shards that ran since the last call to `ran`, sorted."""
        text = self.log.read_text() if self.log.exists() else ""
        self.log.write_text("")
        return sorted(int(line) for line in text.split())


async def test_only_the_failed_shards_run_again_with_the_same_seeds(tmp_path: Path) -> None:
    state = Armed(tmp_path)
    bad = {2: "ValueError", 7: "ValueError"}
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(
            LAYOUT, workloads.fail_while_armed, borrow=state.borrow(bad, draw=True), seed=11,
            errors="collect",
        )  # fmt: skip
        assert [f.shard_id for f in res.failures] == [2, 7]
        assert state.ran() == list(range(N))
        state.disarm()
        again = await pool.retry_failed(res)
        assert state.ran() == [2, 7]  # exactly the failed ids, nothing else
        clean = await pool.shard_map(
            LAYOUT, workloads.fail_while_armed, borrow=state.borrow(bad, draw=True), seed=11
        )
    assert again.ok and again.failures == []
    assert again.results == clean.results  # the same (seed, shard.id) streams
    assert again.results[:2] == res.results[:2]  # successes kept as they were
    assert res.results[2] is None and len(res.failures) == 2  # the first result unchanged
    assert again.diagnostics.shards_table().num_rows == 2  # diagnostics tell of the rerun


async def test_a_raised_call_is_completed_from_its_partial_result(tmp_path: Path) -> None:
    state = Armed(tmp_path)
    with pytest.raises(ashard.ShardMapError) as info:
        await ashard.shard_map(
            LAYOUT, workloads.fail_while_armed, borrow=state.borrow({0: "KeyError"}),
            chunk_size=1, workers=1,
        )  # fmt: skip
    partial = info.value.result
    assert partial is not None and not partial.ok
    first_run = set(state.ran())
    state.disarm()
    again = await ashard.retry_failed(partial)
    assert again.ok and again.results == [float(i) for i in range(N)]
    done_before = {i for i, v in enumerate(partial.results) if v is not None}
    assert set(state.ran()) == set(range(N)) - done_before  # the failed and unfinished
    assert 0 in first_run


async def test_only_selects_failures_by_type_and_the_rest_stay_failures(tmp_path: Path) -> None:
    state = Armed(tmp_path)
    bad = {1: "ConnectionError", 4: "KeyError", 6: "ConnectionResetError"}
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(
            LAYOUT, workloads.fail_while_armed, borrow=state.borrow(bad), errors="collect"
        )
        state.ran()
        state.disarm()
        again = await pool.retry_failed(res, only=ConnectionError)
        assert state.ran() == [1, 6]
        assert [f.shard_id for f in again.failures] == [4]  # kept: not selected
        assert isinstance(again.failures[0].__cause__, KeyError)
        assert again.results[1] == 1.0 and again.results[6] == 6.0 and again.results[4] is None
        last = await pool.retry_failed(again, only=(ashard.ShardFailed,))
        assert state.ran() == [4] and last.ok


async def test_skipped_shards_run_again_and_a_new_fn_and_options_apply(tmp_path: Path) -> None:
    state = Armed(tmp_path)
    bad = {3: "ValueError", 5: "OSError"}
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(
            LAYOUT, workloads.fail_while_armed, borrow=state.borrow(bad), errors="collect",
            on_error={ValueError: "skip"},
        )  # fmt: skip
        assert res.skipped == (3,) and [f.shard_id for f in res.failures] == [5]
        state.ran()
        # the rule still applies (the call's options) unless replaced: here it is
        again = await pool.retry_failed(res, workloads.table_while_armed, on_error=None)
        assert state.ran() == [3, 5]
    assert again.skipped == () and [f.shard_id for f in again.failures] == [3, 5]
    state.disarm()
    async with ashard.Pool(1) as other:
        final = await other.retry_failed(again)
    assert final.ok and final.results[4] == 4.0  # a success of the first run
    assert final.results[3] == {"id": [3], "value": [3.0]}  # the fn the last retry was given


@pytest.mark.parametrize("n", [40, 50_000])
async def test_a_list_changed_after_its_call_is_rerun_as_the_call_had_it(n: int) -> None:
    """`retry_failed` runs the call's shards again: a list given as the shards and
    changed since (cleared and refilled) gives the reruns the items the call had (a
    long one's copy is kept for them)."""
    words = [f"w{i}" for i in range(n)]
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(words, workloads.fail_odd, errors="collect", chunk_size=1)
        failed = [f.shard_id for f in res.failures]
        assert failed and all(k % 2 for k in failed)
        words[:] = ["changed"] * 5
        again = await pool.retry_failed(res, workloads.shard_items)
    layout = ashard.shards(n)
    cut = [[f"w{i}" for i in shard.idx] for shard in layout]
    assert again.ok
    assert [again.results[k] for k in failed] == [cut[k] for k in failed]


async def test_a_call_of_many_shards_and_its_retry_of_many_resolve_each_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call of more shards than `_job.SLOTS_STEP` (here 500) makes its lists of results
    and of resolved shards a piece per loop step, as does a `retry_failed` of more than
    that many: every shard's value lands in its own slot, each once."""
    from ashard import _job

    monkeypatch.setattr(_job, "SLOTS_STEP", 500)
    layout = ashard.shards(3_001, block_size=1)
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(layout, workloads.fail_odd, errors="collect")
        assert [f.shard_id for f in res.failures] == list(range(1, 3_001, 2))
        assert res.results == [None if k % 2 else k for k in range(3_001)]
        again = await pool.retry_failed(res, workloads.shard_ids)
    assert again.ok and again.diagnostics.shards == 3_001
    assert again.results == [(k, [k]) if k % 2 else k for k in range(3_001)]


@pytest.mark.parametrize("mode", ["table", "disk"])
async def test_stored_successes_are_reused_not_recomputed(tmp_path: Path, mode: str) -> None:
    state = Armed(tmp_path)
    fn = workloads.table_while_armed if mode == "table" else workloads.fail_while_armed
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(
            LAYOUT, fn, borrow=state.borrow({2: "ValueError", 8: "ValueError"}),
            results=mode, errors="collect",
        )  # fmt: skip
        with res:
            first_refs = list(res.refs)
            state.ran()
            state.disarm()
            again = await pool.retry_failed(res)
            assert state.ran() == [2, 8]
            assert again.ok
            kept = [i for i in range(N) if i not in (2, 8)]
            assert all(again.refs[i] is first_refs[i] for i in kept)  # the same files
            if mode == "table":
                ids = again.table().column("id").to_pylist()
                assert sorted(ids) == list(range(N))
            else:
                assert list(again.results) == [float(i) for i in range(N)]
            with pytest.raises(ValueError, match="results cannot change"):
                await pool.retry_failed(res, results="memory")
        with pytest.raises(ValueError, match="this result is closed"):
            await pool.retry_failed(res)


async def test_a_table_sink_gets_the_rerun_shards_partitions(tmp_path: Path) -> None:
    state = Armed(tmp_path)
    sink = ashard.table_sink(tmp_path / "rows")
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(
            LAYOUT, workloads.fail_while_armed, borrow=state.borrow({4: "ValueError"}),
            out={"rows": sink}, errors="collect",
        )  # fmt: skip
        assert len(sink.refs) == N - 1
        state.disarm()
        state.ran()
        again = await pool.retry_failed(res)
        assert state.ran() == [4] and again.ok
    table = await anyio.to_thread.run_sync(sink.read)
    assert sorted(table.column("id").to_pylist()) == list(range(N))


async def test_nothing_to_run_again_returns_the_result_and_runs_nothing() -> None:
    async with ashard.Pool(1) as pool:
        res = await pool.shard_map(4, workloads.shard_sum)
        done = pool.stats.shards_done
        again = await pool.retry_failed(res)
        assert again is not res and again.results == res.results and again.ok
        assert pool.stats.shards_done == done


async def test_bad_arguments_are_refused_naming_them(tmp_path: Path) -> None:
    state = Armed(tmp_path)
    with pytest.raises(TypeError, match="retry_failed takes the ShardResult of a shard_map"):
        await ashard.retry_failed([1, 2])  # type: ignore[arg-type]
    async with ashard.Pool(1) as pool:
        res = await pool.shard_map(
            3, workloads.fail_while_armed, borrow=state.borrow({0: "ValueError"}),
            errors="collect",
        )  # fmt: skip
        with pytest.raises(TypeError, match="only must be an exception type"):
            await pool.retry_failed(res, only="ValueError")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="retry_failed\\(\\) got an unexpected keyword"):
            await pool.retry_failed(res, ordered=True)  # type: ignore[call-arg]
        with pytest.raises(ValueError, match="results_path cannot change"):
            await pool.retry_failed(res, results_path=str(tmp_path / "x"))
        with pytest.raises(ValueError, match="max_retries must be"):
            await pool.retry_failed(res, max_retries=-1)
        assert state.ran() == [0, 1, 2]  # nothing ran for the refused calls
    with pytest.raises(RuntimeError, match="pool this call ran on is closed; pass pool="):
        await ashard.retry_failed(res)
    copy = pickle.loads(pickle.dumps(res))  # a result pickles, without its call
    assert copy.results == res.results and [f.shard_id for f in copy.failures] == [0]
    with pytest.raises(TypeError, match="holds no call to run again"):
        await ashard.retry_failed(copy)
    state.disarm()
    async with ashard.Pool(1) as other:
        assert (await ashard.retry_failed(res, pool=other)).ok


def test_sync_retry_failed_and_sync_pool(tmp_path: Path) -> None:
    state = Armed(tmp_path)
    res = ashard.sync.shard_map(
        LAYOUT, workloads.fail_while_armed, borrow=state.borrow({9: "ValueError"}),
        errors="collect", workers=2,
    )  # fmt: skip
    assert [f.shard_id for f in res.failures] == [9]
    state.disarm()
    state.ran()
    assert ashard.sync.retry_failed(res).ok and state.ran() == [9]
    os.close(os.open(state.armed, os.O_CREAT))  # armed again
    with ashard.sync.Pool(1) as pool:
        res = pool.shard_map(
            LAYOUT, workloads.fail_while_armed, borrow=state.borrow({0: "ValueError"}),
            errors="collect",
        )  # fmt: skip
        state.disarm()
        state.ran()
        assert pool.retry_failed(res).ok and state.ran() == [0]
    ashard.sync.shutdown()

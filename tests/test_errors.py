"""User code that fails: `ShardFailed` with the original exception, `errors=` modes."""

from __future__ import annotations

import pickle

import pytest

import ashard
import workloads
from ashard._serialize import RemoteError

pytestmark = pytest.mark.anyio

ONE_EACH = ashard.shards(8, block_size=1)


async def test_exception_becomes_shard_failed_with_original_cause() -> None:
    res = await ashard.shard_map(ONE_EACH, workloads.fail_on, errors="collect", workers=2)
    assert not res.ok
    assert [f.shard_id for f in res.failures] == [3]
    err = res.failures[0]
    assert isinstance(err, ashard.ShardFailed)
    assert isinstance(err.__cause__, ValueError)
    assert str(err.__cause__) == "shard 3 is bad"
    assert "in fail_on" in err.remote_traceback
    assert "raise ValueError" in err.remote_traceback
    assert err.attempts == 1
    assert err.shard is not None and list(err.shard.idx) == [3]
    assert res.results[3] is None
    assert res.results[:3] == [0, 1, 2] and res.results[4:] == [4, 5, 6, 7]


async def test_custom_exception_keeps_its_type_and_fields() -> None:
    res = await ashard.shard_map(
        ashard.shards(2, block_size=1), workloads.raise_custom, errors="collect", workers=1
    )
    causes = [f.__cause__ for f in res.failures]
    assert all(isinstance(c, workloads.CustomError) for c in causes)
    assert [c.code for c in causes] == [0, 1]  # type: ignore[union-attr]


async def test_exception_that_cannot_travel_still_reports_type_and_message() -> None:
    res = await ashard.shard_map(
        ashard.shards(1, block_size=1), workloads.raise_unpicklable, errors="collect", workers=1
    )
    cause = res.failures[0].__cause__
    assert isinstance(cause, RemoteError)
    assert "UnpicklableError" in str(cause) and "cannot travel" in str(cause)


async def test_raise_mode_stops_at_first_failure_with_partial_result() -> None:
    with pytest.raises(ashard.ShardMapError) as info:
        await ashard.shard_map(ONE_EACH, workloads.fail_on, workers=2)
    group = info.value
    assert isinstance(group, ExceptionGroup)
    assert all(isinstance(e, ashard.ShardFailed) for e in group.exceptions)
    assert [e.shard_id for e in group.exceptions] == [3]
    assert group.result is not None
    assert group.result.results[3] is None
    assert len(group.result.results) == len(ONE_EACH)
    done = [r for r in group.result.results if r is not None]
    assert set(done) <= {0, 1, 2, 4, 5, 6, 7}


async def test_raise_mode_cancels_the_remaining_shards() -> None:
    many = ashard.shards(200, block_size=1)
    with pytest.raises(ashard.ShardMapError) as info:
        await ashard.shard_map(
            many, lambda sh: workloads.fail_on(sh, bad=0) + workloads.sleep_for(0.05), workers=2
        )
    result = info.value.result
    assert result is not None
    assert sum(r is not None for r in result.results) < 20  # nowhere near all 200 ran


async def test_except_star_splits_the_group() -> None:
    try:
        await ashard.shard_map(ONE_EACH, workloads.fail_on, workers=2)
    except* ashard.ShardFailed as group:
        assert isinstance(group, ashard.ShardMapError)
        assert group.result is not None


async def test_collect_runs_every_shard() -> None:
    res = await ashard.shard_map(
        ashard.shards(20, block_size=1),
        lambda sh: 1 // (sh.id % 4),
        errors="collect",
        workers=2,
    )
    assert [f.shard_id for f in res.failures] == [0, 4, 8, 12, 16]
    assert all(isinstance(f.__cause__, ZeroDivisionError) for f in res.failures)
    assert sum(r is not None for r in res.results) == 15
    with pytest.raises(ashard.ShardMapError):
        res.raise_for_failures()


async def test_retry_errors_retries_raising_shards() -> None:
    res = await ashard.shard_map(
        ONE_EACH, workloads.fail_on, errors="collect", retry_errors=True, max_retries=2, workers=2
    )
    assert res.failures[0].attempts == 3
    assert res.diagnostics.retries == 2


async def test_map_raises_and_collects() -> None:
    with pytest.raises(ashard.ShardMapError) as info:
        await ashard.map(lambda x: 10 // x, [5, 2, 0, 1], workers=2)
    assert isinstance(info.value.exceptions[0].__cause__, ZeroDivisionError)
    out = await ashard.map(lambda x: 10 // x, [5, 2, 0, 1], errors="collect", workers=2)
    assert out[:2] == [2, 5] and out[3] == 10
    assert isinstance(out[2], ashard.ShardFailed)
    assert isinstance(out[2].__cause__, ZeroDivisionError)


async def test_a_map_that_fails_early_reports_only_the_items_it_took() -> None:
    """A map over a range or a list has its results list made ahead, a slot per item; one
    that fails before it took them all raises with a result of the items it took, each
    slot its item's value or None, and no slot for an item never taken."""
    for items in (range(20_000), list(range(20_000))):  # 20 s of work, if it all ran
        with pytest.raises(ashard.ShardMapError) as info:
            await ashard.map(workloads.fail_on_one_slowly, items, workers=2, chunk_size=10)
        result = info.value.result
        assert 0 < len(result.results) == len(result.shards) < 20_000
        assert all(v in (k, None) for k, v in enumerate(result.results))
        assert [f.shard_id for f in result.failures] == [1]


async def test_call_raises_the_original_exception_with_remote_traceback() -> None:
    with pytest.raises(ZeroDivisionError) as info:
        await ashard.call(divmod, 1, 0)
    assert "ZeroDivisionError" in str(info.value.__cause__)


def _fail_on_sevens(x: int, *, offset: int) -> int:
    if x % 50 == 7:
        raise ValueError(f"bad item {x}")
    return x + offset


async def test_map_keeps_going_after_failures_inside_one_chunk() -> None:
    out = await ashard.map(
        _fail_on_sevens, range(300), borrow={"offset": 1000}, chunk_size=100,
        errors="collect", workers=2,
    )  # fmt: skip
    for x, value in enumerate(out):
        if x % 50 == 7:
            assert isinstance(value, ashard.ShardFailed)
            assert str(value.__cause__) == f"bad item {x}"
        else:
            assert value == x + 1000


async def test_an_exception_whose_str_raises_fails_its_shard_and_the_worker_lives() -> None:
    async with ashard.Pool(1) as pool:
        pid = pool.pids[0]
        res = await pool.shard_map(
            ashard.shards(3, block_size=1), workloads.raise_bad_str, errors="collect"
        )
        assert pool.pids == [pid]
    (failure,) = res.failures
    assert isinstance(failure, ashard.ShardFailed) and failure.shard_id == 1
    assert isinstance(failure.__cause__, RemoteError)
    assert "StrRaises" in str(failure) and "str() failed" in str(failure)
    assert "raise_bad_str" in failure.remote_traceback
    assert res.results == [None, None, None]


async def test_a_result_that_does_not_unpickle_in_the_parent_fails_only_its_shard() -> None:
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(
            ashard.shards(4, block_size=1),
            lambda sh: workloads.RebuildFails() if sh.id == 2 else sh.id,
            errors="collect",
        )
        assert [f.shard_id for f in res.failures] == [2]
        failure = res.failures[0]
        assert isinstance(failure, ashard.ShardFailed)
        assert "its result could not be unpickled" in str(failure)
        assert isinstance(failure.__cause__, pickle.UnpicklingError)  # what it is, as a type
        assert isinstance(failure.__cause__.__cause__, RuntimeError)  # what unpickling raised
        assert "cannot be rebuilt" in str(failure.__cause__)
        assert res.results == [0, 1, None, 3]
        # inside a chunk of many, the culprit is found and only it fails
        out = await pool.map(
            workloads.return_unrebuildable, range(30), chunk_size=10, errors="collect"
        )
        assert [i for i, v in enumerate(out) if isinstance(v, ashard.ShardFailed)] == [13]
        assert [v for i, v in enumerate(out) if i != 13] == [i for i in range(30) if i != 13]
        with pytest.raises(ashard.ShardFailed, match="call failed: its result could not be"):
            await pool.call(workloads.RebuildFails)
        assert pool.stats.crashed == 0


async def test_a_value_that_raises_systemexit_when_unpickled_fails_only_its_shard() -> None:
    async with ashard.Pool(1) as pool:
        res = await pool.shard_map(
            ashard.shards(3, block_size=1),
            lambda sh: workloads.ExitsWhenUnpickled() if sh.id == 1 else sh.id,
            errors="collect",
        )
        assert [f.shard_id for f in res.failures] == [1] and res.results[::2] == [0, 2]
        assert "SystemExit" in str(res.failures[0])
        res = await pool.shard_map(2, workloads.shard_sum_taking_any,
                                   borrow={"x": workloads.ExitsWhenUnpickled()},
                                   errors="collect")  # fmt: skip
        assert all("could not be loaded in the worker" in str(f) for f in res.failures)
        assert len(pool.pids) == 1 and pool.stats.crashed == 0  # nobody exited

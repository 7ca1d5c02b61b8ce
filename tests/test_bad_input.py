"""Bad input: a clear error naming the argument, before any worker runs."""

from __future__ import annotations

import functools
import pickle
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ashard
import ashard.sync
import workloads

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("shards", "fn", "options", "exc", "words"),
    [
        (4, 42, {}, TypeError, "fn must be callable, got int 42"),
        (0, workloads.shard_sum, {}, ValueError, "shards must be a positive number"),
        (-5, workloads.shard_sum, {}, ValueError, "shards must be a positive number"),
        (True, workloads.shard_sum, {}, TypeError, "shards must be"),
        ("abc", workloads.shard_sum, {}, TypeError, "wrap it in a list"),
        (iter([1, 2]), workloads.shard_sum, {}, TypeError, "for other iterables use ashard.map"),
        (4, workloads.shard_sum, {"errors": "ignore"}, ValueError, "errors must be one of"),
        (4, workloads.shard_sum, {"cow": "maybe"}, ValueError, "cow must be one of"),
        (4, workloads.shard_sum, {"chunk_size": 0}, ValueError, "chunk_size must be a positive"),
        (4, workloads.shard_sum, {"chunk_size": "big"}, ValueError, "chunk_size must be"),
        (4, workloads.shard_sum, {"timeout": -1}, ValueError, "timeout must be a positive"),
        (4, workloads.shard_sum, {"timeout": "1s"}, TypeError, "timeout must be a positive"),
        (4, workloads.shard_sum, {"max_retries": -1}, ValueError, "max_retries must be"),
        (4, workloads.shard_sum, {"seed": 1.5}, TypeError, "seed must be"),
        (4, workloads.shard_sum, {"seed": -1}, ValueError, "seed must be"),
        (4, workloads.shard_sum, {"retry_errors": "yes"}, TypeError, "retry_errors must be"),
        (4, workloads.shard_sum, {"progress": 1}, TypeError, "progress must be"),
        (4, workloads.shard_sum, {"borrow": [1, 2]}, TypeError, "borrow must be a mapping"),
        (4, workloads.shard_sum, {"borrow": {"not valid": 1}}, TypeError, "valid identifiers"),
    ],
)
async def test_shard_map_refuses_bad_arguments(
    shards: Any, fn: Any, options: dict[str, Any], exc: type[Exception], words: str
) -> None:
    pool = ashard.Pool(1)
    with pytest.raises(exc, match=words):
        await pool.shard_map(shards, fn, **options)
    assert pool.stats.started == 0  # no worker ran
    await pool.aclose()


async def test_unpicklable_fn_is_named() -> None:
    lock = threading.Lock()
    pool = ashard.Pool(1)
    with pytest.raises(TypeError, match=r"fn cannot be sent to a worker process.*lock"):
        await pool.shard_map(3, lambda sh: lock)
    assert pool.stats.started == 0
    await pool.aclose()


async def test_unpicklable_borrow_is_named() -> None:
    pool = ashard.Pool(1)
    with pytest.raises(TypeError, match=r"borrow\['guard'\] cannot be sent"):
        await pool.shard_map(
            3, workloads.shard_sum_taking_any, borrow={"ok": 1, "guard": threading.Lock()}
        )
    assert pool.stats.started == 0
    await pool.aclose()


async def test_unpicklable_call_argument_is_named() -> None:
    with pytest.raises(TypeError, match="argument 1 of the call cannot be sent"):
        await ashard.call(workloads.square, 1, threading.Lock())


async def test_unpicklable_result_fails_that_shard_only() -> None:
    res = await ashard.shard_map(
        ashard.shards(4, block_size=1), workloads.return_lock, errors="collect", workers=2
    )
    assert [f.shard_id for f in res.failures] == [1]
    cause = res.failures[0].__cause__
    assert isinstance(cause, TypeError)
    assert "_thread.lock" in str(cause) and "could not be pickled" in str(cause)
    assert res.results == [0, None, 2, 3]


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        ({"workers": 0}, ValueError, "workers must be a positive int"),
        ({"workers": "2"}, TypeError, "workers must be a positive int"),
        ({"init": 3}, TypeError, "init must be callable"),
        ({"env": {"A": 1}}, TypeError, "env must map str to str"),
        ({"worker_nice": -1}, ValueError, "worker_nice must be an int from 0 to 19, got -1"),
        ({"worker_nice": 20}, ValueError, "worker_nice must be an int from 0 to 19, got 20"),
        ({"worker_nice": True}, TypeError, "worker_nice must be an int from 0 to 19"),
        ({"worker_nice": 2.5}, TypeError, "worker_nice must be an int from 0 to 19"),
        ({"worker_nice": "10"}, TypeError, "worker_nice must be an int from 0 to 19"),
    ],
)
def test_pool_refuses_bad_arguments(
    kwargs: dict[str, Any], exc: type[Exception], words: str
) -> None:
    with pytest.raises(exc, match=words):
        ashard.Pool(**kwargs)


def test_a_pool_too_large_to_start_is_refused_before_anything_starts() -> None:
    """A pool its caller's file descriptors cannot hold would start worker after worker
    until memory ran out (10**30 workers: the kernel killed the caller)."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    fds = soft if 0 < soft != resource.RLIM_INFINITY else 1 << 20
    most = (fds - 64) // 5
    with pytest.raises(ValueError, match=rf"^workers must be at most {most} here, got {most + 1}"):
        ashard.Pool(most + 1)
    with pytest.raises(ValueError, match=r"^max_workers must be at most .*RLIMIT_NOFILE"):
        ashard.Executor(10**30)
    with pytest.raises(ValueError, match=r"^workers must be at most .*RLIMIT_NOFILE"):
        ashard.sync.map(abs, [1], workers=10**30)
    assert ashard.Pool(most).workers == most  # made, never started


async def test_stream_and_map_refuse_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_pending must be a positive int"):
        async with ashard.shard_stream(4, workloads.shard_sum, max_pending=0):
            pass
    with pytest.raises(TypeError, match="ordered must be True or False"):
        bad: Any = "yes"
        async with ashard.shard_stream(4, workloads.shard_sum, ordered=bad):
            pass
    with pytest.raises(TypeError, match="items must be iterable"):
        await ashard.map(abs, 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"pool must be an ashard\.Pool"):
        await ashard.shard_map(4, workloads.shard_sum, pool="default")  # type: ignore[arg-type]


async def test_items_that_cannot_be_pickled_fail_by_index() -> None:
    lock = threading.Lock()
    out = await ashard.map(
        workloads.identity, [0, 1, lock, 3, 4], chunk_size=5, errors="collect", workers=2
    )
    assert out[:2] == [0, 1] and out[3:] == [3, 4]
    failure = out[2]
    assert isinstance(failure, ashard.ShardFailed) and failure.attempts == 0
    assert "item 2 failed: it cannot be sent to a worker process" in str(failure)
    assert isinstance(failure.__cause__, TypeError)
    with pytest.raises(ashard.ShardMapError, match="item 2 failed"):
        await ashard.map(workloads.identity, [0, 1, lock], workers=2)


async def test_items_that_cannot_be_loaded_in_the_worker_fail_by_index() -> None:
    out = await ashard.map(
        workloads.identity, [0, workloads.RebuildFails(), 2], chunk_size=3, errors="collect"
    )
    assert out[0] == 0 and out[2] == 2
    assert isinstance(out[1], ashard.ShardFailed)
    assert "item 1 could not be loaded in the worker" in str(out[1])
    assert "cannot be rebuilt" in str(out[1])
    res = await ashard.shard_map(
        [0, 1, workloads.RebuildFails(), 3], workloads.shard_items, errors="collect", workers=1
    )
    assert [f.shard_id for f in res.failures] == [2]
    assert "the items of shard 2 could not be loaded in the worker" in str(res.failures[0])


async def test_a_borrow_that_cannot_be_loaded_names_its_key() -> None:
    res = await ashard.shard_map(
        2,
        workloads.shard_sum_taking_any,
        borrow={"fine": 1, "broken": workloads.RebuildFails()},
        errors="collect",
        workers=1,
    )
    assert len(res.failures) == len(res.shards)
    assert all("borrow['broken'] could not be loaded in the worker" in str(f) for f in res.failures)


async def test_call_arguments_that_cannot_be_loaded_say_so() -> None:
    with pytest.raises(pickle.UnpicklingError, match="function or arguments could not be loaded"):
        await ashard.call(workloads.identity, workloads.RebuildFails())
    assert await ashard.call(abs, -3) == 3
    large = np.ones(1 << 18)  # 2 MiB: it goes as a segment, the rest with the call
    with pytest.raises(pickle.UnpicklingError, match="function or arguments could not be loaded"):
        await ashard.call(workloads.identity, (large, workloads.RebuildFails()))
    assert (await ashard.call(workloads.identity, large)).sum() == large.size


@pytest.mark.parametrize(
    ("options", "exc", "words"),
    [
        ({"timeout": 1e10}, ValueError, "timeout must be at most 1e\\+08 seconds"),
        ({"chunk_size": np.array([1, 2])}, TypeError, "chunk_size must be a positive int"),
        ({"cow": np.array(["deny", "allow"])}, ValueError, "cow must be one of"),
        ({"errors": np.array(["raise"])}, ValueError, "errors must be one of"),
        ({"timeout": np.array([1.0, 2.0])}, TypeError, "timeout must be a positive number"),
        ({"max_retries": np.int64(-1)}, ValueError, "max_retries must be an int >= 0"),
    ],
)
async def test_odd_option_values_are_refused_by_name(
    options: dict[str, Any], exc: type[Exception], words: str
) -> None:
    pool = ashard.Pool(1)
    with pytest.raises(exc, match=words):
        await pool.shard_map(4, workloads.shard_sum, **options)
    assert pool.stats.started == 0
    await pool.aclose()


def test_odd_pool_seconds_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="idle_timeout must be at most"):
        ashard.Pool(1, idle_timeout=1e10)
    with pytest.raises(ValueError, match="health_check_interval must be at most"):
        ashard.Pool(1, health_check_interval=1e12)


async def test_a_refused_call_changes_nothing(tmp_path: Path) -> None:
    pool = ashard.default_pool()
    await ashard.map(abs, [1, 2], workers=2)
    pids = pool.pids  # one or two: the pool starts workers as work needs them
    with pytest.raises(ValueError, match="errors must be one of"):
        await ashard.map(abs, [1, 2], workers=1, errors="ignore")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fn must be callable"):
        await ashard.shard_map(4, 42, workers=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fn must be callable"):
        ashard.shard_stream(4, 42, workers=1)  # type: ignore[arg-type]
    assert pool is ashard.default_pool() and pool.workers == 2 and pool.pids == pids
    # refused once the call runs (a borrow that cannot be pickled, a sink's directory
    # that is not empty), and by then the call had asked for another size
    lock = {"lock": threading.Lock()}  # cannot be pickled
    fn = workloads.shard_sum_taking_any
    with pytest.raises(TypeError, match=r"borrow\['lock'\].*pickled"):
        await ashard.shard_map(3, fn, workers=1, borrow=lock)
    with pytest.raises(TypeError, match=r"borrow\['lock'\].*pickled"):
        await ashard.map(workloads.identity_taking_any, [1], workers=1, borrow=lock)
    with pytest.raises(TypeError, match=r"borrow\['lock'\].*pickled"):
        await ashard.shard_reduce(3, fn, max, workers=1, borrow=lock)
    with pytest.raises(TypeError, match=r"borrow\['lock'\].*pickled"):
        async with ashard.shard_stream(3, fn, workers=1, borrow=lock):
            pass
    with pytest.raises(ValueError, match="results_path 'nosuch://x' is not a URI"):
        async with ashard.shard_stream(3, workloads.shard_sum, workers=1, results="disk",
                                       results_path="nosuch://x"):  # fmt: skip
            pass
    with pytest.raises(ValueError, match="not empty"):
        await ashard.shard_map(3, workloads.shard_sum, workers=1, results="disk",
                               results_path=_a_file_in(tmp_path))  # fmt: skip
    assert pool is ashard.default_pool() and pool.workers == 2 and pool.pids == pids
    assert await ashard.map(abs, [-1], workers=1) == [1]  # an accepted call resizes
    assert pool.workers == 1


def test_a_refused_sync_call_changes_nothing() -> None:
    try:
        ashard.sync.map(abs, [1, 2], workers=2)
        pool = ashard.sync.default_pool()
        pids = pool.pids
        lock = {"lock": threading.Lock()}
        with pytest.raises(TypeError, match=r"borrow\['lock'\].*pickled"):
            ashard.sync.shard_map(3, workloads.shard_sum_taking_any, workers=1, borrow=lock)
        with pytest.raises(TypeError, match=r"borrow\['lock'\].*pickled"):
            ashard.sync.map(workloads.identity_taking_any, [1], workers=1, borrow=lock)
        with pytest.raises(TypeError, match=r"borrow\['lock'\].*pickled"):  # noqa: SIM117 - the with is the call
            with ashard.sync.shard_stream(
                3, workloads.shard_sum_taking_any, workers=1, borrow=lock
            ):
                pass
        assert pool.workers == 2 and pool.pids == pids
    finally:
        ashard.sync.shutdown()


def _a_file_in(path: Path) -> Path:
    (path / "there").write_text("x")
    return path


async def test_a_masked_array_arrives_with_its_mask() -> None:
    data = np.ma.masked_array(np.arange(10.0), mask=[i % 3 == 0 for i in range(10)])
    res = await ashard.shard_map(
        2, lambda sh, X: (type(X).__name__, float(X.sum()), int(X.count())),
        borrow={"X": data}, workers=1,
    )  # fmt: skip
    assert res.results == [("MaskedArray", float(data.sum()), 6)] * len(res.shards)
    with pytest.raises(TypeError, match="share\\(\\) takes a plain numpy array"):
        ashard.share(data)


async def test_a_borrow_name_fn_does_not_take_is_refused_before_any_worker_runs() -> None:
    async with ashard.Pool(1) as pool:
        pid = pool.pids
        with pytest.raises(TypeError, match=r"borrow\['Xs'\]: fn borrowed_sum takes no "
                           r"argument 'Xs'.*\(shard, X, hold\): did you mean 'X'\?"):  # fmt: skip
            await pool.shard_map(2, workloads.borrowed_sum, borrow={"Xs": np.ones(3)})
        with pytest.raises(TypeError, match=r"borrow\['shard'\]"):  # the first is the shard's
            await pool.shard_map(2, workloads.borrowed_sum, borrow={"shard": 1, "X": 1})
        with pytest.raises(TypeError, match=r"borrow\['scale'\].*fn\(item, \*\*borrow"):
            await pool.map(workloads.identity, [1, 2], borrow={"scale": 2})
        with ashard.buffer("f8", 2) as buf, pytest.raises(TypeError, match=r"out\['Y'\]"):
            await pool.shard_map(2, workloads.borrowed_sum, borrow={"X": 1}, out={"Y": buf})
        assert pool.pids == pid and pool.stats.shards_done == 0  # nothing ran
        # what cannot be read or takes **kwargs is not second-guessed
        res = await pool.shard_map(2, workloads.shard_sum_taking_any, borrow={"anything": 1})
        assert res.results == [0, 1] or len(res.results) == 2
        assert await pool.map(functools.partial(workloads.identity_taking_any), [3],
                              borrow={"k": 1}) == [3]  # fmt: skip
        kw = {"X": np.arange(3.0), "hold": 0.0}
        assert (await pool.shard_map(1, workloads.borrowed_sum, borrow=kw)).results == [0.0]

"""Property-based tests of argument checking (hypothesis): whatever values the options,
`borrow` and the items take, a call either succeeds with the right results, or fails
with an ashard error, or is refused with a `TypeError` / `ValueError` that names one
of the arguments it was given — before any worker starts, and changing nothing.

One pool serves every example of a test (pools outlive event loops); it starts its
workers on the first call that is not refused.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import anyio
import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import ashard
import workloads

OPTIONS = ["chunk_size", "timeout", "max_retries", "retry_errors", "seed", "cow", "errors",
           "progress", "profile", "on_error"]  # fmt: skip
WORDS = ["auto", "deny", "allow", "audit", "raise", "collect", "default", "memory", "speed"]

odd_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 6),
    st.integers(2**40, 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(1e-6, 5.0),
    st.sampled_from(WORDS),
    st.text(max_size=6),
    st.builds(np.array, st.lists(st.integers(0, 3), min_size=1, max_size=3)),
    st.builds(np.int64, st.integers(-2, 6)),
    st.lists(st.integers(), max_size=2),
    st.just(object()),
)
odd_arrays = st.sampled_from(
    [
        np.arange(6, dtype=np.int8),
        np.ones((2, 3), dtype=np.complex64),
        np.zeros(4, dtype=bool),
        np.array([object(), 1], dtype=object),
        np.array(["2026-12-01"], dtype="datetime64[D]"),
        np.zeros(3, dtype=[("a", "i4"), ("b", "f8")]),
        np.ma.masked_array([1.0, 2.0, 3.0], mask=[0, 1, 0]),
        np.arange(12.0).reshape(3, 4)[:, ::2],
        np.empty((0, 5)),
    ]
)
borrow_values = st.one_of(st.integers(), st.text(max_size=5), odd_arrays, st.just(threading.Lock()))
borrows = st.dictionaries(
    st.one_of(st.sampled_from(["X", "table", "n"]), st.text(max_size=4)), borrow_values, max_size=3
)

SHARED = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]  # one pool, on purpose


@pytest.fixture
def pool() -> Iterator[ashard.Pool]:
    shared = ashard.Pool(2)
    yield shared
    anyio.run(shared.aclose)


def refused_by_name(exc: BaseException, names: list[str]) -> bool:
    return isinstance(exc, TypeError | ValueError) and any(n in str(exc) for n in names)


def sum_of(shard: ashard.Shard, **borrowed: Any) -> int:
    return int(sum(shard.idx))


@settings(max_examples=80, deadline=None, suppress_health_check=SHARED)
@given(options=st.dictionaries(st.sampled_from(OPTIONS), odd_values, max_size=4), borrow=borrows)
def test_any_options_and_borrow_succeed_fail_cleanly_or_are_refused_by_name(
    pool: ashard.Pool, options: dict[str, Any], borrow: dict[str, Any]
) -> None:
    started = pool.stats.started
    layout = ashard.shards(8, block_size=2)
    try:
        res = anyio.run(lambda: pool.shard_map(layout, sum_of, borrow=borrow, **options))
    except ashard.ShardMapError as exc:  # e.g. a tiny timeout: every shard timed out
        assert all(isinstance(e, ashard.ShardError) for e in exc.exceptions)
        return
    except (TypeError, ValueError) as exc:
        assert refused_by_name(exc, [*options, "borrow", "fn"]), repr(exc)
        assert pool.stats.started == started, "a refused call started a worker"
        return
    expected = [sum(s.idx) for s in layout]
    assert [r for r in res.results if r is not None] == [
        v for v, r in zip(expected, res.results, strict=True) if r is not None
    ]
    assert all(isinstance(f, ashard.ShardError) for f in res.failures)
    if not res.failures:
        assert res.results == expected


item_values = st.one_of(
    st.integers(),
    st.text(max_size=5),
    st.binary(max_size=8),
    st.none(),
    st.floats(allow_nan=False),
    st.just(threading.Lock()),
    st.just(workloads.RebuildFails()),
    odd_arrays,
)


@settings(max_examples=40, deadline=None, suppress_health_check=SHARED)
@given(items=st.lists(item_values, max_size=12), chunk_size=st.integers(1, 5))
def test_any_items_come_back_whole_or_fail_by_index(
    pool: ashard.Pool, items: list[Any], chunk_size: int
) -> None:
    out = anyio.run(
        lambda: pool.map(workloads.identity, items, chunk_size=chunk_size, errors="collect")
    )
    assert len(out) == len(items)
    for i, (item, value) in enumerate(zip(items, out, strict=True)):
        if isinstance(value, ashard.ShardFailed):
            assert f"item {i} " in str(value), str(value)
            assert isinstance(item, type(threading.Lock()) | workloads.RebuildFails)
        elif isinstance(item, np.ndarray):
            assert type(value) is type(item) and value.dtype == item.dtype
            assert value.shape == item.shape
            if item.dtype.hasobject:  # copies of the objects: compare what they are
                assert [type(x) for x in value.flat] == [type(x) for x in item.flat]
            else:
                assert value.tobytes() == item.tobytes()
        else:
            assert value == item or (value != value and item != item)

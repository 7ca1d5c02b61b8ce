"""Error rules (DESIGN 2.6): `retry_errors` as a type, a tuple or a predicate, and
`on_error` rules - "retry", "skip", "raise", `ashard.Retry` with a backoff - on real
worker processes, under asyncio and trio; the rule engine alone at the end."""

from __future__ import annotations

import random
from typing import Any

import pytest

import ashard
import workloads
from ashard._protocol import RAISED, TIMEOUT
from ashard._rules import FAIL, RETRY, SKIP, ErrorRules, check_on_error, check_retry_errors
from ashard.errors import ShardFailed, ShardTimeout, WorkerCrashed

pytestmark = pytest.mark.anyio

ONE_EACH = ashard.shards(8, block_size=1)


def _columns(res: Any, *names: str) -> list[tuple[Any, ...]]:
    """Rows of the call's `shards_table()`, these columns, sorted."""
    table = res.diagnostics.shards_table()
    return sorted(zip(*(table.column(c).to_pylist() for c in names), strict=True))


def _rows(res: Any) -> list[tuple[Any, ...]]:
    return _columns(res, "shard_id", "attempt", "outcome", "rule")


async def test_skip_retry_and_raise_each_follow_their_rule() -> None:
    plan = {
        1: ("ValueError", 0),  # skipped
        2: ("ConnectionError", 2),  # two failures, then fine: Retry(3) suffices
        3: ("KeyError", 0),  # "raise": no retry, although retry_errors=True
        4: ("RuntimeError", 1),  # no rule: retry_errors=True retries it under max_retries
    }
    res = await ashard.shard_map(
        ONE_EACH, workloads.raise_as_planned, borrow={"plan": plan}, errors="collect",
        retry_errors=True, max_retries=1, workers=2,
        on_error={ValueError: "skip", ConnectionError: ashard.Retry(3), KeyError: "raise"},
    )  # fmt: skip
    assert res.skipped == (1,)
    assert res.results == [0, None, 20, None, 40, 50, 60, 70]
    assert [(f.shard_id, f.attempts) for f in res.failures] == [(3, 1)]
    assert isinstance(res.failures[0], ShardFailed)
    assert isinstance(res.failures[0].__cause__, KeyError)
    d = res.diagnostics
    assert (d.skipped, d.failures, d.retries, d.error_retries) == (1, 1, 3, 3)
    failed = [row for row in _rows(res) if row[2] != "ok"]
    assert failed == [
        (1, 1, "failed", "skip"),
        (2, 1, "failed", "retry"),
        (2, 2, "failed", "retry"),
        (3, 1, "failed", "raise"),
        (4, 1, "failed", None),
    ]


async def test_the_first_matching_rule_wins_over_a_more_specific_one() -> None:
    plan = {0: ("ConnectionRefusedError", 0), 1: ("ConnectionError", 0)}
    res = await ashard.shard_map(
        ashard.shards(3, block_size=1), workloads.raise_as_planned, borrow={"plan": plan},
        errors="collect", workers=1,
        on_error={OSError: "skip", ConnectionRefusedError: "raise", ConnectionError: "raise"},
    )  # fmt: skip
    assert res.skipped == (0, 1) and res.ok and res.results == [None, None, 20]


async def test_a_retry_rule_is_spent_then_the_shard_fails_and_errors_raise_raises() -> None:
    plan = {0: ("ConnectionError", 0)}
    with pytest.raises(ashard.ShardMapError) as info:
        await ashard.shard_map(
            ashard.shards(2, block_size=1), workloads.raise_as_planned, borrow={"plan": plan},
            max_retries=0, workers=1, on_error={ConnectionError: ashard.Retry(2)},
        )  # fmt: skip
    (error,) = info.value.exceptions
    assert isinstance(error, ShardFailed) and error.attempts == 3
    assert isinstance(error.__cause__, ConnectionError)
    assert info.value.result is not None
    rules = [row[3] for row in _rows(info.value.result) if row[0] == 0]
    assert rules == ["retry", "retry", "raise"]


async def test_a_skip_under_errors_raise_is_not_a_failure() -> None:
    plan = {2: ("ValueError", 0)}
    res = await ashard.shard_map(
        ONE_EACH, workloads.raise_as_planned, borrow={"plan": plan}, workers=2,
        on_error={ValueError: "skip"},
    )  # fmt: skip
    assert res.ok and res.skipped == (2,) and res.results[2] is None
    assert "1 skipped" in repr(res)


async def test_backoff_waits_in_the_queue_not_in_a_worker() -> None:
    """One worker: shard 0 fails once and backs off 1.5 s; the other shards run on the
    only worker meanwhile, so shard 0's second run starts after all of them ended."""
    plan = {0: ("ConnectionError", 1)}
    res = await ashard.shard_map(
        ashard.shards(6, block_size=1), workloads.raise_as_planned, borrow={"plan": plan},
        chunk_size=1, workers=1,
        on_error={ConnectionError: ashard.Retry(1, backoff=ashard.Backoff(1.5, jitter=0))},
    )  # fmt: skip
    assert res.results == [0, 10, 20, 30, 40, 50]
    runs = _columns(res, "shard_id", "attempt", "start", "end")
    first, second = runs[0], runs[1]
    assert (first[:2], second[:2]) == ((0, 1), (0, 2))
    others_end = max(end for sid, _, _, end in runs if sid != 0)
    assert second[2] >= others_end  # the others ran during the wait
    assert second[2] - first[3] >= 1.4  # and it did wait (a little clock slack)


async def test_crashes_and_timeouts_are_matched_only_by_rules_naming_them() -> None:
    plan = {0: ("sigkill", 0), 1: ("hang", 0)}
    res = await ashard.shard_map(
        ashard.shards(4, block_size=1), workloads.raise_as_planned, borrow={"plan": plan},
        errors="collect", timeout=1.0, max_retries=1, chunk_size=1, workers=2,
        on_error={Exception: "skip", TimeoutError: "skip", ashard.WorkerCrashed: "skip"},
    )  # fmt: skip
    assert res.skipped == (0,)  # skipped at its first crash, in place of max_retries
    assert [type(f) for f in res.failures] == [ShardTimeout]  # Exception/TimeoutError: no
    assert res.failures[0].shard_id == 1 and res.failures[0].attempts == 2
    assert res.diagnostics.crashes == 1 and res.diagnostics.error_retries == 0
    assert [row[3] for row in _rows(res) if row[0] == 0] == ["skip"]


async def test_a_timeout_rule_replaces_max_retries() -> None:
    plan = {0: ("hang", 2)}
    res = await ashard.shard_map(
        ashard.shards(2, block_size=1), workloads.raise_as_planned, borrow={"plan": plan},
        timeout=0.5, max_retries=0, workers=1, on_error={ShardTimeout: ashard.Retry(2)},
    )  # fmt: skip
    assert res.results == [0, 10]
    assert res.diagnostics.timeouts == 2 and res.diagnostics.error_retries == 0


@pytest.mark.parametrize(
    "retry_errors",
    [ConnectionError, (KeyError, ConnectionError), lambda exc: "run 1" in str(exc)],
    ids=["type", "tuple", "predicate"],
)
async def test_retry_errors_selects_what_it_retries(retry_errors: Any) -> None:
    plan = {0: ("ConnectionError", 1), 1: ("ValueError", 0)}
    res = await ashard.shard_map(
        ashard.shards(3, block_size=1), workloads.raise_as_planned, borrow={"plan": plan},
        errors="collect", retry_errors=retry_errors, workers=2,
    )  # fmt: skip
    assert res.results[0] == 0  # retried once, then fine
    expected = 2 if callable(retry_errors) and not isinstance(retry_errors, type) else 1
    assert [(f.shard_id, f.attempts) for f in res.failures] == [(1, expected)]


async def test_a_predicate_that_raises_is_the_calls_error() -> None:
    def predicate(exc: BaseException) -> bool:
        raise LookupError("predicate broke")

    plan = {0: ("ValueError", 0)}
    with pytest.raises(LookupError, match="predicate broke"):
        await ashard.shard_map(
            ashard.shards(2, block_size=1), workloads.raise_as_planned, borrow={"plan": plan},
            retry_errors=predicate, workers=1,
        )  # fmt: skip


async def test_map_stream_and_reduce_apply_the_rules() -> None:
    def f(x: int) -> int:
        if x == 3:
            raise ValueError(x)
        return x

    rules = {ValueError: "skip"}
    assert await ashard.map(f, range(6), on_error=rules, workers=2) == [0, 1, 2, None, 4, 5]
    plan = {3: ("ValueError", 0)}
    done = []
    async with ashard.shard_stream(
        ashard.shards(5, block_size=1), workloads.raise_as_planned, borrow={"plan": plan},
        on_error=rules, workers=2,
    ) as stream:  # fmt: skip
        async for item in stream:
            done.append((item.shard.id, item.value, item.error, item.skipped))
    assert sorted(done) == [(i, None if i == 3 else i * 10, None, i == 3) for i in range(5)]
    reduced = await ashard.shard_reduce(
        ashard.shards(5, block_size=1), workloads.raise_as_planned, combine=lambda a, b: a + b,
        borrow={"plan": plan}, on_error=rules, workers=2,
    )  # fmt: skip
    assert reduced.value == 0 + 10 + 20 + 40 and reduced.skipped == (3,) and reduced.ok


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"retry_errors": "yes"}, "retry_errors must be True, False, an exception type"),
        ({"retry_errors": (ValueError, 3)}, "retry_errors must be"),
        ({"retry_errors": ()}, "retry_errors must be"),
        ({"on_error": [ValueError]}, "on_error must be a mapping"),
        ({"on_error": {"ValueError": "skip"}}, "on_error keys must be exception types"),
        ({"on_error": {ValueError: "ignore"}}, r"on_error\[ValueError\] must be 'retry'"),
        ({"on_error": {int: "skip"}}, "on_error keys must be exception types"),
    ],
)
async def test_bad_rules_are_refused_naming_the_option(options: Any, match: str) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        await ashard.shard_map(2, workloads.shard_sum, workers=1, **options)


def test_bad_retry_and_backoff_values_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match="Retry attempts must be an int >= 0"):
        ashard.Retry(-1)
    with pytest.raises(TypeError, match="Retry attempts must be an int"):
        ashard.Retry(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Retry backoff must be seconds"):
        ashard.Retry(1, backoff="1s")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Backoff factor must be from 1"):
        ashard.Backoff(factor=0.5)
    with pytest.raises(ValueError, match="Backoff jitter must be from 0 to 1"):
        ashard.Backoff(jitter=2)
    with pytest.raises(ValueError, match="Backoff base"):
        ashard.Backoff(base=float("nan"))


# -- the rule engine alone ---------------------------------------------------------------


def _failed(exc: BaseException) -> ShardFailed:
    err = ShardFailed("x", shard=None, attempts=1, remote_traceback="")
    err.__cause__ = exc
    return err


def test_retry_counts_apart_from_max_retries_and_string_retry_takes_max_retries() -> None:
    rules = ErrorRules(2, False, check_on_error("on_error", {KeyError: "retry"}))
    crash = WorkerCrashed("c", shard=None, attempts=1, exitcode=None, signal=9)
    assert rules.decide(0, -1, crash).action == RETRY  # crash: max_retries, 1 of 2
    assert [rules.decide(0, RAISED, _failed(KeyError())).action for _ in range(3)] == [
        RETRY, RETRY, FAIL,
    ]  # fmt: skip
    assert rules.decide(0, -1, crash).action == RETRY  # the crash budget was untouched
    assert rules.decide(0, -1, crash).action == FAIL


def test_backoff_grows_to_its_max_and_jitter_stays_within_bounds() -> None:
    rng = random.Random(1)
    plain = ashard.Backoff(base=0.5, factor=2.0, max=3.0, jitter=0.0)
    assert [plain.delay(n, rng) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert plain.delay(10_000, rng) == 3.0  # no overflow
    jittered = ashard.Backoff(base=1.0, jitter=0.1)
    assert all(0.9 <= jittered.delay(1, rng) <= 1.1 for _ in range(200))
    assert ashard.Retry(2, backoff=0.25).delay(5, rng) == 0.25


def test_a_timeout_is_matched_by_its_own_type_only() -> None:
    timeout = ShardTimeout("t", shard=None, attempts=1)
    for key in (TimeoutError, Exception, ashard.ShardError, (OSError, BaseException)):
        rules = ErrorRules(0, True, check_on_error("on_error", {key: "skip"}))
        assert rules.decide(0, TIMEOUT, timeout).action == FAIL, key
    rules = ErrorRules(0, True, check_on_error("on_error", {(KeyError, ShardTimeout): "skip"}))
    assert rules.decide(0, TIMEOUT, timeout).action == SKIP
    assert check_retry_errors("retry_errors", ValueError) is ValueError

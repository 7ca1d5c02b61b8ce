"""Error rules: what follows a failed run of a shard (DESIGN 2.6).

A call's `retry_errors` (bool, an exception type, a tuple of them, or a predicate) and
`on_error` (exception types -> ``"retry"`` / ``"skip"`` / ``"raise"`` / `Retry`) are
checked here into `ErrorRules`, which the job (`ashard._job`) asks at every failed
run: run it again (and after how long), skip it, or fail it for good.

* The first `on_error` key (in order) that matches wins. Keys match the exception `fn`
  raised; ashard's own outcomes, `ShardTimeout` and `WorkerCrashed`, match only a key
  that is one of them or a subclass (never a builtin base such as `TimeoutError` or
  `Exception`), and such a rule replaces the `max_retries` budget for that outcome.
* A rule's retries are counted per shard and per rule; crashes and timeouts that no
  rule names share `max_retries`, and so do user errors `retry_errors` retries.
* A delay (`Backoff`) is spent in the job's queue, never in a worker or on the loop.

Everything here runs in the caller (predicates included): nothing of it goes to a
worker or a cluster.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ashard._protocol import RAISED
from ashard.errors import ShardError, ShardTimeout, WorkerCrashed

if TYPE_CHECKING:
    import random

__all__ = [
    "Backoff",
    "Decision",
    "ErrorRules",
    "OnError",
    "Retry",
    "RetryErrors",
    "check_on_error",
    "check_retry_errors",
]

ExcTypes = type[BaseException] | tuple[type[BaseException], ...]
RetryErrors = bool | ExcTypes | Callable[[BaseException], bool]
"""`retry_errors`: also retry shards whose fn raised (all, of these types, or those a
predicate of the exception accepts), up to `max_retries`."""
RuleName = Literal["retry", "skip", "raise"]


def _show(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:57] + '...' if len(text) > 60 else text}"


def _number(owner: str, name: str, value: object, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner} {name} must be a number, got {_show(value)}")
    number = float(value)
    if not low <= number <= high or math.isnan(number):
        bounds = f"from {low:g} to {high:g}" if high < math.inf else f">= {low:g} and finite"
        raise ValueError(f"{owner} {name} must be {bounds}, got {value!r}")
    return number


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential delays between a rule's retries: the n-th retry waits
    ``min(max, base * factor ** (n - 1))`` seconds, times a random factor within
    ``1 ± jitter`` (so that shards failing together do not come back together). The
    shard waits in the call's queue: no worker is held and nothing else waits."""

    __module__ = "ashard"

    base: float = 0.5
    factor: float = 2.0
    max: float = 30.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        check = _number
        object.__setattr__(self, "base", check("Backoff", "base", self.base, 0.0, 1e8))
        object.__setattr__(self, "factor", check("Backoff", "factor", self.factor, 1.0, 1e3))
        object.__setattr__(self, "max", check("Backoff", "max", self.max, 0.0, 1e8))
        object.__setattr__(self, "jitter", check("Backoff", "jitter", self.jitter, 0.0, 1.0))

    def delay(self, n: int, rng: random.Random) -> float:
        """Seconds before retry `n` (1 for the first)."""
        exponent = min(n - 1, 1000)
        try:
            plain = self.base * self.factor**exponent
        except OverflowError:
            plain = math.inf
        seconds = min(self.max, plain)
        if self.jitter:
            seconds *= 1.0 + rng.uniform(-self.jitter, self.jitter)
        return max(0.0, seconds)


@dataclass(frozen=True, slots=True)
class Retry:
    """An `on_error` rule: run a shard that failed so up to `attempts` more times
    (counted apart from `max_retries`), waiting `backoff` seconds (a number: each time;
    a `Backoff`: growing) in the queue before each."""

    __module__ = "ashard"

    attempts: int = 3
    backoff: float | Backoff = 0.0

    def __post_init__(self) -> None:
        n = self.attempts
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"Retry attempts must be an int >= 0, got {_show(n)}")
        if n < 0:
            raise ValueError(f"Retry attempts must be an int >= 0, got {n}")
        object.__setattr__(self, "attempts", int(n))
        if not isinstance(self.backoff, Backoff):
            if isinstance(self.backoff, bool) or not isinstance(self.backoff, numbers.Real):
                raise TypeError(
                    f"Retry backoff must be seconds (a number >= 0) or an ashard.Backoff, "
                    f"got {_show(self.backoff)}"
                )
            seconds = _number("Retry", "backoff", self.backoff, 0.0, 1e8)
            object.__setattr__(self, "backoff", seconds)

    def delay(self, n: int, rng: random.Random) -> float:
        """Seconds before retry `n` (1 for the first)."""
        if isinstance(self.backoff, Backoff):
            return self.backoff.delay(n, rng)
        return float(self.backoff)


OnError = Mapping[ExcTypes, RuleName | Retry]
"""`on_error`: exception types (or tuples of them) -> the rule for a shard that raised
one; the first matching key wins."""

_OUTCOME_TYPES = (ShardTimeout, WorkerCrashed)


def _exc_types(value: object) -> tuple[type[BaseException], ...] | None:
    """`value` as a tuple of exception types, or None if it is not one or a tuple of them."""
    if isinstance(value, type) and issubclass(value, BaseException):
        return (value,)
    if isinstance(value, tuple) and value and all(_is_exc_type(t) for t in value):
        return value
    return None


def _is_exc_type(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, BaseException)


def check_retry_errors(name: str, value: object) -> RetryErrors:
    """`retry_errors`: True, False, an exception type, a non-empty tuple of them, or a
    predicate ``f(exc) -> bool``."""
    if isinstance(value, bool):
        return value
    types = _exc_types(value)
    if types is not None:
        return types if isinstance(value, tuple) else types[0]
    if callable(value) and not isinstance(value, type):
        return value
    raise TypeError(
        f"{name} must be True, False, an exception type, a tuple of exception types or "
        f"a predicate f(exc) -> bool, got {_show(value)}"
    )


def check_on_error(name: str, value: object) -> OnError | None:
    """`on_error`: None, or a mapping of exception types (or tuples of them) to
    "retry", "skip", "raise" or an `ashard.Retry`."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{name} must be a mapping of exception types to 'retry', 'skip', 'raise' or "
            f"ashard.Retry(...), got {_show(value)}"
        )
    for key, rule in value.items():
        if _exc_types(key) is None:
            raise TypeError(
                f"{name} keys must be exception types or tuples of them, got {_show(key)}"
            )
        if not isinstance(rule, Retry) and rule not in ("retry", "skip", "raise"):
            raise ValueError(
                f"{name}[{getattr(key, '__name__', key)}] must be 'retry', 'skip', 'raise' "
                f"or ashard.Retry(...), got {rule!r}"
            )
    return dict(value)


RETRY, SKIP, FAIL = "retry", "skip", "fail"


@dataclass(frozen=True, slots=True)
class Decision:
    """What follows a failed run: `action` RETRY (after `delay` seconds), SKIP or
    FAIL; `rule` the on_error rule that decided ("retry", "skip", "raise"), None when
    none matched; `budget` what the retry counts against ("max_retries" or "rule")."""

    action: str
    rule: RuleName | None = None
    delay: float = 0.0
    count: int = 0  # the retry's number against its budget
    limit: int = 0  # the budget


_FAIL = Decision(FAIL)


class ErrorRules:
    """The rules of one call, and the retries each shard has had under them."""

    def __init__(
        self, max_retries: int, retry_errors: RetryErrors, on_error: OnError | None
    ) -> None:
        self.max_retries = max_retries
        self.retry_errors = retry_errors
        self.rules: list[tuple[tuple[type[BaseException], ...], Retry | str]] = []
        for key, rule in (on_error or {}).items():
            types = _exc_types(key)
            assert types is not None
            self.rules.append((types, Retry(max_retries) if rule == "retry" else rule))
        self.plain = not self.rules and isinstance(retry_errors, bool)
        """No rule and no filter: a decision needs no exception (the common case)."""
        self._charged: dict[int, int] = {}  # position -> failures against max_retries
        self._by_rule: dict[tuple[int, int], int] = {}  # (position, rule) -> its retries
        self._rng: random.Random | None = None  # a backoff's jitter, made when first needed

    def decide(self, pos: int, kind: int, error: ShardError | None) -> Decision:
        """What follows a failed run of `pos`: `kind` RAISED, TIMEOUT or CRASHED;
        `error` the `ShardError` it would fail with (None when `plain`). A predicate's
        exception propagates: it is the call's."""
        if self.rules and error is not None:
            subject = error.__cause__ if kind == RAISED else error
            if subject is not None:
                for index, (types, rule) in enumerate(self.rules):
                    if _matches(types, subject, ashards=kind != RAISED):
                        return self._by(pos, index, rule)
        charged = self._charged.get(pos, 0) + 1
        self._charged[pos] = charged
        if charged > self.max_retries:
            return _FAIL
        if kind == RAISED and not self._retries_user_error(error):
            return _FAIL
        return Decision(RETRY, None, 0.0, charged, self.max_retries)

    def _by(self, pos: int, index: int, rule: Retry | str) -> Decision:
        if rule == "skip":
            return Decision(SKIP, "skip")
        if rule == "raise":
            return Decision(FAIL, "raise")
        assert isinstance(rule, Retry)
        done = self._by_rule.get((pos, index), 0)
        if done >= rule.attempts:
            return Decision(FAIL, "raise")
        self._by_rule[(pos, index)] = done + 1
        if self._rng is None:
            import random  # a rule that retries: not on the supervisor's import path

            self._rng = random.Random()
        return Decision(RETRY, "retry", rule.delay(done + 1, self._rng), done + 1, rule.attempts)

    def _retries_user_error(self, error: ShardError | None) -> bool:
        which = self.retry_errors
        if isinstance(which, bool):
            return which
        exc = None if error is None else error.__cause__
        if exc is None:
            return False
        if isinstance(which, type | tuple):
            return isinstance(exc, which)
        return bool(which(exc))


def _matches(types: tuple[type[BaseException], ...], exc: BaseException, ashards: bool) -> bool:
    """Does a key of `types` match `exc`? One of ashard's own outcomes (`ashards`) is
    matched only by a type that names it or a subclass of it."""
    if not ashards:
        return isinstance(exc, types)
    return any(issubclass(t, _OUTCOME_TYPES) and isinstance(exc, t) for t in types)

"""The exceptions ashard raises.

Shard outcomes share one base so callers can catch them together::

    Exception
     ├── ShardError                 one shard failed for good (.shard, .attempts)
     │    ├── ShardFailed           fn raised; __cause__ is the original exception
     │    ├── ShardTimeout          ran past `timeout` (also a TimeoutError)
     │    └── WorkerCrashed         the worker process died (.exitcode, .signal)
     ├── ExceptionGroup
     │    └── ShardMapError         errors="raise": the failures, plus .result
     ├── RuntimeError
     │    └── WorkerStartError      a worker could not start (bad interpreter, init failed)
     ├── ValueError
     │    ├── SchemaMismatch        a table written to a sink does not fit its schema
     │    └── GatherTooLarge        res.table() would hold more than max_bytes
     └── UserWarning
          └── HygieneWarning        (a warning) tasks changed their worker's process-wide state

Bad arguments raise the builtin `TypeError` / `ValueError` before any worker runs.
The errors are made from worker reports in one place, `ashard._outcomes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from ashard.results import ReduceResult, ShardResult
    from ashard.shards import Shard

__all__ = [
    "GatherTooLarge",
    "HygieneWarning",
    "SchemaMismatch",
    "ShardError",
    "ShardFailed",
    "ShardMapError",
    "ShardTimeout",
    "WorkerCrashed",
    "WorkerStartError",
]


class HygieneWarning(UserWarning):
    """Warned once per call whose shards (or whose `call`) changed process-wide state in
    their worker: what was put back, and what could not be (threads, processes or file
    descriptors left behind). `Diagnostics.hygiene` lists every note by shard."""

    __module__ = "ashard"


class ShardError(Exception):
    """A shard that failed permanently: `shard` is the `Shard`, `attempts` how often it ran."""

    __module__ = "ashard"

    def __init__(self, message: str, *, shard: Shard | None, attempts: int) -> None:
        super().__init__(message)
        self.shard = shard
        self.attempts = attempts

    @property
    def shard_id(self) -> int | None:
        """The failed shard's id, or None for `ashard.call`."""
        return None if self.shard is None else self.shard.id

    def __reduce__(self) -> tuple[Any, ...]:
        # its fields are keyword-only: pickle the message and the fields apart
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[ShardError], args: tuple[Any, ...], state: dict[str, Any]) -> ShardError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class ShardFailed(ShardError):
    """`fn` raised. The original exception is `__cause__`; the worker's traceback text is
    in `remote_traceback`."""

    __module__ = "ashard"

    def __init__(
        self, message: str, *, shard: Shard | None, attempts: int, remote_traceback: str
    ) -> None:
        super().__init__(message, shard=shard, attempts=attempts)
        self.remote_traceback = remote_traceback


class ShardTimeout(ShardError, TimeoutError):
    """The shard ran past `timeout` seconds on every attempt. `stack`: its Python stack
    where it was stopped (the last attempt's; also a note on the exception), or None
    when the worker could not say (it was killed: a hang in code that ignores the
    interrupt)."""

    __module__ = "ashard"

    def __init__(
        self, message: str, *, shard: Shard | None, attempts: int, stack: str | None = None
    ) -> None:
        super().__init__(message, shard=shard, attempts=attempts)
        self.stack = stack
        if stack is not None:
            self.add_note(f"ashard: where it was stopped:\n{stack.rstrip()}")
        else:
            self.add_note(
                "ashard: no stack: the worker did not answer the interrupt (a hang in C "
                "code that ignores signals) and was killed"
            )


class WorkerCrashed(ShardError):
    """The worker running the shard died: `exitcode` (if it exited) or `signal` (if
    killed). `oom`: the kernel's out-of-memory killer (a SIGKILL with the worker near its
    limit, or counted in its cgroup's ``memory.events``) or ashard's hard memory limit
    ended it."""

    __module__ = "ashard"

    def __init__(
        self,
        message: str,
        *,
        shard: Shard | None,
        attempts: int,
        exitcode: int | None,
        signal: int | None,
        oom: bool = False,
    ) -> None:
        super().__init__(message, shard=shard, attempts=attempts)
        self.exitcode = exitcode
        self.signal = signal
        self.oom = oom


class WorkerStartError(RuntimeError):
    """A worker process could not be started or did not report ready."""

    __module__ = "ashard"


class ShardMapError(ExceptionGroup[ShardError]):
    """Raised under ``errors="raise"``: the permanent failures, with the partial
    `ShardResult` in `result` (``None`` in the slots of unfinished shards)."""

    __module__ = "ashard"

    result: ShardResult | ReduceResult | None

    def __new__(
        cls,
        message: str,
        exceptions: Sequence[ShardError],
        result: ShardResult | ReduceResult | None = None,
    ) -> Self:
        self = super().__new__(cls, message, exceptions)
        self.result = result
        return self

    def __init__(
        self,
        message: str,
        exceptions: Sequence[ShardError],
        result: ShardResult | ReduceResult | None = None,
    ) -> None:
        super().__init__(message, exceptions)

    @classmethod
    def of(
        cls,
        failures: Sequence[ShardError],
        result: ShardResult | ReduceResult | None,
        noun: str = "shard",
    ) -> ShardMapError:
        """The error of a call whose `failures` (not empty) are permanent: the one place
        its message is made ("3 shards failed; first: ...")."""
        n = len(failures)
        more = f" (and {n - 1} more)" if n > 1 else ""
        message = f"{n} {noun}{'s' if n > 1 else ''} failed; first: {failures[0]}{more}"
        return cls(message, failures, result)

    # `split()` / `subgroup()` keep the type and the result (typeshed's `derive` is
    # generic in the exception type, so narrowing it is an override mypy refuses).
    def derive(self, excs: Sequence[ShardError]) -> ShardMapError:  # type: ignore[override]
        return ShardMapError(self.message, excs, self.result)


class SchemaMismatch(ValueError):
    """A table written to a sink (or returned under ``results="table"``) does not fit the
    sink's schema; `fields` names every field that differs."""

    __module__ = "ashard"

    def __init__(self, message: str, fields: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.fields = tuple(fields)

    def __reduce__(self) -> tuple[type[SchemaMismatch], tuple[str, tuple[str, ...]]]:
        return type(self), (str(self), self.fields)


class GatherTooLarge(ValueError):
    """`ShardResult.table()` would hold more than `max_bytes` in memory: `size` and
    `limit` are the bytes it would take and the limit."""

    __module__ = "ashard"

    def __init__(self, message: str, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit

    def __reduce__(self) -> tuple[type[GatherTooLarge], tuple[str, int, int]]:
        return type(self), (str(self), self.size, self.limit)


class RemoteTraceback(Exception):
    """Carries a worker's traceback text as the `__cause__` of a re-raised user exception,
    so a printed traceback shows where in the worker the error happened."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    @classmethod
    def attach(cls, exc: BaseException, text: str | None) -> BaseException:
        """`exc`, rebuilt from a worker, with that worker's traceback `text` as its cause
        (unless it came with a cause of its own): the one place this is done."""
        if text is not None and exc.__cause__ is None:
            exc.__cause__ = cls(text)
        return exc

    def __str__(self) -> str:
        return "\n\n" + self.text.rstrip()

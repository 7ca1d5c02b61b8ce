"""Worker reports -> what the caller sees: a value, or `ShardFailed`, `ShardTimeout`,
`WorkerCrashed` (for shards and for `call` alike), or `WorkerStartError`.

Every error ashard makes from a worker's report is made here, so messages read the
same everywhere: what failed ("shard 3", "item 5", "call"), how, and after how many
attempts; crash messages name the signal and its likely cause.
"""

from __future__ import annotations

import signal as _signal
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from ashard._log import warn_user
from ashard._protocol import INTERRUPTED, RAISED, TIMEOUT
from ashard._serialize import ExcRecord, LoadError, decode_exception
from ashard._serialize import show_error as _show
from ashard.errors import (
    HygieneWarning,
    RemoteTraceback,
    ShardError,
    ShardFailed,
    ShardTimeout,
    WorkerCrashed,
    WorkerStartError,
)

if TYPE_CHECKING:
    from ashard.shards import Shard

__all__ = [
    "CRASHED",
    "Loss",
    "call_outcome",
    "describe_exit",
    "failure",
    "first_error",
    "interrupt_in",
    "output_failure",
    "remote_exception",
    "start_failure",
    "unreadable_result",
    "unsendable_items",
    "warn_hygiene",
]

CRASHED = -1
"""Failure kind for a worker death (RAISED and TIMEOUT come from the worker itself)."""


@dataclass(frozen=True, slots=True)
class Loss:
    """How a worker ended while it held work: exit code or signal, and `note` when
    ashard killed it on purpose (past the hard memory limit)."""

    pid: int
    exitcode: int | None
    signal: int | None
    note: str | None = None
    memory_tight: bool = False  # its memory was near a limit (a SIGKILL: likely the OOM killer)
    oom: bool = False  # the kernel's out-of-memory killer or ashard's hard limit ended it
    stack: str | None = None  # killed hung past a timeout: its threads' stacks, if it said


def remote_exception(record: ExcRecord) -> BaseException:
    """The worker's exception, rebuilt (its own type where it unpickles), with the
    worker's traceback as its cause."""
    return RemoteTraceback.attach(decode_exception(record), record[3])


def failure(
    kind: int,
    detail: Any,
    *,
    subject: str,
    shard: Shard | None,
    attempts: int,
    timeout: float | None,
) -> ShardError:
    """The permanent failure of `subject` ("shard 3", "item 5", or "call" with no
    shard): `detail` is the exception record (RAISED) or the `Loss` (CRASHED)."""
    shown = shard is not None or attempts > 1  # a call that ran once needs no count
    tries = f" ({attempts} attempt{'s' if attempts > 1 else ''})" if shown else ""
    if kind == RAISED:
        exc = remote_exception(detail)
        err: ShardError = ShardFailed(
            f"{subject} failed: {_show(exc)}",
            shard=shard,
            attempts=attempts,
            remote_traceback=detail[3],
        )
        err.__cause__ = exc
        return err
    if kind == TIMEOUT:  # detail: (seconds, stack) from the worker, or None (killed)
        stack = detail[1] if isinstance(detail, tuple) else None
        return ShardTimeout(
            f"{subject} ran past its timeout of {timeout} s{tries}", shard=shard,
            attempts=attempts, stack=stack,
        )  # fmt: skip
    assert kind == CRASHED, kind
    loss: Loss = detail
    note = f"; {loss.note}" if loss.note else ""
    return WorkerCrashed(
        f"{subject}: {describe_exit(loss.pid, loss.exitcode, loss.signal, loss.memory_tight)}"
        f"{note}{tries}",
        shard=shard,
        attempts=attempts,
        exitcode=loss.exitcode,
        signal=loss.signal,
        oom=loss.oom,
    )


def unreadable_result(
    subject: str, shard: Shard | None, attempts: int, exc: Exception
) -> ShardFailed:
    """`subject` ran, but its result, pickled in the worker, does not unpickle here:
    a `ShardFailed` caused by a `LoadError` (a `pickle.UnpicklingError`)."""
    err = _local_failure(subject, shard, attempts, exc, "its result could not be unpickled")
    err.__cause__ = LoadError("its result", exc, "the parent")
    return err


def output_failure(subject: str, shard: Shard | None, attempts: int, exc: Exception) -> ShardFailed:
    """`subject` ran and committed a file the parent cannot keep (`exc`, such as a
    `SchemaMismatch` against the sink's schema)."""
    err = ShardFailed(
        f"{subject} failed: {_show(exc)}", shard=shard, attempts=attempts,
        remote_traceback=_text_of(exc),
    )  # fmt: skip
    err.__cause__ = exc
    return err


def unsendable_items(subject: str, shard: Shard | None, exc: Exception) -> ShardFailed:
    """The items of `subject` cannot be pickled, so it never ran."""
    what = "it cannot be sent to a worker process: it could not be pickled"
    return _local_failure(subject, shard, 0, exc, what)


def _local_failure(
    subject: str, shard: Shard | None, attempts: int, exc: Exception, what: str
) -> ShardFailed:
    """A failure that happened in the parent: the traceback is the parent's."""
    err = ShardFailed(
        f"{subject} failed: {what} ({_show(exc)})",
        shard=shard,
        attempts=attempts,
        remote_traceback=_text_of(exc),
    )
    err.__cause__ = exc
    return err


def _text_of(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(exc))
    except Exception:
        return _show(exc)


def call_outcome(values: list[Any], errors: list[Any]) -> Any:
    """The value of a finished `call`, or raise what it raised (the original exception,
    as the standard library's executors do). A timeout is the caller's to retry."""
    if not errors:
        return values[0]
    _, kind, detail = errors[0]
    if kind == RAISED:
        raise remote_exception(detail)
    assert kind == INTERRUPTED, kind
    raise RuntimeError("ashard internal error: call interrupted without cancellation")


def start_failure(pid: int, record: ExcRecord) -> WorkerStartError:
    """`init` raised in a new worker."""
    exc = remote_exception(record)
    err = WorkerStartError(f"init failed in worker {pid}: {exc!r}")
    err.__cause__ = exc
    return err


def warn_hygiene(notes: Mapping[int | None, tuple[str, ...]], noun: str) -> None:
    """One `HygieneWarning` for a call whose tasks (`noun`s, by position; None: a
    `call`) changed process-wide state in their workers, naming the first."""
    (first, said), more = next(iter(notes.items())), len(notes) - 1
    where = noun if first is None else f"{noun} {first}"
    rest = f" ({more} more {noun}s did too: see Diagnostics.hygiene)" if more else ""
    warn_user(
        HygieneWarning(
            f"ashard: {where} changed its worker's process-wide state: {'; '.join(said)}{rest}"
        )
    )


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first real error in a task group's failure (the others are its echoes)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_error(exc)
        if not isinstance(exc, anyio.get_cancelled_exc_class()):
            return exc
    return group


def interrupt_in(group: BaseExceptionGroup) -> BaseException | None:
    """The KeyboardInterrupt (or SystemExit) a task group caught, if it did: the caller
    gets it as itself, as from any other call it was waiting on."""
    match, _ = group.split((KeyboardInterrupt, SystemExit))
    found: BaseException | None = match
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found


_SIGNAL_HINTS: dict[int, str] = {
    _signal.SIGKILL: "from outside",
    _signal.SIGSEGV: "a segmentation fault: a bug in C code, or a stack overflow",
    _signal.SIGBUS: "a bus error: bad memory access, often a truncated memory-mapped file",
    _signal.SIGABRT: "aborted: a failed assertion or fatal error in C code",
    _signal.SIGFPE: "a floating-point exception in C code",
    _signal.SIGILL: "an illegal instruction: a binary built for another CPU",
    _signal.SIGTERM: "terminated from outside",
}


def describe_exit(
    pid: int, exitcode: int | None, signum: int | None, memory_tight: bool = False
) -> str:
    """Words for how a worker ended, with the likely cause. The out-of-memory killer is
    named for a SIGKILL only when the worker's memory was near a limit."""
    if signum is not None:
        try:
            name = _signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        hint = _SIGNAL_HINTS.get(signum, "killed by a signal")
        if signum == _signal.SIGKILL and memory_tight:
            hint = "from outside, often the out-of-memory killer: its memory was near the limit"
        return f"worker {pid} was killed by {name} ({hint})"
    if exitcode is None:
        return f"worker {pid} stopped answering (its channel closed)"
    return (
        f"worker {pid} exited with code {exitcode} "
        "(os._exit in fn, or a fatal interpreter error; its stderr may say more)"
    )

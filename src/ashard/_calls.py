"""The one call layer: every `shard_map`, `shard_stream`, `shard_reduce` and `map`,
whoever makes it (`Pool`'s methods, `ashard.api`, `ashard.sync`, `Executor`), is built,
run and answered here.

A call goes through three steps, each one function here:

1. *build*: check every argument and make the call's `Job` (`shard_job`, `reduce_job`,
   `map_job`); nothing is started and nothing changes if this raises;
2. *run*: hand the job to the pool's backend (`ashard._backend`) with its outputs
   opened before and settled after (`running`, `run_job`); the default pool takes the
   size the call asked for only once the backend accepted the job (`Accepted`);
3. *answer*: shape what the job resolved into a `ShardResult`, a `ReduceResult`, a
   list, or a `ShardStream` that yields as shards finish.

`choose_pool` picks the pool a module-level call runs on.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
import anyio.abc

from ashard._backend import Accepted, Backend
from ashard._consumers import Reducer, StreamBuffer
from ashard._job import Job
from ashard._options import (
    CallOptions,
    MapOptions,
    ShardOptions,
    StreamOptions,
    check_borrow,
    check_concurrency_fn,
    check_fn,
    check_items,
    check_positive_int,
    check_shard_args,
    check_takes,
    check_workers,
)
from ashard._outcomes import warn_hygiene
from ashard._positions import ShardPositions
from ashard._serialize import pickle_payload
from ashard._sources import with_sources
from ashard._stream import ShardStream
from ashard._tracing import call_trace
from ashard.errors import ShardMapError
from ashard.results import ReduceResult, ShardResult
from ashard.shards import Shards

if TYPE_CHECKING:
    from ashard._places import Place
    from ashard.errors import ShardError
    from ashard.tables import ResultStore

__all__ = [
    "Runs",
    "choose_pool",
    "map_job",
    "map_result",
    "reduce_job",
    "reduce_result",
    "retry_job",
    "retry_result",
    "run_job",
    "shard_job",
    "shard_result",
    "stream",
]

DEFAULT_MAX_PENDING = 1024
"""Finished shards a stream holds for a slow consumer when `max_pending` is None."""


class Runs(Protocol):
    """What a call runs on: a `Pool` (only this of it)."""

    @property
    def workers(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    async def backend(self) -> Backend: ...


_P = TypeVar("_P", bound=Runs)


# -- build ------------------------------------------------------------------------------


def shard_job(
    shards: object,
    fn: object,
    borrow: object,
    out: object,
    options: Mapping[str, object],
    accepted: type,
    where: str,
    reducer: Any = None,
    earlier: ShardResult | None = None,
) -> tuple[Job, Shards]:
    """The job of a `shard_map`, `shard_stream` or `shard_reduce` call, every
    argument checked (nothing is made on disk yet); `earlier`: the result of the
    `shard_map` this call runs part of again (`retry_job`), whose outputs it writes to."""
    opts, checked_fn, layout, sequence, inputs, outputs = check_shard_args(
        shards, fn, borrow, out, options, accepted, where, again=earlier is not None
    )
    place = results_place(opts.results, opts.results_path) if earlier is None else None
    store = _made_store(opts.results, place) if earlier is None else earlier._store
    payload = pickle_payload(with_sources(checked_fn), "fn")
    buffer = None
    if accepted is StreamOptions:
        buffer = StreamBuffer(opts.ordered, opts.max_pending or DEFAULT_MAX_PENDING)
    job = Job.of_shards(payload, opts, layout, sequence, inputs, outputs, buffer, store, reducer)
    job.api = where
    if accepted is ShardOptions and reducer is None:
        job.given = _Given(checked_fn, shards, borrow, out, dict(options))
    return job, layout


@dataclass(frozen=True, slots=True, eq=False)
class _Given:
    """What a `shard_map` call was given, as given: `retry_failed` builds its job again
    from it (with the call's shards, borrow, out, seed and options)."""

    fn: Callable[..., Any]
    shards: object
    borrow: object
    out: object
    options: Mapping[str, object]


@dataclass(frozen=True, slots=True, eq=False)
class _Again:
    """What `retry_failed` needs of a finished `shard_map`: the pool it ran on, what it
    was given (None when every shard succeeded: nothing is held for nothing to rerun),
    which positions were resolved, and why each skipped shard was skipped."""

    pool: Runs
    given: _Given | None
    resolved: bytes
    skipped: Mapping[int, ShardError]


def results_place(results: str, path: object) -> Place | None:
    """Where a call's values go under ``results="table"`` / ``"disk"`` (None: a
    temporary directory, or nowhere under ``"memory"``): `path` resolved."""
    if results == "memory" or path is None:  # (a path with "memory": `check_shard_args`)
        return None
    from ashard._places import Place  # only a call that keeps its values

    return Place.resolve(path, None, "results_path")  # emptiness: when the call starts


def _made_store(results: str, place: Place | None) -> ResultStore | None:
    if results == "memory":
        return None
    from ashard.tables import ResultStore  # pyarrow: only a call that keeps its values

    return ResultStore(results, place)


def reduce_job(
    shards: object,
    fn: object,
    combine: object,
    init: object,
    ordered: object,
    borrow: object,
    out: object,
    options: Mapping[str, object],
) -> tuple[Job, Shards]:
    """The job of a `shard_reduce` call, every argument checked."""
    checked = check_fn(combine, "combine")
    if not isinstance(ordered, bool):
        raise TypeError(f"ordered must be True or False, got {type(ordered).__name__}")
    given = dict(options)
    limit = check_positive_int("max_pending", given.pop("max_pending", None), allow_none=True)
    reducer = Reducer(checked, init, ordered, limit or DEFAULT_MAX_PENDING)
    return shard_job(shards, fn, borrow, out, given, ShardOptions, "shard_reduce", reducer)


def map_job(fn: object, items: object, borrow: object, options: Mapping[str, object]) -> Job:
    """The job of a `map` call, every argument checked."""
    opts = CallOptions.build(options, MapOptions, "map")
    checked_fn = check_fn(fn)
    iterable = check_items(items)
    inputs, _ = check_borrow(borrow, None)
    check_takes(checked_fn, inputs, {}, "item")
    check_concurrency_fn(opts, checked_fn, "map")
    return Job.of_items(pickle_payload(with_sources(checked_fn), "fn"), opts, iterable, inputs)


# -- run --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(job: Job) -> AsyncIterator[None]:
    """Within: `job`'s outputs (table sinks, results store) are open. On leaving, what
    its workers left that no accepted shard owns is swept (shielded: a cancelled call
    still sweeps) and the job is closed."""
    job.trace = trace = call_trace(job.api, **_call_attributes(job))
    error: BaseException | None = None
    try:
        if not job.outputs:
            yield
            return
        await anyio.to_thread.run_sync(job.outputs.open)
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(job.outputs.close)
    except BaseException as exc:
        error = exc
        raise
    finally:
        job.close()
        if trace is not None:
            trace.close(error if error is not None else job.fatal, len(job.failures))
        if job.record.hygiene:
            warn_hygiene(job.record.hygiene, job.noun)


def _call_attributes(job: Job) -> dict[str, Any]:
    """The attributes of a call's span: how many positions (if known) and retries."""
    attributes: dict[str, Any] = {"ashard.max_retries": job.opts.max_retries}
    if job.total is not None:
        attributes[f"ashard.{job.noun}s"] = job.total
    return attributes


async def run_job(pool: Runs, job: Job, resize: int | None = None) -> None:
    """Run `job` on `pool`'s backend until it is over; raise what ended it. `resize`:
    the size the default pool takes once the job is accepted (`Accepted`). A list given
    as the input is copied first, before the pool may take time to start (`Job.prepare`)."""
    await job.prepare()
    backend = await pool.backend()
    async with running(job):
        await backend.run(job, task_status=Accepted(backend, resize))
    if job.fatal is not None:
        raise job.fatal
    await job.let_go()


# -- answer -----------------------------------------------------------------------------


async def shard_result(
    pool: Runs, job: Job, layout: Shards, resize: int | None = None
) -> ShardResult:
    """Run a `shard_map` job on `pool`: its `ShardResult` (raising under
    ``errors="raise"``)."""
    try:
        await run_job(pool, job, resize)
    except BaseException:
        await _drop_results(job)
        raise
    resolved = job.unfinished()
    complete = not job.failures and not job.skipped and resolved.find(0) == -1
    given = None if complete else job.given
    positions = job.positions
    if (
        given is not None
        and isinstance(positions, ShardPositions)
        and positions.sequence is not None
    ):
        given = replace(given, shards=positions.sequence)  # the list as the call copied it
    result = job.result(layout, _Again(pool, given, resolved, dict(job.skipped)))
    if job.opts.errors == "raise":
        result.raise_for_failures()
    return result


async def _drop_results(job: Job) -> None:
    """The call ended without a result (cancelled, or failed as a whole): nobody will
    read its temporary results directory, so it goes now rather than whenever a
    reference cycle holding the job is collected (a cancelled request's files would
    pile up in a web backend). A `retry_failed`'s directory is its first run's: kept."""
    store = job.outputs.store
    if store is not None and store.temporary and not job.outputs.again:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(store.close)


_FIXED = ("results", "results_path")
"""Options `retry_failed` cannot change: it writes where the call wrote."""


async def retry_result(
    result: object, fn: object, only: object, options: Mapping[str, object], pool: Runs | None
) -> ShardResult:
    """Run `retry_failed` (see `retry_job`) and merge: a `ShardResult` for the whole
    call (raising under ``errors="raise"``)."""
    made = retry_job(result, fn, only, options, pool)
    if isinstance(made, ShardResult):
        return made
    job, layout, target = made
    if target.closed:
        raise RuntimeError(
            "retry_failed: the pool this call ran on is closed; pass pool= (such as "
            "ashard.default_pool()) to run the failed shards on another"
        )
    return await shard_result(target, job, layout)


def retry_job(
    result: object, fn: object, only: object, options: Mapping[str, object], pool: Runs | None
) -> tuple[Job, Shards, Runs] | ShardResult:
    """The job of `retry_failed(result, fn, only=..., **options)`: the failed and skipped
    shards of `result` (those whose exception is of the types `only` names, if given)
    and any that never finished, on `pool` or the pool the call ran on. A result with
    nothing to run again comes back as a new `ShardResult` at once."""
    again = result._again if isinstance(result, ShardResult) else None
    if isinstance(result, ShardResult) and again is None:
        raise TypeError(
            "retry_failed: this ShardResult holds no call to run again (it was pickled, or "
            "made by hand); it takes the result of a shard_map as that call returned it"
        )
    if not isinstance(again, _Again):
        raise TypeError(
            "retry_failed takes the ShardResult of a shard_map call (or the .result of its "
            f"ShardMapError), got {type(result).__name__}"
        )
    assert isinstance(result, ShardResult)
    types = _check_only(only)
    for name in _FIXED:
        if name in options:
            raise ValueError(
                f"retry_failed writes where the call wrote: {name} cannot change (drop {name}=)"
            )
    failures = {f.shard_id: f for f in result.failures if f.shard_id is not None}
    todo = _todo(again, failures, types)
    if not todo or again.given is None:
        return ShardResult(
            list(result.results) if result._store is None else result.results,
            list(result.failures), result.shards, result.diagnostics, result.refs,
            result.skipped, result._store, again,
        )  # fmt: skip
    given = again.given
    merged = {**given.options, **options}
    job, layout = shard_job(
        given.shards, given.fn if fn is None else fn, given.borrow, given.out, merged,
        ShardOptions, "retry_failed", earlier=result,
    )  # fmt: skip
    earlier = result.refs if result._store is not None else result.results
    job.resume(todo, earlier, failures, again.skipped)
    return job, layout, again.pool if pool is None else pool


def _check_only(only: object) -> tuple[type[BaseException], ...] | None:
    if only is None:
        return None
    if isinstance(only, type) and issubclass(only, BaseException):
        return (only,)
    if (
        isinstance(only, tuple)
        and only
        and all(isinstance(t, type) and issubclass(t, BaseException) for t in only)
    ):
        return only
    raise TypeError(
        f"only must be an exception type or a tuple of them, got {type(only).__name__} {only!r}"
    )


def _todo(
    again: _Again,
    failures: Mapping[int, ShardError],
    types: tuple[type[BaseException], ...] | None,
) -> list[int]:
    """The positions to run again: failed and skipped ones (of `types`, if given, as the
    `ShardError` or as what `fn` raised), and any the call never finished."""

    def chosen(error: ShardError) -> bool:
        return types is None or isinstance(error, types) or isinstance(error.__cause__, types)

    todo = {pos for pos, err in failures.items() if chosen(err)}
    todo.update(pos for pos, err in again.skipped.items() if chosen(err))
    resolved = again.resolved
    pos = resolved.find(0)
    while pos != -1:
        todo.add(pos)
        pos = resolved.find(0, pos + 1)
    return sorted(todo)


async def reduce_result(pool: Runs, job: Job, resize: int | None = None) -> ReduceResult:
    """Run a `shard_reduce` job on `pool`: its `ReduceResult`."""
    await run_job(pool, job, resize)
    assert job.reducer is not None
    result = ReduceResult(
        job.reducer.value, job.failure_list(), job.diagnostics(), tuple(sorted(job.skipped))
    )
    if job.opts.errors == "raise":
        result.raise_for_failures()
    return result


async def map_result(pool: Runs, job: Job, resize: int | None = None) -> list[Any]:
    """Run a `map` job on `pool`: the values in order (a failed item's `ShardError` in
    its slot under ``errors="collect"``)."""
    await run_job(pool, job, resize)
    del job.results[job.next_pos :]  # slots made ahead for items never taken (it failed)
    if job.failures and job.opts.errors == "raise":
        result = job.result(Shards(job.next_pos, 1, "contiguous"))
        raise ShardMapError.of(result.failures, result, "item")
    values = job.results
    failures: Mapping[int, ShardError] = job.failures
    for pos, err in failures.items():
        values[pos] = err
    return values


def stream(pool: Runs, job: Job, layout: Shards, resize: int | None = None) -> ShardStream:
    """A `shard_stream` job on `pool`, run when the stream is entered: a failure before
    the backend accepted the job (bad input) is raised by ``async with``; one after it
    ends the job and reaches the consumer. A closed pool is refused now, not only when
    the stream is entered."""
    if pool.closed:
        raise RuntimeError("this ashard.Pool is closed")

    async def run(task_status: anyio.abc.TaskStatus[None]) -> None:
        await job.prepare()
        backend = await pool.backend()
        status = Accepted(backend, resize, task_status)
        try:
            async with running(job):
                await backend.run(job, task_status=status)
        except Exception as exc:
            if not status.done:
                raise
            job.abort(exc)
        finally:
            job.notify()

    return ShardStream(run, job, layout)


# -- choose -----------------------------------------------------------------------------


def choose_pool(
    pool: object, workers: object, default: Callable[[], _P], kind: type[_P], what: str
) -> tuple[_P, int | None]:
    """`pool` (a `kind`, or None for `default()`) and the size `workers` asks of the
    default pool; `what` names the pool type the caller takes (for its errors)."""
    size = check_workers("workers", workers, local=pool is None)
    if pool is not None:
        if not isinstance(pool, kind):
            raise TypeError(f"pool must be an {what} or None, got {type(pool).__name__}")
        if size is not None and size != pool.workers:
            raise ValueError(
                f"workers={size} sizes the default pool; pool= was given too (with "
                f"{pool.workers} workers): pass one of them"
            )
        return pool, None
    return default(), size

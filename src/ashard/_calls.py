"""The calls behind `Pool.shard_map`, `.shard_stream`, `.map` and `.call`: check the
arguments, turn them into a `Job`, run it on the pool's scheduler, shape the answer."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import anyio

from ashard._export import Exported, export
from ashard._job import Job, JobOptions, StreamBuffer
from ashard._options import (
    check_borrow,
    check_fn,
    check_items,
    check_stream,
    check_timeout,
    job_options,
    pickle_payload,
    resolve_shards,
)
from ashard._progress import Progress
from ashard._protocol import ITEMS, SHARDS, JobSpec
from ashard._scheduler import Scheduler
from ashard._stream import ShardStream
from ashard.errors import ShardError, ShardMapError
from ashard.results import ShardResult, _failure_message
from ashard.shards import Shards

DEFAULT_MAX_PENDING = 1024
"""Finished shards a stream holds for a slow consumer when `max_pending` is None."""


async def _export(inputs: dict[str, Any], outputs: dict[str, Any], cow: str) -> Exported | None:
    """Share or pickle borrow and out off the event loop; nothing leaks if cancelled."""
    if not inputs and not outputs:
        return None
    made: list[Exported] = []

    def run() -> Exported:
        made.append(export(inputs, outputs, cow))
        return made[-1]

    try:
        return await anyio.to_thread.run_sync(run)
    except BaseException:
        for exported in made:
            exported.close()
        raise


async def _shard_job(
    scheduler: Scheduler,
    shards: object,
    fn: object,
    borrow: object,
    out: object,
    options: dict[str, Any],
    stream: StreamBuffer | None = None,
) -> tuple[Job, Shards]:
    fn = check_fn(fn)
    opts = job_options(**options)
    layout, sequence = resolve_shards(shards)
    inputs, outputs = check_borrow(borrow, out)
    fn_payload = pickle_payload(fn, "fn")
    exported = await _export(inputs, outputs, opts.cow)
    spec = JobSpec(
        SHARDS,
        fn_payload,
        exported.kwargs if exported else None,
        opts.timeout,
        opts.seed,
        layout,
        list(sys.path),
    )
    progress = Progress(len(layout), "shards") if options["progress"] else None
    job = Job(
        key=next(scheduler.keys),
        spec=spec,
        opts=opts,
        layout=layout,
        sequence=sequence,
        items=None,
        total=len(layout),
        workers=scheduler.size,
        stream=stream,
        progress=progress,
    )
    job.exported = exported
    return job, layout


async def shard_map(
    scheduler: Scheduler,
    shards: object,
    fn: object,
    borrow: object,
    out: object,
    options: dict[str, Any],
) -> ShardResult:
    job, layout = await _shard_job(scheduler, shards, fn, borrow, out, options)
    await _run(scheduler, job)
    result = job.result(layout)
    if job.failures and job.opts.errors == "raise":
        raise ShardMapError(_failure_message(result.failures), result.failures, result)
    return result


async def _run(scheduler: Scheduler, job: Job) -> None:
    try:
        await scheduler.run(job)
    finally:
        scheduler.forget(job)
    if job.fatal is not None:
        raise job.fatal


async def shard_stream(
    scheduler: Scheduler,
    shards: object,
    fn: object,
    borrow: object,
    out: object,
    options: dict[str, Any],
    ordered: object,
    max_pending: object,
) -> ShardStream:
    ordered_, limit = check_stream(ordered, max_pending)
    buffer = StreamBuffer(ordered_, limit or DEFAULT_MAX_PENDING)
    job, layout = await _shard_job(scheduler, shards, fn, borrow, out, options, buffer)
    return ShardStream(scheduler, job, layout)


async def map_items(
    scheduler: Scheduler,
    fn: object,
    items: object,
    borrow: object,
    options: dict[str, Any],
) -> list[Any]:
    fn = check_fn(fn)
    opts: JobOptions = job_options(**options)
    iterable: Iterable[Any] = check_items(items)
    inputs, _ = check_borrow(borrow, None)
    total = len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
    fn_payload = pickle_payload(fn, "fn")
    exported = await _export(inputs, {}, opts.cow)
    spec = JobSpec(
        ITEMS,
        fn_payload,
        exported.kwargs if exported else None,
        opts.timeout,
        opts.seed,
        None,
        list(sys.path),
    )
    job = Job(
        key=next(scheduler.keys),
        spec=spec,
        opts=opts,
        layout=None,
        sequence=None,
        items=iter(iterable),
        total=total,
        workers=scheduler.size,
        progress=Progress(total, "items") if options["progress"] else None,
    )
    job.exported = exported
    await _run(scheduler, job)
    n = job.next_pos
    if job.failures and opts.errors == "raise":
        result = job.result(Shards(n, 1, "contiguous"))
        raise ShardMapError(_failure_message(result.failures), result.failures, result)
    values = job.results
    failures: Mapping[int, ShardError] = job.failures
    for pos, err in failures.items():
        values[pos] = err
    return values


async def call(
    scheduler: Scheduler,
    fn: object,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout: object,
) -> Any:
    fn_: Callable[..., Any] = check_fn(fn)
    return await scheduler.call(fn_, args, kwargs, check_timeout(timeout))

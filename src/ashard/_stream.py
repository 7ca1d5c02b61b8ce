"""`shard_stream`: results as they complete, through an async context manager.

The stream owns a task group that runs the job; iterating takes finished shards from
the job's `StreamBuffer`. The buffer is bounded (`max_pending`): the job dispatches
only while finished-but-unconsumed plus in-flight shards stay under it, so a slow
consumer slows the workers instead of growing memory. Leaving the block early
cancels whatever is still running.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from ashard.errors import ShardMapError
from ashard.results import ShardDone, _failure_message
from ashard.shards import Shard

if TYPE_CHECKING:
    from ashard._job import Job
    from ashard._scheduler import Scheduler

__all__ = ["ShardStream"]


class ShardStream:
    """Iterate with ``async for done in stream``; made by `ashard.shard_stream`."""

    def __init__(self, scheduler: Scheduler, job: Job, shards: Sequence[Shard]) -> None:
        self._scheduler = scheduler
        self._job = job
        self._shards = shards
        self._tg: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> ShardStream:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        if not self._job.over:
            self._job.abort()
            self._tg.cancel_scope.cancel()
        # The consumer's own exception (ShardMapError, a break, cancellation) goes on
        # unwrapped: the task group is closed as if the body had ended normally.
        await self._tg.__aexit__(None, None, None)
        return None

    async def _run(self) -> None:
        try:
            await self._scheduler.run(self._job)
        except Exception as exc:  # surfaced to the consumer by __anext__
            self._job.abort(exc)
        finally:
            self._scheduler.forget(self._job)
            self._job.notify()

    def __aiter__(self) -> ShardStream:
        return self

    async def __anext__(self) -> ShardDone:
        job = self._job
        buf = job.stream
        assert buf is not None
        while True:
            if buf.ready:
                done = buf.ready.popleft()
                job.notify()  # room in the buffer: dispatch may resume
                if done.error is not None and job.opts.errors == "raise":
                    raise self._failure_error()
                return done
            if job.fatal is not None:
                raise job.fatal
            if job.failures and job.opts.errors == "raise":
                raise self._failure_error()
            if job.over:
                raise StopAsyncIteration
            await job.wait_change()

    def _failure_error(self) -> ShardMapError:
        failures = self._job.failure_list()
        result = self._job.result(self._shards)
        return ShardMapError(_failure_message(failures), failures, result)

    @property
    def pending(self) -> int:
        """Finished shards waiting to be consumed."""
        assert self._job.stream is not None
        return self._job.stream.pending

"""`ShardStream`: results as they complete, through an async context manager.

`shard_stream(...)` checks its arguments at once and returns the stream (`later`);
entering it builds the job (what the call needs loaded in a thread, the function
pickled) and runs it (`ashard._calls.stream`: outputs opened, shared inputs prepared)
in a task group the stream owns; iterating takes finished shards from the job's
`StreamBuffer`. The buffer is bounded
(`max_pending`): the job dispatches only while finished-but-unconsumed plus in-flight
shards stay under it, so a slow consumer slows the workers instead of growing memory.
Leaving the block early cancels whatever is still running.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import anyio
import anyio.abc

if TYPE_CHECKING:
    from ashard._job import Job
    from ashard.errors import ShardMapError
    from ashard.results import ShardDone
    from ashard.shards import Shard

__all__ = ["ShardStream"]


class ShardStream:
    """Finished shards, as they complete (or in shard order with ``ordered=True``)::

        async with ashard.shard_stream(100, fn) as stream:
            async for done in stream:  # ashard.ShardDone
                ...

    Made by `ashard.shard_stream` / `Pool.shard_stream`; use it only inside its
    ``async with``."""

    __module__ = "ashard"

    def __init__(
        self,
        run: Callable[[anyio.abc.TaskStatus[None]], Awaitable[None]],
        job: Job,
        shards: Sequence[Shard],
    ) -> None:
        self._run = run
        self._job = job
        self._shards = shards
        self._tg: anyio.abc.TaskGroup | None = None
        self._build: Callable[[], Awaitable[ShardStream]] | None = None

    @classmethod
    def later(cls, build: Callable[[], Awaitable[ShardStream]]) -> ShardStream:
        """A stream whose arguments were checked, built by `build` once entered:
        `shard_stream(...)` is sync, called on the caller's loop, and building imports
        the call layer on a process's first call, cloudpickle for a function from
        `__main__` and pyarrow for a results store (`build` loads them in a thread
        first). This module imports nothing more until then."""
        stream = cls.__new__(cls)
        stream._tg = None
        stream._build = build
        return stream

    async def __aenter__(self) -> ShardStream:
        if self._tg is not None:
            raise RuntimeError("a ShardStream can be entered only once")
        if self._build is not None:  # (a build that fails leaves it to build again)
            built = await self._build()
            self._run, self._job, self._shards = built._run, built._job, built._shards
            self._build = None
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            await self._tg.start(self._serve)
        except BaseException:
            await self._tg.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._tg is not None
        if not self._job.over:
            self._job.abort()
            self._tg.cancel_scope.cancel()
        # The consumer's own exception (ShardMapError, a break, cancellation) goes on
        # unwrapped: the task group is closed as if the body had ended normally.
        try:
            await self._tg.__aexit__(None, None, None)
        except BaseExceptionGroup as group:
            from ashard._outcomes import interrupt_in  # loaded with the call layer

            interrupt = interrupt_in(group)
            if interrupt is not None:
                raise interrupt from None
            raise
        finally:
            store = self._job.outputs.store
            if store is not None and store.temporary:  # the refs it yielded end here
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(store.close)

    async def _serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        await self._run(task_status)

    def __aiter__(self) -> ShardStream:
        if self._tg is None:
            raise TypeError(
                "iterate a ShardStream inside its async with: "
                "async with ashard.shard_stream(...) as stream: async for done in stream: ..."
            )
        return self

    async def __anext__(self) -> ShardDone:
        job = self._job
        buf = job.stream
        assert buf is not None
        while True:
            if buf.ready:
                done = buf.take()
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
        from ashard.errors import ShardMapError  # loaded with the call layer

        return ShardMapError.of(self._job.failure_list(), self._job.result(self._shards))

    @property
    def pending(self) -> int:
        """Finished shards waiting to be consumed."""
        if self._build is not None:  # not built yet
            return 0
        assert self._job.stream is not None
        return self._job.stream.pending

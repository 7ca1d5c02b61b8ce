"""An asyncio event loop running forever in a daemon thread of ashard's own.

`SHARED` is the one `ashard.sync` runs every blocking call on (in a copy of the
calling thread's context) and `Executor` runs its tasks on; a cluster node runs its
ashard supervisor on one of its own (`ashard._dask.node`), so that the Dask worker's
own loop never waits on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import weakref
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["CANCEL_WAIT_SECONDS", "SHARED", "LoopThread"]

_T = TypeVar("_T")

CANCEL_WAIT_SECONDS = 10.0
"""After Ctrl-C, how long a call may take to stop its shards before the interrupt is
raised anyway (a second Ctrl-C raises at once)."""


class LoopThread:
    """An event loop running forever in a daemon thread named `name`, started on
    first use (and again if its thread died)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._forget()
        _all.add(self)

    def _forget(self) -> None:
        """No loop yet (also in a forked child: the parent's thread is not there)."""
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._thread is None or not self._thread.is_alive():
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def serve() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=serve, name=self._name, daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Start `coro` on the loop, in a copy of the calling thread's context."""
        self.check_thread(coro)
        return asyncio.run_coroutine_threadsafe(coro, self.loop())

    def start(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` on the loop, not waiting for it: from any thread, the loop's own
        included (cheaper than `submit`: no future to chain)."""
        self.loop().call_soon_threadsafe(self._begin, coro)

    def _begin(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self._tasks.discard)

    def check_thread(self, coro: Coroutine[Any, Any, Any]) -> None:
        if threading.current_thread() is self._thread:  # it would wait for itself forever
            coro.close()
            raise RuntimeError(
                "ashard.sync was called from ashard's own event loop thread (from a combine "
                "callback?): use the async API there"
            )

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """`coro`'s result, blocking; Ctrl-C cancels it and raises KeyboardInterrupt."""
        self.check_thread(coro)
        finished = threading.Event()
        future = self.submit(_signalling(coro, finished))
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()  # cancels the task on the loop: its shards are interrupted
            finished.wait(CANCEL_WAIT_SECONDS)  # a second Ctrl-C leaves at once
            raise


_all: weakref.WeakSet[LoopThread] = weakref.WeakSet()

SHARED = LoopThread("ashard-sync")
"""The loop of `ashard.sync` and `Executor`: one thread for every sync caller."""


def _after_fork_in_child() -> None:
    for runner in list(_all):
        runner._forget()


os.register_at_fork(after_in_child=_after_fork_in_child)


async def _signalling(coro: Coroutine[Any, Any, _T], finished: threading.Event) -> _T:
    try:
        return await coro
    finally:
        finished.set()

"""The adapter interface every peer implements.

A method is either a plain function (a synchronous library, called as it would be
in a script) or a coroutine function (an async library); the workloads await
whichever they get. A method a library has no counterpart for raises
`NotSupported` with the reason, which the report shows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def auto_chunksize(items: Sequence[Any], workers: int) -> int:
    """multiprocessing.Pool's automatic chunksize, lent to executors that have none."""
    chunks, extra = divmod(len(items), workers * 4)
    return max(1, chunks + bool(extra))


class NotSupported(Exception):
    """This library has no way to do what the workload asks (the message says why)."""


class Peer:
    label = "?"
    fresh = True
    """Workers are fresh interpreters (not forks of the caller holding its data)."""
    auto_chunks = False
    """`map(..., chunksize=None)` batches tasks on its own."""

    def start(self, workers: int) -> Any:
        raise NotImplementedError

    def map(self, fn: Callable[..., Any], items: Sequence[Any], chunksize: int | None) -> Any:
        """``[fn(x) for x in items]`` on the workers; None: the library's own chunking."""
        raise NotImplementedError

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One task, its result awaited."""
        raise NotImplementedError

    def starmap(self, fn: Callable[..., Any], argtuples: Sequence[tuple[Any, ...]]) -> Any:
        """``[fn(*a) for a in argtuples]``, one task each; failures raise."""
        raise NotImplementedError

    def broadcast(self, X: Any, tasks: int) -> Any:
        """``[stride_sum(X, k, tasks) for k in range(tasks)]`` with X shared the
        library's own way; timed from handing X over (pool start included where the
        library can only take data at start)."""
        raise NotSupported("no way to share data with workers short of pickling it per task")

    def close(self) -> Any:
        raise NotImplementedError

"""Where a call's values go when the caller does not keep them all: the buffer a
`shard_stream` consumer takes finished shards from, and `shard_reduce`'s accumulator.

Both may hold values the caller has not consumed yet (a slow consumer, or values that
wait for their turn in shard order), so both bound what they hold: at most
`max_pending` values and about `max_held_bytes` of them. The job asks its consumer how
many more positions it may have in flight (`room`) before it takes a chunk: what waits
plus what is coming stays within both bounds.
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Any

from ashard.results import ShardDone

__all__ = ["UNBOUNDED", "Reducer", "StreamBuffer", "approx_bytes"]

UNBOUNDED = 1 << 62
"""Room of a consumer that holds nothing back (an unordered reduce)."""


def approx_bytes(value: Any) -> int:
    """About the memory `value` holds: its `nbytes` (arrays, Arrow tables, memoryviews),
    its length (bytes, str), else its own size (shallow: a container's items are not
    counted)."""
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(value, bytes | bytearray | str):
        return len(value)
    return sys.getsizeof(value, 64)


class _Waiting:
    """Values that wait for their consumer: at most `limit` of them; `bytes` is about
    what they weigh (`approx_bytes`), `mean` a moving average of one value's weight
    (what the values still coming will weigh)."""

    __slots__ = ("bytes", "limit", "mean")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0
        self.mean = 0.0

    def add(self, value: Any) -> None:
        size = approx_bytes(value)
        self.bytes += size
        self.mean = size if not self.mean else 0.8 * self.mean + 0.2 * size

    def remove(self, value: Any) -> None:
        self.bytes -= approx_bytes(value)

    def room(self, count: int, inflight: int, max_held: int) -> int:
        """How many more positions may be in flight while `count` values wait and
        `inflight` are coming: at least one when none waits or comes (a value larger
        than `max_held` comes alone, never a deadlock)."""
        room = self.limit - count - inflight
        if self.mean:
            room = min(room, int((max_held - self.bytes) / self.mean) - inflight)
        if room <= 0 and not count and not inflight:
            return 1
        return room


class StreamBuffer:
    """Finished shards waiting for a `shard_stream` consumer, in completion or shard order."""

    def __init__(self, ordered: bool, max_pending: int) -> None:
        self.ordered = ordered
        self.ready: deque[ShardDone] = deque()
        self._held: dict[int, ShardDone] = {}  # shard order: early ones wait their turn
        self._next = 0
        self._waiting = _Waiting(max_pending)

    @property
    def pending(self) -> int:
        return len(self.ready) + len(self._held)

    @property
    def pending_bytes(self) -> int:
        """About what the shards waiting for the consumer weigh."""
        return self._waiting.bytes

    def room(self, inflight: int, max_held: int) -> int:
        """How many more positions may run while `inflight` do (`_Waiting.room`)."""
        return self._waiting.room(self.pending, inflight, max_held)

    def push(self, done: ShardDone) -> None:
        self._waiting.add(done.value)
        if not self.ordered:
            self.ready.append(done)
            return
        self._held[done.shard.id] = done
        while self._next in self._held:
            self.ready.append(self._held.pop(self._next))
            self._next += 1

    def take(self) -> ShardDone:
        """The next finished shard for the consumer (there must be one ready)."""
        done = self.ready.popleft()
        self._waiting.remove(done.value)
        return done


_SKIP = object()
"""Stands for a failed shard in an ordered reduce's queue: its turn passes."""


class Reducer:
    """`shard_reduce`'s accumulator: ``acc = combine(acc, value)`` as values arrive, or
    in shard order (`ordered`: values that arrive early wait, at most `max_pending`,
    and failed shards are skipped in their turn). A combined value is not kept."""

    def __init__(self, combine: Any, init: Any, ordered: bool, max_pending: int) -> None:
        self.combine = combine
        self.value = init
        self._started = init is not None
        self.ordered = ordered
        self._held: dict[int, Any] = {}  # values waiting for their turn
        self._next = 0
        self._waiting = _Waiting(max_pending)

    @property
    def pending(self) -> int:
        return len(self._held)

    @property
    def pending_bytes(self) -> int:
        """About what the values waiting for their turn weigh."""
        return self._waiting.bytes

    def room(self, inflight: int, max_held: int) -> int:
        """How many more positions may run while `inflight` do: unbounded unless values
        wait for their turn (`ordered`)."""
        if not self.ordered:
            return UNBOUNDED
        return self._waiting.room(self.pending, inflight, max_held)

    def push(self, pos: int, values: list[Any]) -> None:
        if not self.ordered:
            for value in values:
                self._combine(value)
            return
        for k, value in enumerate(values):
            self._held[pos + k] = value
            self._waiting.add(value)
        self._drain()

    def skip(self, pos: int) -> None:
        if self.ordered:
            self._held[pos] = _SKIP
            self._drain()

    def _drain(self) -> None:
        held = self._held
        while self._next in held:
            value = held.pop(self._next)
            self._next += 1
            if value is not _SKIP:
                self._waiting.remove(value)
                self._combine(value)

    def _combine(self, value: Any) -> None:
        if self._started:
            self.value = self.combine(self.value, value)
        else:
            self.value, self._started = value, True

"""How large a call's chunks are and how many a worker holds at once.

`chunk_size="auto"` learns from what comes back: a shard's run time (each report) and
an item's pickled size (each chunk sent). A chunk carries about `TARGET_CHUNK_SECONDS`
of work (scaled by the call's profile), so tiny shards cost microseconds each, not a
round trip; it grows at most `MAX_GROWTH` times at a step, leaves work for every worker
near the end, and keeps each worker's window of chunks within the bytes the caller may
hold. Each of those bounds is one method (`_by_time`, `_by_share`, `_by_bytes`), and the
size is the smallest, and never over `MAX_POSITIONS` (the caller's step). The workers'
memory is one more bound (`_by_memory`): once a worker reports memory near `mem_cap`,
chunks halve, so that memory is checked between fewer shards before the hard limit
would stop the worker. A shard's time is smoothed (`SMOOTHING`), weighed by positions:
one slow chunk does not swing the size, and the first chunks of one position (their
time mostly a chunk's fixed cost) do not hold it down. Each change of an automatic size
is a row of `autotune`: (seconds into the call, size, reason).

The window hides the trip to a worker: short chunks go several at a time, long ones one
at a time (balance over latency), except that a worker running `async def` shards
several at once holds enough chunks to run that many, and one more, which joins the
others as their shards end. A backend far from its workers (Dask) says how long
a trip takes (`served_by`): chunks then grow to carry several trips of work each.

A `ChunkSizer` changes only through its own methods (`served_by`, `learn`,
`learn_item_bytes`, `pressed`) and knows nothing of the job: it is told numbers, and
answers them.
"""

from __future__ import annotations

import math

__all__ = ["TRIPS_PER_CHUNK", "ChunkSizer", "joining_window"]

TARGET_CHUNK_SECONDS = 0.01
"""`chunk_size="auto"` aims for chunks of about this much work."""
LONG_CHUNK_SECONDS = 0.005
"""Chunks at least this long go one at a time per worker (balance over latency)."""
HIDE_LATENCY_SECONDS = 0.001
"""A trip to a worker on this machine; a backend's longer trip makes its workers far."""
TRIPS_PER_CHUNK = 5
"""A chunk carries at least this many times its trip to a far worker in work."""
FAR_LONG_TRIPS = 50
"""Far workers hold one chunk at a time only when it is this many trips long."""
MAX_WINDOW = 32
"""The most chunks a worker holds at once."""
MAX_GROWTH = 8
"""An automatic chunk is at most this many times the size of the one before."""
SMOOTHING = 0.25
"""How fast a shard's learned time forgets: each chunk's sample weighs by its positions,
and what was learned before it by ``1 - SMOOTHING`` of its own (a chunk of one position
says little next to one of thousands, whose fixed costs are shared)."""
MEMORY_SHRINK_AT = 0.7
"""Chunks halve while a worker reports this share of `mem_cap` or more."""
MAX_AUTOTUNE_ROWS = 1000
"""`autotune` keeps at most this many rows (the first ones)."""
MAX_POSITIONS = 32768
"""An automatic chunk holds at most this many positions: the caller's own work for a
chunk (listing its items, keeping a place for each result) is done in one step of its
event loop, and stays well under a millisecond however cheap the work is."""
_NO_BOUND = 1 << 62


def joining_window(together: int, size: int) -> int:
    """Chunks of `size` positions a worker running `together` async shards at once
    holds: enough to run that many, and one more to join them as they end."""
    return max(2, math.ceil(together / max(1, size)) + 1)


class ChunkSizer:
    """One call's chunk sizes and windows. `chunk_size`: a fixed size, or "auto";
    `work_factor`: the profile's factor on the work per chunk."""

    def __init__(self, chunk_size: int | str, work_factor: float = 1.0, together: int = 1) -> None:
        self.fixed = chunk_size if isinstance(chunk_size, int) else None
        self._together = max(1, together)  # positions a worker runs at once (async shards)
        self._per_shard: float | None = None  # seconds a position runs, as learned
        self._spent = 0.0  # seconds of the positions run, older chunks weighing less
        self._ran = 0.0  # those positions, weighed alike
        self._item_bytes: float | None = None  # a position's items, pickled, as learned
        self._last_size = self._together  # the size of the chunk taken last
        self._target = TARGET_CHUNK_SECONDS * work_factor  # seconds of work per chunk
        self._latency = HIDE_LATENCY_SECONDS  # of a trip to a worker
        self._workers = 1
        self._pressure = 0.0  # the last share of mem_cap a worker reported
        self.autotune: list[tuple[float, int, str]] = []  # (seconds, size, reason)

    # -- what it is told ----------------------------------------------------------------

    def served_by(self, workers: int, latency: float | None = None) -> None:
        """`workers` will run the chunks (automatic chunks leave work for each), each
        chunk reaching its worker `latency` seconds after it is taken (a backend far
        from its workers says so: chunks then grow to carry more work each, and a
        worker holds enough of them to hide the trip)."""
        self._workers = max(1, workers)
        if latency is not None and latency > self._latency:
            self._latency = latency
            self._target = max(self._target, TRIPS_PER_CHUNK * latency)

    def learn(self, n: int, seconds: float) -> None:
        """`n` positions ran in `seconds` in all (each its own wall time: with several
        at once, a position holds its worker for that share of it)."""
        if not n:
            return
        keep = 1.0 - SMOOTHING
        self._spent = keep * self._spent + seconds
        self._ran = keep * self._ran + n * self._together
        self._per_shard = self._spent / self._ran

    def learn_item_bytes(self, n: int, nbytes: int) -> None:
        """The items of `n` positions are `nbytes` long, pickled."""
        if not n or not nbytes:
            return
        sample = nbytes / n
        seen = self._item_bytes
        self._item_bytes = sample if seen is None else 0.5 * (seen + sample)

    def pressed(self, share: float) -> None:
        """A worker reported memory at `share` of `mem_cap` after a chunk."""
        self._pressure = share

    # -- what it answers ----------------------------------------------------------------

    def bytes_of(self, n: int) -> int:
        """About what the items of `n` positions weigh, pickled (0 until one chunk is sent)."""
        return int(n * self._item_bytes) if self._item_bytes else 0

    def next_size(self, remaining: int | None, max_held: int, now: float = 0.0) -> int:
        """The size of the next chunk of new positions, `remaining` of them left (None:
        unknown) and the caller holding at most `max_held` bytes of items; `now`,
        seconds into the call, stamps a change in `autotune`."""
        if self.fixed is not None:
            return self.fixed
        bounds = (
            (self._by_time(), "shrink_time"), (self._by_share(remaining), "tail"),
            (self._by_bytes(max_held), "shrink_mem"), (self._by_memory(), "shrink_mem"),
            (MAX_POSITIONS, "shrink_time"),
        )  # fmt: skip
        size, why = min(bounds, key=lambda bound: bound[0])
        self._note(now, size, why)
        self._last_size = size
        return size

    def window(self) -> int:
        """How many chunks a worker should hold at once."""
        far = self._latency > HIDE_LATENCY_SECONDS
        least = 2 if far else 1
        if self._together > 1:
            least = joining_window(self._together, self.fixed or self._last_size)
        if self._per_shard is None:
            return least  # until a first result says how long shards take
        chunk_time = self._per_shard * self._last_size
        if chunk_time >= (FAR_LONG_TRIPS * self._latency if far else LONG_CHUNK_SECONDS):
            return least
        hide = min(MAX_WINDOW, max(2, 1 + math.ceil(self._latency / max(chunk_time, 1e-6))))
        return max(least, hide)

    # -- the bounds on an automatic size (each at least 1) -------------------------------

    def _by_time(self) -> int:
        """About `_target` seconds of work, growing at most `MAX_GROWTH` times a step."""
        if self._per_shard is None:  # until a first result says how long shards take:
            return self._together  # one, or as many as run at once
        want = self._target / max(self._per_shard, 1e-9)
        return max(1, min(int(want), self._last_size * MAX_GROWTH))

    def _by_share(self, remaining: int | None) -> int:
        """Leave work for every worker: half a share each of what remains, but never
        less than a quarter of a trip to a worker's worth of work (chunks shorter than
        that balance little and each costs a trip of its own)."""
        if remaining is None:
            return _NO_BOUND
        share = math.ceil(remaining / (2 * self._workers))
        if self._per_shard is not None:
            least = int(self._latency / (4 * max(self._per_shard, 1e-9)))
            share = max(share, min(least, remaining))
        return max(1, share)

    def _note(self, now: float, size: int, why: str) -> None:
        """A row of `autotune` when the size moved by a quarter or more since the last
        row (the smoothed estimate wobbles by a position or two from chunk to chunk: a
        row each would grow with the call), at most `MAX_AUTOTUNE_ROWS`."""
        rows = self.autotune
        if not rows:
            rows.append((now, size, "start"))
            return
        last = rows[-1][1]
        if len(rows) < MAX_AUTOTUNE_ROWS and abs(size - last) * 4 >= last:
            rows.append((now, size, "grow" if size > last else why))

    def _by_memory(self) -> int:
        """Half the last size while a worker's memory is near `mem_cap`."""
        if self._pressure < MEMORY_SHRINK_AT:
            return _NO_BOUND
        return max(1, self._last_size // 2)

    def _by_bytes(self, max_held: int) -> int:
        """Each worker's window of chunks within the bytes the caller holds."""
        if not self._item_bytes:
            return _NO_BOUND
        return max(1, int(max_held / (4 * self._workers * self._item_bytes)))

"""Arrays borrowed by a pool's calls: shared once, and shared again only when they changed.

A plain ndarray in ``borrow=`` is copied into a segment on its first call. A pool keeps
the segment while the array lives and the pool is open (its `BorrowCache`, closed with
it; the default pool keeps none), so a later call borrowing the array unchanged maps the
same memory, which its workers already hold: no copy, no new segment. Before reusing it, a
call compares the array with its copy, byte for byte (a read of both, by several
threads): an array changed in place, or other data at the same address, gets a fresh
segment. Where the array is (its owner, address, dtype, shape, strides) only says which
copy to compare with; it never vouches for the contents. A cache that trusted identity
would hand back stale data: joblib's memmapping does, inside one ``Parallel``.

A copy is never written once shared: a call still running on the old copy keeps it, and
it is let go when that call ends. Copies no call is using are bounded by
`IDLE_FRACTION` of the memory this process may use (the least recently used go first),
and go when their array is garbage collected.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ashard._memory import limit_bytes
from ashard._serialize import SHARED_ARRAY_BYTES
from ashard._shm import same_bytes
from ashard.shared import SharedArray

__all__ = ["BorrowCache", "Lease"]

MIN_BYTES = SHARED_ARRAY_BYTES
"""Smaller arrays are copied for every call: copying them costs less than keeping them."""

IDLE_FRACTION = 0.25
"""Copies that no running call uses may hold this share of the memory this process may
use at most (the machine's, or its cgroup's limit: `ashard._memory`)."""

Key = tuple[int, int, str, tuple[int, ...], tuple[int, ...]]


@dataclass(eq=False)
class _Entry:
    key: Key
    shared: SharedArray
    owner: weakref.ref[np.ndarray[Any, Any]]
    users: int = 0
    cached: bool = True  # False once replaced or evicted: closed when its last user leaves
    last_used: float = field(default_factory=time.monotonic)


class Lease:
    """A call's use of a cached copy; `close()` when the call is over."""

    def __init__(self, cache: BorrowCache, entry: _Entry) -> None:
        self._cache = cache
        self._entry: _Entry | None = entry
        self.shared = entry.shared

    def close(self) -> None:
        entry, self._entry = self._entry, None
        if entry is not None:
            self._cache.release(entry)


class BorrowCache:
    """One pool's copies of the arrays its calls borrowed; `close()` with the pool."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # a collected owner's callback may come mid-call
        self._entries: dict[Key, _Entry] = {}
        self._idle_limit: int | None = None  # read on first use, off the event loop

    def lease(self, array: np.ndarray[Any, Any]) -> Lease | None:
        """A copy of `array` in shared memory for one call: the cached one if its bytes
        are `array`'s, else a new one (cached in its place). None for an array not worth
        caching (small, or not C-contiguous): the caller copies it for this call alone."""
        owner = _owner(array)
        if array.nbytes < MIN_BYTES or not array.flags.c_contiguous or owner is None:
            return None
        key: Key = (
            id(owner),
            array.__array_interface__["data"][0],
            array.dtype.str,
            array.shape,
            array.strides,
        )
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.owner() is owner:
                entry.users += 1
            else:
                entry = None
        if entry is not None:
            try:
                unchanged = same_bytes(array, entry.shared.array)
            except BaseException:
                self.release(entry)
                raise
            if unchanged:
                return Lease(self, entry)
            self.release(entry, stale=True)
        fresh = _Entry(key, SharedArray.copy_of(array), weakref.ref(owner, self._owner_gone(key)))
        fresh.users = 1
        with self._lock:
            old = self._entries.get(key)
            if old is not None:
                self._uncache(old)
            self._entries[key] = fresh
            self._evict_idle()
        return Lease(self, fresh)

    def release(self, entry: _Entry, *, stale: bool = False) -> None:
        with self._lock:
            entry.users -= 1
            entry.last_used = time.monotonic()
            if stale:
                self._uncache(entry)
            elif not entry.cached and entry.users == 0:
                entry.shared.close()
            self._evict_idle()

    def close(self) -> None:
        """Let every copy go: now if no call uses it, else when its last call ends."""
        with self._lock:
            for entry in list(self._entries.values()):
                self._uncache(entry)

    def _owner_gone(self, key: Key) -> Any:
        def gone(_: object) -> None:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._uncache(entry)

        return gone

    def _uncache(self, entry: _Entry) -> None:
        """Forget `entry` (under the lock); close its copy once no call uses it."""
        if entry.cached:
            entry.cached = False
            if self._entries.get(entry.key) is entry:
                del self._entries[entry.key]
        if entry.users == 0:
            entry.shared.close()

    def _evict_idle(self) -> None:
        if self._idle_limit is None:
            self._idle_limit = int(IDLE_FRACTION * limit_bytes())
        idle = sorted(
            (e for e in self._entries.values() if e.users == 0), key=lambda e: e.last_used
        )
        held = sum(e.shared.nbytes for e in idle)
        for entry in idle:
            if held <= self._idle_limit:
                break
            held -= entry.shared.nbytes
            self._uncache(entry)


def _owner(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any] | None:
    """The ndarray that owns `array`'s memory (the last ndarray of its ``base`` chain):
    it lives at least as long as any view of it."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    try:
        weakref.ref(array)
    except TypeError:
        return None
    return array

"""Anonymous shared-memory segments: a Linux memfd, mapped in the parent, handed to
workers as a file descriptor over their socketpair (SCM_RIGHTS).

A memfd has no name in /dev/shm: the kernel frees it when the last descriptor and
mapping are gone, so nothing outlives the parent and its workers, even after SIGKILL.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import sys
import weakref
from typing import Any

__all__ = ["Segment", "available"]

_ids = itertools.count(1)


def available() -> bool:
    """True where anonymous memfd segments can be made (Linux)."""
    return hasattr(os, "memfd_create") and sys.platform.startswith("linux")


class Segment:
    """A memfd of `size` bytes and the parent's shared, writable mapping of it.

    `close()` drops ashard's hold: the descriptor is closed and workers are told to let
    go; the memory itself lives until the last mapping (including numpy views the
    caller still holds) is gone.
    """

    def __init__(self, size: int, *, populate: bool = True) -> None:
        if not available():
            raise NotImplementedError(
                "ashard shared memory needs Linux memfd segments (os.memfd_create)"
            )
        self.id = next(_ids)
        self.size = size
        self.fd = os.memfd_create(f"ashard-{os.getpid()}-{self.id}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            flags = mmap.MAP_SHARED
            if populate and hasattr(mmap, "MAP_POPULATE"):
                flags |= mmap.MAP_POPULATE  # fault every page in now, in one go
            self.mmap: mmap.mmap | None = mmap.mmap(self.fd, size, flags=flags) if size else None
        except BaseException:
            os.close(self.fd)
            raise
        self.holders: weakref.WeakSet[Any] = weakref.WeakSet()  # WorkerHandles with our fd
        self._finalizer = weakref.finalize(self, _close_fd, self.fd)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Close the descriptor and tell every worker holding it to drop it."""
        if self._finalizer.alive:
            self._finalizer()
            for holder in list(self.holders):
                holder.drop_segment(self.id)
            self.holders.clear()
        self.mmap = None  # numpy views keep the mapping alive; nothing else does


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)

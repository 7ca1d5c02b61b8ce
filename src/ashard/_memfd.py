"""Anonymous shared-memory segments: a Linux memfd, mapped in the parent, handed to
workers as a file descriptor over their socketpair (SCM_RIGHTS).

A memfd has no name in /dev/shm: the kernel frees it when the last descriptor and
mapping are gone, so nothing outlives the parent and its workers, even after SIGKILL.

Elsewhere (or with ``ASHARD_SHM=named``) a segment is a POSIX named segment that is
unlinked the moment it is opened: only its descriptor travels, so it is as
leak-proof as a memfd except for the instant between ``shm_open`` and ``shm_unlink``.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import secrets
import sys
import time
import weakref
from typing import Any

__all__ = ["Segment", "available", "backend", "release_later"]

RELEASE_IN_THREAD_BYTES = 32 << 20
"""Mappings at least this large are unmapped on a helper thread: freeing a GiB of
pages takes ~150 ms, too long for the caller's event loop."""
_releaser: Any = None

_ids = itertools.count(1)


def available() -> bool:
    """True where anonymous memfd segments can be made (Linux)."""
    return hasattr(os, "memfd_create") and sys.platform.startswith("linux")


def backend() -> str:
    """ "memfd" where available, else "named"; ``ASHARD_SHM=named`` forces the fallback."""
    choice = os.environ.get("ASHARD_SHM", "").strip().lower()
    if choice not in ("", "memfd", "named"):
        raise ValueError(f"ASHARD_SHM must be 'memfd' or 'named', got {choice!r}")
    if choice == "named" or not available():
        return "named"
    return "memfd"


def _open_fd(name: str) -> int:
    if backend() == "memfd":
        return os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        import _posixshmem
    except ImportError:
        raise NotImplementedError(
            "ashard shared memory needs Linux memfd or POSIX shared memory (shm_open)"
        ) from None
    path = f"/{name}-{secrets.token_hex(4)}"
    fd: int = _posixshmem.shm_open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    _posixshmem.shm_unlink(path)  # from now on only descriptors keep it alive
    return fd


class Segment:
    """A memfd (or unlinked named segment) of `size` bytes and the parent's shared,
    writable mapping of it.

    `close()` drops ashard's hold: the descriptor is closed and workers are told to let
    go; the memory itself lives until the last mapping (including numpy views the
    caller still holds) is gone.
    """

    def __init__(self, size: int, *, populate: bool = True) -> None:
        self.id = next(_ids)
        self.size = size
        self.fd = _open_fd(f"ashard-{os.getpid()}-{self.id}")
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
        mapping, self.mmap = self.mmap, None  # numpy views keep it alive; nothing else
        release_later(mapping, self.size)


def release_later(obj: Any, size: int) -> None:
    """Drop the caller's reference to `obj` (a mapping, or a view of one) on a helper
    thread when it is large, so that unmapping it, if this was the last reference,
    does not stall the caller. The caller must hold no other reference."""
    global _releaser
    if obj is None or size < RELEASE_IN_THREAD_BYTES:
        return
    if _releaser is None:
        from concurrent.futures import ThreadPoolExecutor

        _releaser = ThreadPoolExecutor(1, thread_name_prefix="ashard-release")
    _releaser.submit(_drop, [obj])


def _drop(box: list[Any]) -> None:
    time.sleep(0.01)  # let the submitting frame let go of its temporary reference first
    box.clear()


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)

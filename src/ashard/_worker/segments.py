"""The worker's side of shared memory: the segments the parent sent (as file
descriptors) and the numpy views `fn` receives, mapped per the call's `cow` mode."""

from __future__ import annotations

import mmap
import os
from typing import Any

from ashard._protocol import ArrayRef, IpcRef, Payload
from ashard._serialize import unpack

__all__ = ["Audited", "Segments"]

_PROT = {"ro": mmap.PROT_READ, "rw": mmap.PROT_READ | mmap.PROT_WRITE}

PAGEMAP_MAX = 4 << 20
"""A private mapping up to this size is checked for writes through /proc/self/pagemap
(8 bytes a page: 23 us for 2 MiB), a larger one through /proc/self/smaps (one entry,
50-80 us, whatever its size)."""

_PAGE = mmap.PAGESIZE
_PRESENT, _SWAPPED, _FILE = 1 << 63, 1 << 62, 1 << 61  # pagemap entry bits
_pagemap: int | None = None  # /proc/self/pagemap, opened on first use; -1: unreadable


class Segments:
    """Segment fds by id, and the shared mappings made of them (reused across calls)."""

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}
        self._shared: dict[tuple[int, str], mmap.mmap] = {}

    def add(self, ids: list[int], fds: list[int]) -> None:
        for seg_id, fd in zip(ids, fds, strict=True):
            old = self._fds.pop(seg_id, None)
            if old is not None:
                os.close(old)
            self._fds[seg_id] = fd

    def drop(self, ids: list[int]) -> None:
        """Close the fds and forget the shared mappings; views still in use stay valid."""
        for seg_id in ids:
            fd = self._fds.pop(seg_id, None)
            if fd is not None:
                os.close(fd)
            for mode in _PROT:
                self._shared.pop((seg_id, mode), None)

    def table(self, ref: IpcRef) -> Any:
        """The Table or RecordBatch in the segment, read without copying."""
        from ashard._shm import open_ipc  # on demand: _shm takes ~10 ms to import, for arrays only

        key = (ref.seg_id, "ro")
        mm = self._shared.get(key)
        if mm is None:
            fd = self._fds[ref.seg_id]
            mm = self._shared[key] = mmap.mmap(fd, ref.size, prot=mmap.PROT_READ)
        return open_ipc(mm, ref.kind)

    def unpack(self, payload: Payload) -> Any:
        """The object in `payload`, each `ArrayRef` among its buffers (a large array it
        held, sent as a segment: `ashard._export.captured`) mapped privately,
        copy-on-write, in its place: what a copy unpickled from the channel would be."""
        data, buffers = payload
        if any(isinstance(b, ArrayRef) for b in buffers):
            buffers = [self.view(b) if isinstance(b, ArrayRef) else b for b in buffers]
        return unpack((data, buffers))

    def view(self, ref: ArrayRef) -> Any:
        """An ndarray over the segment: read-only, private copy-on-write or shared rw."""
        import numpy as np  # on demand: a worker starts without numpy

        count = 1
        for d in ref.shape:
            count *= d
        if ref.size == 0:
            array = np.empty(ref.shape, np.dtype(ref.dtype))
            array.flags.writeable = ref.mode != "ro"
            return array
        fd = self._fds.get(ref.seg_id)
        if fd is None:
            raise RuntimeError(f"ashard internal error: segment {ref.seg_id} was never sent")
        if ref.mode in _PROT:
            key = (ref.seg_id, ref.mode)
            mm = self._shared.get(key)
            if mm is None:
                flags = mmap.MAP_SHARED
                mm = self._shared[key] = mmap.mmap(fd, ref.size, flags=flags, prot=_PROT[ref.mode])
        else:  # "cow" / "audit": this call's own private copy-on-write mapping
            mm = mmap.mmap(fd, ref.size, flags=mmap.MAP_PRIVATE)
        return np.frombuffer(mm, np.dtype(ref.dtype), count).reshape(ref.shape)


def _open_pagemap() -> None:
    global _pagemap
    if _pagemap is None:
        try:
            _pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            _pagemap = -1


class Audited:
    """A borrowed array under ``cow="audit"`` or ``"allow"``: a private copy-on-write
    mapping whose written pages are counted, remapped fresh after a shard wrote to it,
    so that the next shard starts from the original data (a shard's writes are never
    seen by another) and, under audit (`reports`), its writes are seen too."""

    def __init__(self, name: str, segments: Segments, ref: ArrayRef) -> None:
        self.name = name
        self.reports = ref.mode == "audit"
        self._segments = segments
        self._ref = ref
        self.array = self.refresh()
        if ref.size <= PAGEMAP_MAX:
            _open_pagemap()  # now, as the job is loaded: a descriptor no shard opened
        self._by_pages = ref.size <= PAGEMAP_MAX and _pagemap is not None and _pagemap >= 0

    def fork(self) -> Audited:
        """A mapping of its own for one shard, when several shards of a worker run at
        once: each starts from the original data, and its writes are counted apart."""
        return Audited(self.name, self._segments, self._ref)

    def refresh(self) -> Any:
        self.array = self._segments.view(self._ref)
        address = self.array.__array_interface__["data"][0]
        self._key = f"{address:x}-".encode()
        self._pages = (address // _PAGE, -(-self._ref.size // _PAGE))
        self._seen = 0  # written, as last looked at: nothing in a fresh mapping
        return self.array

    def written(self) -> bool:
        """Did a shard write to the mapping since the last look (or since it was made)?
        One read of the page table's flags, or of smaps, per shard: not a pass over the
        data."""
        if not self._by_pages:
            now = self._dirty()
        elif (pages := self._written_pages()) is not None:
            now = pages
        else:  # pagemap failed: smaps from now on (counted in kB), and remapped to be sure
            self._by_pages = False
            return True
        grew, self._seen = now > self._seen, now
        return grew

    def _written_pages(self) -> int | None:
        """Pages of the mapping that writes have copied (a private anonymous page where
        the file's was, in memory or swapped), from /proc/self/pagemap; None where it
        cannot be read."""
        import numpy as np  # loaded: the mapping is an array's

        first, count = self._pages
        assert _pagemap is not None
        try:
            raw = os.pread(_pagemap, count * 8, first * 8)
        except OSError:
            return None
        if len(raw) != count * 8:
            return None
        entries = np.frombuffer(raw, np.uint64)
        held = (entries & np.uint64(_PRESENT | _SWAPPED)) != 0
        return int(np.count_nonzero(held & ((entries & np.uint64(_FILE)) == 0)))

    def _dirty(self) -> int:
        """kB of the mapping that writes have copied (pages of a private file mapping
        become "Anonymous" in /proc/self/smaps when first written)."""
        with open("/proc/self/smaps", "rb") as f:
            inside = False
            for line in f:
                if not inside:
                    inside = line.startswith(self._key)
                elif line.startswith(b"Anonymous:"):
                    return int(line.split()[1])
        return 0

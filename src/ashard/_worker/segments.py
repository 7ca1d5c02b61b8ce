"""The worker's side of shared memory: the segments the parent sent (as file
descriptors) and the numpy views `fn` receives, mapped per the call's `cow` mode."""

from __future__ import annotations

import mmap
import os
from typing import Any

from ashard._protocol import ArrayRef, IpcRef

__all__ = ["Audited", "Segments"]

_PROT = {"ro": mmap.PROT_READ, "rw": mmap.PROT_READ | mmap.PROT_WRITE}


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


class Audited:
    """A borrowed array under ``cow="audit"``: a private copy-on-write mapping whose
    written pages are counted, remapped fresh after a shard wrote to it so the next
    shard's writes are seen too (and it starts from the original data)."""

    def __init__(self, name: str, segments: Segments, ref: ArrayRef) -> None:
        self.name = name
        self._segments = segments
        self._ref = ref
        self.array = self.refresh()

    def fork(self) -> Audited:
        """A mapping of its own for one shard, when several shards of a worker run at
        once: each starts from the original data, and its writes are counted apart."""
        return Audited(self.name, self._segments, self._ref)

    def refresh(self) -> Any:
        self.array = self._segments.view(self._ref)
        self._key = f"{self.array.__array_interface__['data'][0]:x}-".encode()
        return self.array

    def dirty(self) -> int:
        """kB of the mapping that writes have copied (pages of a private file mapping
        become "Anonymous" in /proc/self/smaps when first written): one read of smaps
        per shard, not a pass over the data."""
        with open("/proc/self/smaps", "rb") as f:
            inside = False
            for line in f:
                if not inside:
                    inside = line.startswith(self._key)
                elif line.startswith(b"Anonymous:"):
                    return int(line.split()[1])
        return 0

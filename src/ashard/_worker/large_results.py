"""Large array results leave the worker in shared memory, not through the socket.

A value that is a plain numpy array of `RESULT_SEGMENT_BYTES` or more (a dtype
without Python objects) is copied once into a new memfd, which is then sealed
against shrinking, growing and writing, and sent to the parent as a descriptor with
the result; the worker closes its side at once, so the parent's mapping becomes the
only owner of that memory (`ashard._shm.adopt_result`). Seals mean a worker can
neither cut the memory from under the parent's array (SIGBUS) nor change it later.
Arrays nested inside other values take the normal path.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import sys
from typing import Any

from ashard._fds import above_stdio
from ashard._protocol import ArrayDesc, Payload

__all__ = ["RESULT_SEGMENT_BYTES", "close_all", "oob_bytes", "segment_results"]

RESULT_SEGMENT_BYTES = 1 << 20
"""Array results this large travel as a shared-memory segment."""
SEALS = (
    getattr(fcntl, "F_SEAL_SHRINK", 2)
    | getattr(fcntl, "F_SEAL_GROW", 4)
    | getattr(fcntl, "F_SEAL_WRITE", 8)
    | getattr(fcntl, "F_SEAL_SEAL", 1)
)


def oob_bytes(payload: Payload) -> int:
    """Bytes of a packed value's out-of-band buffers (its arrays' data)."""
    return sum(memoryview(b).nbytes for b in payload[1])


def segment_results(values: list[Any]) -> tuple[list[Any], list[ArrayDesc] | None, list[int]]:
    """`values` with each large array replaced by None, a description of each, and the
    sealed segments' descriptors (in the same order)."""
    np = sys.modules.get("numpy")
    if np is None or not hasattr(os, "memfd_create") or not hasattr(fcntl, "F_ADD_SEALS"):
        return values, None, []
    out = list(values)
    arrays: list[ArrayDesc] = []
    fds: list[int] = []
    try:
        for k, value in enumerate(values):
            if not _segmentable(np, value):
                continue
            fortran = bool(value.flags.f_contiguous and not value.flags.c_contiguous)
            fds.append(_sealed_copy(np, value, fortran))
            arrays.append((k, value.dtype.str, tuple(int(d) for d in value.shape), fortran))
            out[k] = None
    except OSError:  # no memfd to be had (limits): what was not segmented goes by socket
        pass
    if not arrays:
        return values, None, fds
    return out, arrays, fds


def _segmentable(np: Any, value: Any) -> bool:
    if type(value) is not np.ndarray or value.nbytes < RESULT_SEGMENT_BYTES:
        return False
    dtype = value.dtype
    return not dtype.hasobject and np.dtype(dtype.str) == dtype  # str() names it whole


def _sealed_copy(np: Any, value: Any, fortran: bool) -> int:
    # on demand: _shm takes ~10 ms to import, for arrays only
    from ashard._shm import write_array

    fd = above_stdio(os.memfd_create("ashard-result", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
    try:
        os.ftruncate(fd, value.nbytes)
        source = value.T if fortran else value  # C-ordered, as the segment holds it
        if source.flags.c_contiguous:
            write_array(fd, source)
        else:
            _copy_through_mapping(np, fd, source)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _copy_through_mapping(np: Any, fd: int, source: Any) -> None:
    """Copy strided `source` into `fd` in C order, through a mapping."""
    from ashard._shm import PARALLEL_COPY_BYTES, parallel_copy

    mm = mmap.mmap(fd, source.nbytes)
    try:
        target = np.ndarray(source.shape, source.dtype, buffer=mm)
        if source.nbytes >= PARALLEL_COPY_BYTES and target.ndim and target.shape[0] > 1:
            parallel_copy(target, source)
        else:
            np.copyto(target, source, casting="no")
        del target
    finally:
        mm.close()


def close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)

"""Shared data the caller holds: `share()` makes a `SharedArray` or `SharedTable` (one
shared-memory copy, reused across calls), `buffer()` makes a `Buffer` (a shared output
array workers write into).

Passing one of them in ``borrow=`` (or a `Buffer` in ``out=``) ships only a small
descriptor and the segment's file descriptor to each worker, never the data. The
mechanics (segments, views, copies, Arrow IPC) live in `ashard._shm`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Self

import numpy as np

from ashard._shm import (
    SHAREABLE_KINDS,
    Segment,
    array_view,
    check_shareable,
    copy_into_segment,
    ipc_segment,
    is_arrow,
    open_ipc,
    release_later,
)

__all__ = ["Buffer", "SharedArray", "SharedTable", "buffer", "share"]

_CLOSED: np.ndarray[Any, Any] = np.empty(0)


class SegmentBacked:
    """What `SharedArray`, `SharedTable` and `Buffer` share: a segment that can be
    closed (also by leaving ``with``), a size, and no pickling (they travel through
    ``borrow=``/``out=`` as descriptors). `_array` is the parent's view, if any."""

    _segment: Segment
    _array: np.ndarray[Any, Any] | None = None
    _passed_through = "borrow="

    @property
    def segment(self) -> Segment:
        if self._segment.closed:
            raise ValueError(f"this {type(self).__name__} is closed")
        return self._segment

    @property
    def nbytes(self) -> int:
        return self._segment.size

    @property
    def closed(self) -> bool:
        return self._segment.closed

    def _checked_array(self) -> np.ndarray[Any, Any]:
        if self._segment.closed or self._array is None:
            raise ValueError(f"this {type(self).__name__} is closed")
        return self._array

    def close(self) -> None:
        """Let the memory go once no view of it remains."""
        self._segment.close()
        if self._array is not None:
            array, self._array = self._array, _CLOSED
            release_later(array, self._segment.size)
            del array  # the mapping (and its fd) goes with the last view

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> Any:
        raise TypeError(
            f"a {type(self).__name__} is passed to workers through {self._passed_through}, "
            "not pickled inside another object"
        )

    def _describe(self) -> str:
        return ""

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.nbytes:,} bytes"
        return f"<ashard.{type(self).__name__} {self._describe()}, {state}>"


class _SharedNdarray(SegmentBacked):
    """A segment seen as an array of one dtype and shape."""

    def __init__(
        self, segment: Segment, dtype: np.dtype[Any], shape: tuple[int, ...], *, writable: bool
    ) -> None:
        self._segment = segment
        self.dtype = dtype
        self.shape = shape
        self._array = array_view(segment, dtype, shape, writable=writable)

    def _describe(self) -> str:
        return f"{self.dtype} {self.shape}"


class SharedArray(_SharedNdarray):
    """An array in an anonymous shared-memory segment (see `ashard.share`).

    `array` is the parent's view, read-only: workers map the same memory. `close()` (or
    leaving ``with``) lets the memory go once no view of it remains.
    """

    __module__ = "ashard"

    def __init__(self, segment: Segment, dtype: np.dtype[Any], shape: tuple[int, ...]) -> None:
        super().__init__(segment, dtype, shape, writable=False)

    @classmethod
    def copy_of(cls, array: np.ndarray[Any, Any]) -> SharedArray:
        """A new shared, C-contiguous copy of `array`."""
        return cls(copy_into_segment(array), array.dtype, array.shape)

    @property
    def array(self) -> np.ndarray[Any, Any]:
        """The shared data, read-only."""
        return self._checked_array()


class Buffer(_SharedNdarray):
    """A writable array in shared memory (see `ashard.buffer`)."""

    __module__ = "ashard"
    _passed_through = "out= or borrow="

    def __init__(self, segment: Segment, dtype: np.dtype[Any], shape: tuple[int, ...]) -> None:
        super().__init__(segment, dtype, shape, writable=True)

    @property
    def array(self) -> np.ndarray[Any, Any]:
        """The shared data: the parent's writable view of what workers wrote."""
        return self._checked_array()


class SharedTable(SegmentBacked):
    """A pyarrow Table or RecordBatch as Arrow IPC in shared memory (see `ashard.share`).

    Workers open it as a zero-copy view of the same memory; `table` is the parent's.
    """

    __module__ = "ashard"

    def __init__(self, segment: Segment, kind: str) -> None:
        self._segment = segment
        self.kind = kind

    @classmethod
    def write(cls, data: Any) -> SharedTable:
        """A new shared copy of a Table or RecordBatch."""
        return cls(*ipc_segment(data))

    @property
    def table(self) -> Any:
        """The shared data, read zero-copy from the segment."""
        return open_ipc(self.segment.mmap, self.kind)

    def _describe(self) -> str:
        return f"({self.kind})"


def share(obj: Any) -> SharedArray | SharedTable:
    """Copy a numeric or bool array, or a pyarrow Table or RecordBatch, into shared
    memory once, to borrow in many calls.

    Non-contiguous arrays are made contiguous in the copy. This copies in the calling
    thread: from async code with large data, use
    ``await anyio.to_thread.run_sync(ashard.share, data)``.
    """
    if isinstance(obj, np.ndarray):
        if type(obj) is not np.ndarray and type(obj) is not np.memmap:
            raise TypeError(
                f"share() takes a plain numpy array; a {type(obj).__name__} would lose what it "
                "adds to its data (a masked array its mask): share its parts separately "
                "(.data and .mask), or pass it in borrow= to have it pickled whole"
            )
        check_shareable(obj, "share()'s array")
        try:
            return SharedArray.copy_of(obj)
        except OSError as exc:
            raise OSError(exc.errno, f"share()'s array: {exc.strerror}") from exc
    if is_arrow(obj):
        return SharedTable.write(obj)
    raise TypeError(
        f"share() takes a numpy array or a pyarrow Table or RecordBatch, got {type(obj).__name__}"
    )


def buffer(dtype: Any, shape: int | Sequence[int], fill: Any = None) -> Buffer:
    """A shared array of `dtype` and `shape`, zeroed or set to `fill`."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"buffer dtype must be a numpy dtype, got {dtype!r}") from exc
    if dt.kind not in SHAREABLE_KINDS or dt.hasobject:
        raise TypeError(f"buffer dtype must be numeric or bool, got {dt}")
    dims = _check_shape(shape)
    nbytes = dt.itemsize * int(np.prod(dims, dtype=np.int64))
    buf = Buffer(Segment(nbytes), dt, dims)  # a new memfd reads as zeros
    if fill is not None:
        try:
            buf.array[...] = fill
        except (TypeError, ValueError) as exc:
            buf.close()
            raise ValueError(f"buffer fill {fill!r} does not fit dtype {dt}: {exc}") from exc
    return buf


def _check_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, numbers.Integral) else shape
    if isinstance(dims, str | bytes) or not isinstance(dims, Sequence):
        raise TypeError(f"buffer shape must be an int or a sequence of ints, got {shape!r}")
    out = []
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(f"buffer shape must be an int or a sequence of ints, got {shape!r}")
        if d < 0:
            raise ValueError(f"buffer shape must not be negative, got {tuple(dims)}")
        out.append(int(d))
    return tuple(out)

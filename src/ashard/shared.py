"""`ashard.share(array)`: one shared-memory copy of an array, reused across calls.

Passing a `SharedArray` in ``borrow=`` ships only a small descriptor and the segment's
file descriptor to each worker, never the data.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, Self

import numpy as np

from ashard._memfd import Segment, release_later

__all__ = ["SharedArray", "SharedTable", "share"]

_CLOSED: np.ndarray[Any, Any] = np.empty(0)

SHAREABLE_KINDS = "biufc?"
"""numpy dtype kinds shared through memory: bool, integers, floats, complex."""


def check_shareable(array: np.ndarray[Any, Any], what: str) -> None:
    if array.dtype.kind not in SHAREABLE_KINDS or array.dtype.hasobject:
        raise TypeError(
            f"{what} must have a numeric or bool dtype to be shared, got dtype {array.dtype}"
        )


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

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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


class SharedArray(SegmentBacked):
    """An array in an anonymous shared-memory segment (see `ashard.share`).

    `array` is the parent's view, read-only: workers map the same memory. `close()` (or
    leaving ``with``) lets the memory go once no view of it remains.
    """

    def __init__(self, segment: Segment, dtype: np.dtype[Any], shape: tuple[int, ...]) -> None:
        self._segment = segment
        self.dtype = dtype
        self.shape = shape
        self._array = _view(segment, dtype, shape, writable=False)

    @property
    def array(self) -> np.ndarray[Any, Any]:
        """The shared data, read-only."""
        return self._checked_array()

    def _describe(self) -> str:
        return f"{self.dtype} {self.shape}"


def share(obj: Any) -> SharedArray | SharedTable:
    """Copy a numeric or bool array, or a pyarrow Table or RecordBatch, into shared
    memory once, to borrow in many calls.

    Non-contiguous arrays are made contiguous in the copy. This copies in the calling
    thread: from async code with large data, use
    ``await anyio.to_thread.run_sync(ashard.share, data)``.
    """
    if isinstance(obj, np.ndarray):
        check_shareable(obj, "share()'s array")
        return copy_into_segment(obj)
    if is_arrow(obj):
        return SharedTable.write(obj)
    raise TypeError(
        f"share() takes a numpy array or a pyarrow Table or RecordBatch, got {type(obj).__name__}"
    )


def is_arrow(obj: Any) -> bool:
    """True for a pyarrow Table or RecordBatch (without importing pyarrow)."""
    module = type(obj).__module__
    return module.startswith("pyarrow") and type(obj).__name__ in ("Table", "RecordBatch")


class SharedTable(SegmentBacked):
    """A pyarrow Table or RecordBatch as Arrow IPC in shared memory (see `ashard.share`).

    Workers open it as a zero-copy view of the same memory; `table` is the parent's.
    """

    def __init__(self, segment: Segment, kind: str) -> None:
        self._segment = segment
        self.kind = kind

    @classmethod
    def write(cls, data: Any) -> SharedTable:
        import pyarrow as pa

        sink = pa.MockOutputStream()
        _write_ipc(sink, data)
        segment = Segment(sink.size())
        try:
            assert segment.mmap is not None
            _write_ipc(pa.FixedSizeBufferWriter(pa.py_buffer(segment.mmap)), data)
        except BaseException:
            segment.close()
            raise
        return cls(segment, "table" if isinstance(data, pa.Table) else "batch")

    @property
    def table(self) -> Any:
        """The shared data, read zero-copy from the segment."""
        return open_ipc(self.segment.mmap, self.kind)

    def _describe(self) -> str:
        return f"({self.kind})"


def _write_ipc(sink: Any, data: Any) -> None:
    import pyarrow as pa

    with pa.ipc.new_stream(sink, data.schema) as writer:
        if isinstance(data, pa.Table):
            writer.write_table(data)
        else:
            writer.write_batch(data)


def open_ipc(memory: Any, kind: str) -> Any:
    """A Table or RecordBatch over Arrow IPC bytes in `memory`, without copying them."""
    import pyarrow as pa

    reader = pa.ipc.open_stream(pa.py_buffer(memory))
    if kind == "table":
        return reader.read_all()
    batches = list(reader)
    return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=reader.schema)


PARALLEL_COPY_BYTES = 64 << 20
"""Arrays at least this large are copied into shared memory by several threads."""
_COPY_CHUNK_BYTES = 16 << 20
COPY_THREADS = 8
"""Threads for a large copy, even on few cores: the work is waiting on page faults
(on a VM, the host's as well), and more of them in flight finish sooner."""
_copier: ThreadPoolExecutor | None = None


def copy_into_segment(array: np.ndarray[Any, Any]) -> SharedArray:
    """A new `SharedArray` holding a C-contiguous copy of `array`.

    Most of the cost of a large copy is the kernel handing out and zeroing fresh pages
    (page faults), not moving bytes; faults in different threads overlap, so a large
    array is copied in chunks by several threads into lazily faulted memory: 2-3x
    faster here than one thread, with or without MAP_POPULATE (see RESULTS.md).
    """
    parallel = array.nbytes >= PARALLEL_COPY_BYTES and array.ndim > 0 and array.shape[0] > 1
    segment = Segment(array.nbytes, populate=not parallel)
    try:
        target = _view(segment, array.dtype, array.shape, writable=True)
        if parallel:
            _parallel_copy(target, array)
        else:
            np.copyto(target, array, casting="no")
        del target
        return SharedArray(segment, array.dtype, array.shape)
    except BaseException:
        segment.close()
        raise


def _parallel_copy(target: np.ndarray[Any, Any], source: np.ndarray[Any, Any]) -> None:
    global _copier
    if _copier is None:
        threads = min(16, max(COPY_THREADS, os.cpu_count() or 1))
        _copier = ThreadPoolExecutor(threads, thread_name_prefix="ashard-copy")
    if source.flags.c_contiguous:
        target, source = target.reshape(-1), source.reshape(-1)
    rows = target.shape[0]
    step = max(1, rows * _COPY_CHUNK_BYTES // max(target.nbytes, 1))
    spans = [(i, min(i + step, rows)) for i in range(0, rows, step)]
    done = _copier.map(
        lambda span: np.copyto(target[span[0] : span[1]], source[span[0] : span[1]]), spans
    )
    for _ in done:  # re-raises a failed chunk's error
        pass


def _view(
    segment: Segment, dtype: np.dtype[Any], shape: tuple[int, ...], *, writable: bool
) -> np.ndarray[Any, Any]:
    if segment.size == 0 or segment.mmap is None:
        array: np.ndarray[Any, Any] = np.empty(shape, dtype)
    else:
        array = np.frombuffer(segment.mmap, dtype, count=int(np.prod(shape))).reshape(shape)
    array.flags.writeable = writable
    return array

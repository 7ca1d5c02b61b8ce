"""`ashard.share(array)`: one shared-memory copy of an array, reused across calls.

Passing a `SharedArray` in ``borrow=`` ships only a small descriptor and the segment's
file descriptor to each worker, never the data.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import numpy as np

from ashard._memfd import Segment

__all__ = ["SharedArray", "share"]

_CLOSED: np.ndarray[Any, Any] = np.empty(0)

SHAREABLE_KINDS = "biufc?"
"""numpy dtype kinds shared through memory: bool, integers, floats, complex."""


def check_shareable(array: np.ndarray[Any, Any], what: str) -> None:
    if array.dtype.kind not in SHAREABLE_KINDS or array.dtype.hasobject:
        raise TypeError(
            f"{what} must have a numeric or bool dtype to be shared, got dtype {array.dtype}"
        )


class SharedArray:
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
    def segment(self) -> Segment:
        if self._segment.closed:
            raise ValueError("this SharedArray is closed")
        return self._segment

    @property
    def array(self) -> np.ndarray[Any, Any]:
        """The shared data, read-only."""
        if self._segment.closed:
            raise ValueError("this SharedArray is closed")
        return self._array

    @property
    def nbytes(self) -> int:
        return self._segment.size

    @property
    def closed(self) -> bool:
        return self._segment.closed

    def close(self) -> None:
        """Let the memory go once no view of `array` remains."""
        self._segment.close()
        self._array = _CLOSED  # the mapping (and its fd) goes with the last view

    def __enter__(self) -> SharedArray:
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
            "a SharedArray is passed to workers through borrow=, not pickled inside another object"
        )

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.nbytes:,} bytes"
        return f"<ashard.SharedArray {self.dtype} {self.shape}, {state}>"


def share(obj: Any) -> SharedArray:
    """Copy a numeric or bool array into shared memory once, to borrow in many calls.

    Non-contiguous input is made contiguous in the copy. This copies in the calling
    thread: from async code with a large array, use
    ``await anyio.to_thread.run_sync(ashard.share, array)``.
    """
    if not isinstance(obj, np.ndarray):
        raise TypeError(f"share() takes a numpy array, got {type(obj).__name__}")
    check_shareable(obj, "share()'s array")
    return copy_into_segment(obj)


def copy_into_segment(array: np.ndarray[Any, Any]) -> SharedArray:
    """A new `SharedArray` holding a C-contiguous copy of `array`."""
    segment = Segment(array.nbytes)
    try:
        target = _view(segment, array.dtype, array.shape, writable=True)
        np.copyto(target, array, casting="no")
        del target
        return SharedArray(segment, array.dtype, array.shape)
    except BaseException:
        segment.close()
        raise


def _view(
    segment: Segment, dtype: np.dtype[Any], shape: tuple[int, ...], *, writable: bool
) -> np.ndarray[Any, Any]:
    if segment.size == 0 or segment.mmap is None:
        array: np.ndarray[Any, Any] = np.empty(shape, dtype)
    else:
        array = np.frombuffer(segment.mmap, dtype, count=int(np.prod(shape))).reshape(shape)
    array.flags.writeable = writable
    return array

"""`ashard.buffer(dtype, shape)`: a shared output array that workers write into.

Passed in ``out=``, each worker maps the same memory writable and `fn` gets an ndarray
view; after the call the parent reads `buf.array`, no copy. Passed in ``borrow=``, it
is shared without any copy, under the call's ``cow`` rules.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import numpy as np

from ashard._memfd import Segment, release_later
from ashard.shared import _CLOSED, SHAREABLE_KINDS, _view

__all__ = ["Buffer", "buffer"]


class Buffer:
    """A writable array in shared memory (see `ashard.buffer`)."""

    def __init__(self, segment: Segment, dtype: np.dtype[Any], shape: tuple[int, ...]) -> None:
        self._segment = segment
        self.dtype = dtype
        self.shape = shape
        self._array = _view(segment, dtype, shape, writable=True)

    @property
    def segment(self) -> Segment:
        if self._segment.closed:
            raise ValueError("this Buffer is closed")
        return self._segment

    @property
    def array(self) -> np.ndarray[Any, Any]:
        """The shared data: the parent's writable view of what workers wrote."""
        if self._segment.closed:
            raise ValueError("this Buffer is closed")
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
        array, self._array = self._array, _CLOSED
        release_later(array, self._segment.size)
        del array  # the mapping (and its fd) goes with the last view

    def __enter__(self) -> Buffer:
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
            "a Buffer is passed to workers through out= or borrow=, not pickled inside "
            "another object"
        )

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.nbytes:,} bytes"
        return f"<ashard.Buffer {self.dtype} {self.shape}, {state}>"


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

"""`ashard.buffer(dtype, shape)`: a shared output array that workers write into.

Passed in ``out=``, each worker maps the same memory writable and `fn` gets an ndarray
view; after the call the parent reads `buf.array`, no copy. Passed in ``borrow=``, it
is shared without any copy, under the call's ``cow`` rules.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from ashard._memfd import Segment
from ashard.shared import SHAREABLE_KINDS, SegmentBacked, _view

__all__ = ["Buffer", "buffer"]


class Buffer(SegmentBacked):
    """A writable array in shared memory (see `ashard.buffer`)."""

    _passed_through = "out= or borrow="

    def __init__(self, segment: Segment, dtype: np.dtype[Any], shape: tuple[int, ...]) -> None:
        self._segment = segment
        self.dtype = dtype
        self.shape = shape
        self._array = _view(segment, dtype, shape, writable=True)

    @property
    def array(self) -> np.ndarray[Any, Any]:
        """The shared data: the parent's writable view of what workers wrote."""
        return self._checked_array()

    def _describe(self) -> str:
        return f"{self.dtype} {self.shape}"


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

"""Borrow landing: a borrowed array goes to the nodes once, into their shared memory.

The caller scatters a call's borrow to every node once (`ashard._dask.backend`). A
large plain numeric array travels as a `Landing`, which unpickles on the node straight
into a `SharedArray`: the copy the Dask worker keeps is the very segment its ashard
workers map (`ashard._dask.node` passes it on as the call's borrow), so the node holds
it once. Dask's memory accounting sees its size (`sizeof`), and it pickles again (a
peer fetching it, Dask spilling it) from that memory without a copy.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
from dask.sizeof import sizeof

from ashard._export import _plain_array
from ashard._shm import SHAREABLE_KINDS
from ashard.shared import Buffer, SharedArray

__all__ = ["LAND_BYTES", "Landing", "landed", "landing"]

LAND_BYTES = 1 << 20
"""Borrowed arrays from this size land in a node's shared memory as they arrive."""


class Landing:
    """A borrowed array on its way to a node (see the module docstring)."""

    def __init__(self, array: Any) -> None:
        self.array = array  # an ndarray, or (on a node) a SharedArray

    def __reduce__(self) -> tuple[Any, ...]:
        view = self.array.array if isinstance(self.array, SharedArray | Buffer) else self.array
        data = np.ascontiguousarray(view)
        return (_land, (pickle.PickleBuffer(data.data), data.dtype.str, data.shape))

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


def _land(buffer: Any, dtype: str, shape: tuple[int, ...]) -> Landing:
    """Unpickling on a node: the array, copied into shared memory as it arrives."""
    array = np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape)
    return Landing(SharedArray.copy_of(array))


def landing(value: Any) -> Any:
    """`value` as it should travel to the nodes: large plain numeric arrays and
    ashard's shared arrays as a `Landing`, anything else as it is (pickled)."""
    if isinstance(value, SharedArray | Buffer):
        return Landing(value)
    if _plain_array(value) and value.dtype.kind in SHAREABLE_KINDS and value.nbytes >= LAND_BYTES:
        return Landing(value)
    return value


def landed(value: Any) -> Any:
    """A borrowed value as a node's workers take it: a landed array's shared memory."""
    return value.array if isinstance(value, Landing) else value


def _sizeof_landing(value: Landing) -> int:
    return value.nbytes


sizeof.register(Landing)(_sizeof_landing)

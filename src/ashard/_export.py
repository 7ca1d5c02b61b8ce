"""Turn a call's ``borrow=`` and ``out=`` into what workers receive: arrays become
descriptors of shared-memory segments (a large array's copy reused while the array is
unchanged: `ashard._borrowed`), anything else is pickled once. The large arrays in the
pickled `fn` itself (globals and closures it captured by value) travel the same way.

Used by the local backend, in a worker thread: copying a large array into shared
memory or pickling a large object must not stall the event loop.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ashard._borrowed import MIN_BYTES, BorrowCache, Lease
from ashard._framing import MAX_FDS
from ashard._protocol import ArrayRef, IpcRef, Payload, SinkRef
from ashard._serialize import pickle_payload, uncopied
from ashard._shm import SHAREABLE_KINDS, Segment, SegmentHold, is_arrow
from ashard.shared import Buffer, SharedArray, SharedTable
from ashard.tables import TableSink

__all__ = ["Exported", "captured", "export"]

_BORROW_MODE = {"deny": "ro", "allow": "cow", "audit": "audit"}


@dataclass
class Exported:
    """A call's shared inputs and outputs, ready for `JobSpec.borrow`."""

    kwargs: dict[str, Payload | ArrayRef | IpcRef | SinkRef] = field(default_factory=dict)
    fn: Payload | None = None  # the call's fn, its large arrays as segments (`captured`)
    segments: list[Segment] = field(default_factory=list)  # fds every worker needs
    # what this call made, its leases of cached copies, and its holds on every segment
    owned: list[SharedArray | SharedTable | Lease | SegmentHold] = field(default_factory=list)

    def close(self) -> None:
        """Release what this call shared on its own (not `share()`d or `Buffer`s), its
        hold on cached copies of borrowed arrays and on every segment it shares."""
        for shared in self.owned:
            shared.close()
        self.owned.clear()


def export(
    borrow: Mapping[str, Any],
    out: Mapping[str, Any],
    cow: str,
    cache: BorrowCache | None,
    fn: Payload | None = None,
) -> Exported:
    """Share or pickle every borrowed and output value (arrays through `cache`, the
    pool's, if it keeps copies), and the large arrays of the pickled `fn` (`captured`);
    undo everything on failure."""
    exported = Exported()
    try:
        for name, value in borrow.items():
            exported.kwargs[name] = _export_borrow(exported, name, value, _BORROW_MODE[cow], cache)
        for name, value in out.items():
            if isinstance(value, TableSink):
                exported.kwargs[name] = value.spec()
            elif isinstance(value, SinkRef):  # a sink's spec, sent ahead to a cluster node
                exported.kwargs[name] = value
            else:
                exported.kwargs[name] = _ref(exported, _segment_of(value, f"out[{name!r}]"),
                                             value, "rw")  # fmt: skip
        if len(exported.segments) > MAX_FDS:
            raise ValueError(
                f"a call can share at most {MAX_FDS} arrays through borrow and out, "
                f"got {len(exported.segments)}"
            )
        if fn is not None:
            exported.fn = _export_fn(exported, fn, cache)
    except BaseException:
        exported.close()
        raise
    return exported


def _export_borrow(
    exported: Exported, name: str, value: Any, mode: str, cache: BorrowCache | None
) -> Payload | ArrayRef | IpcRef:
    if isinstance(value, SharedArray | Buffer):
        return _ref(exported, _segment_of(value, f"borrow[{name!r}]"), value, mode)
    if _plain_array(value) and value.dtype.kind in SHAREABLE_KINDS:
        shared = _shared_copy(exported, value, f"borrow[{name!r}]", cache)
        return _ref(exported, shared.segment, shared, mode)
    if is_arrow(value):
        value = SharedTable.write(value)
        exported.owned.append(value)
    if isinstance(value, SharedTable):
        segment = _segment_of(value, f"borrow[{name!r}]")
        _share(exported, segment)
        return IpcRef(segment.id, segment.size, value.kind)  # immutable: no cow modes
    return pickle_payload(uncopied(value), f"borrow[{name!r}]")


def captured(fn: Payload) -> list[np.ndarray[Any, Any] | None]:
    """The arrays of `fn`'s out-of-band buffers that travel as segments of their own
    (plain, C-contiguous, of a shareable kind, `MIN_BYTES` or more: a large array that
    `fn` captured), None for each other buffer."""
    found: list[np.ndarray[Any, Any] | None] = []
    for buffer in fn[1]:
        array = memoryview(buffer).obj if isinstance(buffer, pickle.PickleBuffer) else None
        if (
            not isinstance(array, np.ndarray)
            or not _plain_array(array)
            or array.nbytes < MIN_BYTES
            or not array.flags.c_contiguous
            or array.dtype.kind not in SHAREABLE_KINDS
        ):
            array = None
        found.append(array)
    return found


def _export_fn(exported: Exported, fn: Payload, cache: BorrowCache | None) -> Payload:
    """`fn` with each of its `captured` arrays replaced by the `ArrayRef` of a shared
    copy (a cached one while unchanged, as a borrowed array's), which the worker maps
    privately, copy-on-write, where it unpickles `fn`: its writes stay its own, as
    they would in a copy unpickled from the channel, which the array no longer
    crosses for every call."""
    data, buffers = fn
    sent: list[Any] = []
    for buffer, array in zip(buffers, captured(fn), strict=True):
        if array is None or len(exported.segments) >= MAX_FDS:  # (the rest: in the JOB)
            sent.append(buffer)
            continue
        try:
            shared = _shared_copy(exported, array, "fn", cache)
        except OSError:  # no room for a segment: it goes in the message, as it always could
            sent.append(buffer)
            continue
        sent.append(_ref(exported, shared.segment, shared, "cow"))
    if all(a is b for a, b in zip(sent, buffers, strict=True)):
        return fn
    return data, sent


def _shared_copy(
    exported: Exported, array: np.ndarray[Any, Any], argument: str, cache: BorrowCache | None
) -> SharedArray:
    """A shared copy of `array` for this call: `cache`'s if it keeps one, else its own."""
    try:
        cached = None if cache is None else cache.lease(array)
        if cached is not None:
            exported.owned.append(cached)
            return cached.shared
        shared = SharedArray.copy_of(array)
        exported.owned.append(shared)
        return shared
    except OSError as exc:
        raise OSError(exc.errno, f"{argument}: {exc.strerror}") from exc


def _plain_array(value: Any) -> bool:
    """An ndarray that is its data and nothing more. Subclasses carry more (a masked
    array's mask, a matrix's algebra) that a shared view would drop: they are pickled,
    and arrive whole."""
    return type(value) is np.ndarray or type(value) is np.memmap


def _segment_of(value: SharedArray | SharedTable | Buffer, argument: str) -> Segment:
    if value.closed:
        raise ValueError(f"{argument} is a closed {type(value).__name__}")
    return value.segment


def _share(exported: Exported, segment: Segment) -> None:
    """Count `segment` among the call's, held open for it until it ends."""
    if segment not in exported.segments:
        exported.owned.append(segment.hold())
        exported.segments.append(segment)


def _ref(exported: Exported, segment: Segment, array: SharedArray | Buffer, mode: str) -> ArrayRef:
    _share(exported, segment)
    return ArrayRef(segment.id, segment.size, array.dtype.str, array.shape, mode)

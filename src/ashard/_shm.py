"""Shared-memory mechanics: segments, array views, copies into segments, Arrow IPC.

A segment is an anonymous Linux memfd, mapped in the parent, handed to workers as a
file descriptor over their socketpair (SCM_RIGHTS).

A memfd has no name in /dev/shm: the kernel frees it when the last descriptor and
mapping are gone, so nothing outlives the parent and its workers, even after SIGKILL.

Elsewhere (or with ``ASHARD_SHM=named``) a segment is a POSIX named segment that is
unlinked the moment it is opened: only its descriptor travels, so it is as
leak-proof as a memfd except for the instant between ``shm_open`` and ``shm_unlink``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import mmap
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ashard._fds import above_stdio
from ashard._priority import lower

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "SHAREABLE_KINDS",
    "Segment",
    "SegmentHold",
    "adopt_result",
    "array_view",
    "available",
    "backend",
    "check_shareable",
    "copy_into_segment",
    "ipc_segment",
    "is_arrow",
    "open_ipc",
    "parallel_copy",
    "release_later",
    "same_bytes",
    "write_array",
]

_MADV_POPULATE_READ = 22  # Linux 5.14 and later; Python 3.11's mmap does not name it
RELEASE_IN_THREAD_BYTES = 32 << 20
"""Mappings at least this large are unmapped on a helper thread: freeing a GiB of
pages takes ~150 ms, too long for the caller's event loop."""
_releaser: ThreadPoolExecutor | None = None

_ids = itertools.count(1)


def _after_fork_in_child() -> None:
    """The helper threads are the parent's: a forked child starts its own on use."""
    global _releaser, _copier
    _releaser = _copier = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def available() -> bool:
    """True where anonymous memfd segments can be made (Linux)."""
    return hasattr(os, "memfd_create") and sys.platform.startswith("linux")


def backend() -> str:
    """ "memfd" where available, else "named"; ``ASHARD_SHM=named`` forces the fallback."""
    choice = os.environ.get("ASHARD_SHM", "").strip().lower()
    if choice not in ("", "memfd", "named"):
        raise ValueError(f"ASHARD_SHM must be 'memfd' or 'named', got {choice!r}")
    if choice == "named" or not available():
        return "named"
    return "memfd"


def _open_fd(name: str) -> int:
    if backend() == "memfd":
        return above_stdio(os.memfd_create(name, os.MFD_CLOEXEC))
    try:
        import _posixshmem  # named segments: only where memfd is missing
    except ImportError:
        raise NotImplementedError(
            "ashard shared memory needs Linux memfd or POSIX shared memory (shm_open)"
        ) from None
    path = f"/{name}-{os.urandom(4).hex()}"
    fd: int = _posixshmem.shm_open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    _posixshmem.shm_unlink(path)  # from now on only descriptors keep it alive
    return above_stdio(fd)


class Segment:
    """A memfd (or unlinked named segment) of `size` bytes and the parent's shared,
    writable mapping of it.

    `close()` drops ashard's hold: the descriptor is closed and workers are told to let
    go; the memory itself lives until the last mapping (including numpy views the
    caller still holds) is gone. A call under way that shares it holds it (`hold`):
    closed meanwhile, it is closed to new calls at once and for good once the last
    such call lets go, so a worker that joins the call later (a crashed one's
    replacement) is still handed this segment, never what its descriptor's number
    came to name after a close.
    """

    def __init__(self, size: int, *, populate: bool = True) -> None:
        self.id = next(_ids)
        self.size = size
        self.fd = _open_fd(f"ashard-{os.getpid()}-{self.id}")
        try:
            os.ftruncate(self.fd, size)
            flags = mmap.MAP_SHARED
            if populate and hasattr(mmap, "MAP_POPULATE"):
                flags |= mmap.MAP_POPULATE  # fault every page in now, in one go
            self.mmap: mmap.mmap | None = mmap.mmap(self.fd, size, flags=flags) if size else None
        except BaseException:
            os.close(self.fd)
            raise
        self.holders: weakref.WeakSet[Any] = weakref.WeakSet()  # WorkerHandles with our fd
        self._finalizer = weakref.finalize(self, _close_fd, self.fd)
        self._lock = threading.Lock()  # calls share it from threads (`_export`)
        self._calls = 0  # calls under way that share it
        self._closing = False

    @property
    def closed(self) -> bool:
        """Closed to new use (calls under way may still hold the descriptor)."""
        return self._closing or not self._finalizer.alive

    def hold(self) -> SegmentHold:
        """Keep the descriptor open for a call that shares this segment until the call
        closes the hold, whatever `close()` does meanwhile; `ValueError` if closed."""
        with self._lock:
            if self.closed:
                raise ValueError("this shared memory segment is closed")
            self._calls += 1
        return SegmentHold(self)

    def _let_go(self) -> None:
        with self._lock:
            self._calls -= 1
            last = self._calls == 0 and self._closing
        if last:
            self._close_now()

    def map_in(self, start: int, stop: int) -> None:
        """Map bytes `start`..`stop`, written through the descriptor, into the parent's
        mapping now.

        Workers map them as well, so the memory counts as shared between processes, not
        as one worker's own; and the parent's first read of it costs no page faults.
        `madvise` is called through ctypes, which lets the GIL go: `mmap.madvise` holds
        it, and mapping 1 GiB in at once held it for 55 ms (steps of 8 MiB still kept
        the caller's event loop waiting 4-8 ms, at p99)."""
        global _populate_works
        madvise = _madvise()
        if self.mmap is None or madvise is None or not _populate_works or stop <= start:
            return
        import ctypes  # loaded by `_madvise`

        view = ctypes.c_char.from_buffer(self.mmap)
        try:
            if madvise(ctypes.addressof(view) + start, stop - start, _MADV_POPULATE_READ):
                _populate_works = False  # a kernel before 5.14: pages map on first touch
        finally:
            del view  # the mapping may be closed once no view of it remains

    def close(self) -> None:
        """Close the descriptor and tell every worker holding it to drop it: now, or
        when the last call that holds it lets go."""
        with self._lock:
            self._closing = True
            if self._calls:
                return
        self._close_now()

    def _close_now(self) -> None:
        if self._finalizer.alive:
            self._finalizer()
            for holder in list(self.holders):
                holder.drop_segment(self.id)
            self.holders.clear()
        mapping, self.mmap = self.mmap, None  # numpy views keep it alive; nothing else
        release_later(mapping, self.size)


class SegmentHold:
    """A call's hold on a `Segment` it shares (`Segment.hold`); `close()` lets go, once."""

    __slots__ = ("_segment",)

    def __init__(self, segment: Segment) -> None:
        self._segment: Segment | None = segment

    def close(self) -> None:
        segment, self._segment = self._segment, None
        if segment is not None:
            segment._let_go()


_madvise_fn: Any = None
_populate_works = True  # MADV_POPULATE_READ: until the kernel says it has none


def _madvise() -> Any:
    """libc's `madvise`, called without the GIL (Linux only; None elsewhere)."""
    global _madvise_fn
    if _madvise_fn is None and sys.platform.startswith("linux"):
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        _madvise_fn = fn
    return _madvise_fn


def release_later(obj: Any, size: int) -> None:
    """Drop the caller's reference to `obj` (a mapping, or a view of one) on a helper
    thread when it is large, so that unmapping it, if this was the last reference,
    does not stall the caller. The caller must hold no other reference."""
    global _releaser
    if obj is None or size < RELEASE_IN_THREAD_BYTES:
        return
    if _releaser is None:
        _releaser = ThreadPoolExecutor(1, thread_name_prefix="ashard-release")
    _releaser.submit(_drop, [obj])


def _drop(box: list[Any]) -> None:
    time.sleep(0.01)  # let the submitting frame let go of its temporary reference first
    box.clear()


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


SHAREABLE_KINDS = "biufc?"
"""numpy dtype kinds shared through memory: bool, integers, floats, complex."""


def check_shareable(array: np.ndarray[Any, Any], what: str) -> None:
    if array.dtype.kind not in SHAREABLE_KINDS or array.dtype.hasobject:
        raise TypeError(
            f"{what} must have a numeric or bool dtype to be shared, got dtype {array.dtype}"
        )


def array_view(
    segment: Segment, dtype: np.dtype[Any], shape: tuple[int, ...], *, writable: bool
) -> np.ndarray[Any, Any]:
    """The parent's ndarray over a segment (an empty array for a zero-size one)."""
    import numpy as np  # numpy on first use: a worker and `import ashard` start without it

    if segment.size == 0 or segment.mmap is None:
        array: np.ndarray[Any, Any] = np.empty(shape, dtype)
    else:
        array = np.frombuffer(segment.mmap, dtype, count=int(np.prod(shape))).reshape(shape)
    array.flags.writeable = writable
    return array


PARALLEL_COPY_BYTES = 64 << 20
"""Arrays at least this large are copied into shared memory by several threads."""
_COPY_CHUNK_BYTES = 16 << 20
COPY_THREADS = 8
"""Threads for a large copy, even on few cores: the work is waiting on page faults
(on a VM, the host's as well), and more of them in flight finish sooner."""
COPY_NICE = 10
"""Steps of niceness the copy threads run below the caller's threads, as the workers
do by default (`Pool(worker_nice=)`): eight of them busy would otherwise keep the
caller's event loop waiting for a CPU."""
_copier: ThreadPoolExecutor | None = None


def copy_into_segment(array: np.ndarray[Any, Any]) -> Segment:
    """A new segment holding a C-contiguous copy of `array`.

    A C-contiguous array is written into the segment's descriptor (`write_array`); any
    other is copied through a mapping, in chunks by several threads when it is large:
    most of that copy's cost is the kernel handing out fresh pages (page faults), and
    faults in different threads overlap (see RESULTS.md).
    """
    import numpy as np  # numpy on first use: a worker and `import ashard` start without it

    if array.flags.c_contiguous:
        segment = Segment(array.nbytes, populate=False)
        try:
            _write_and_map(segment, array)
        except BaseException:
            segment.close()
            raise
        return segment
    parallel = array.nbytes >= PARALLEL_COPY_BYTES and array.shape[0] > 1
    segment = Segment(array.nbytes, populate=not parallel)
    try:
        target = array_view(segment, array.dtype, array.shape, writable=True)
        if parallel:
            parallel_copy(target, array)
        else:
            np.copyto(target, array, casting="no")
        del target
    except BaseException:
        segment.close()
        raise
    return segment


def _write_and_map(segment: Segment, array: np.ndarray[Any, Any]) -> None:
    """Write `array` into `segment`, a large one on a (nicer) copy thread while this
    thread maps in what is written: 1 GiB in 0.32 s, against 0.36 s one after the
    other. Returns once the writing is over, whatever happened."""
    if array.nbytes < PARALLEL_COPY_BYTES:
        write_array(segment.fd, array)
        segment.map_in(0, array.nbytes)
        return
    progress: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    writing = _copy_threads().submit(write_array, segment.fd, array, progress.put)
    writing.add_done_callback(lambda _: progress.put(None))
    try:
        mapped = 0
        while (written := progress.get()) is not None:
            segment.map_in(mapped, written)
            mapped = written
    finally:
        error = writing.exception()  # waits: nothing may write into a closed descriptor
    if error is not None:
        raise error


_WRITE_BYTES = 64 << 20


def write_array(
    fd: int, array: np.ndarray[Any, Any], progress: Callable[[int], object] | None = None
) -> None:
    """Write the bytes of C-contiguous `array` at the start of `fd` (a memfd, sized).

    The kernel fills the segment's pages as it writes, which beats faulting a fresh
    mapping in and copying into it: 1 GiB in 0.33 s in one thread, against 0.40 s
    through a mapping with eight (see RESULTS.md). What the kernel cannot do (memory it
    cannot read, a full tmpfs) is an `OSError` here, not a SIGBUS on a page of a
    mapping. `progress` is told the bytes written so far, after each step.
    """
    import numpy as np  # numpy on first use: a worker and `import ashard` start without it

    data = array.reshape(-1).view(np.uint8).data
    done = 0
    while done < len(data):
        try:
            done += os.pwrite(fd, data[done : done + _WRITE_BYTES], done)
        except OSError as exc:
            if exc.errno != errno.EFAULT:
                raise
            why = "the array's memory cannot be read (a memory-mapped file cut short?)"
            raise OSError(errno.EFAULT, why) from None
        if progress is not None:
            progress(done)


def parallel_copy(target: np.ndarray[Any, Any], source: np.ndarray[Any, Any]) -> None:
    import numpy as np  # numpy on first use: a worker and `import ashard` start without it

    if source.flags.c_contiguous:
        target, source = target.reshape(-1), source.reshape(-1)
    for _ in _by_rows(target, lambda lo, hi: np.copyto(target[lo:hi], source[lo:hi])):
        pass  # re-raises a failed chunk's error


def same_bytes(array: np.ndarray[Any, Any], copy: np.ndarray[Any, Any]) -> bool:
    """Whether C-contiguous `array` holds exactly the bytes of `copy` (same dtype and
    shape): compared as words, not values (a NaN equals itself, -0.0 differs from 0.0),
    by several threads for a large array (numpy compares without the GIL)."""
    import numpy as np  # numpy on first use: a worker and `import ashard` start without it

    word = np.uint64 if array.nbytes % 8 == 0 else np.uint8
    a, b = array.reshape(-1).view(word), copy.reshape(-1).view(word)
    if array.nbytes < PARALLEL_COPY_BYTES:
        return bool(np.array_equal(a, b))
    differs = threading.Event()

    def compare(lo: int, hi: int) -> None:
        if not differs.is_set() and not np.array_equal(a[lo:hi], b[lo:hi]):
            differs.set()

    for _ in _by_rows(a, compare):
        pass
    return not differs.is_set()


def _by_rows(array: np.ndarray[Any, Any], work: Callable[[int, int], Any]) -> Iterator[Any]:
    """`work(lo, hi)` over spans of `array`'s first axis of about 16 MiB, on the copy
    threads; the results in order."""
    rows = array.shape[0]
    step = max(1, rows * _COPY_CHUNK_BYTES // max(array.nbytes, 1))
    return _copy_threads().map(lambda lo: work(lo, min(lo + step, rows)), range(0, rows, step))


def _copy_threads() -> ThreadPoolExecutor:
    """The copy threads (made on first use)."""
    global _copier
    if _copier is None:
        threads = min(16, max(COPY_THREADS, os.cpu_count() or 1))
        _copier = ThreadPoolExecutor(
            threads, thread_name_prefix="ashard-copy", initializer=_lower_priority
        )
    return _copier


def _lower_priority() -> None:
    """Run this thread `COPY_NICE` steps nicer (Linux keeps a nice value per thread;
    elsewhere a thread's id is not something to renice)."""
    if not sys.platform.startswith("linux"):
        return
    lower(threading.get_native_id(), COPY_NICE)


_NEEDED_SEALS = 2 | 4  # F_SEAL_SHRINK | F_SEAL_GROW: the size cannot change under us


def adopt_result(fd: int, dtype: str, shape: tuple[int, ...], fortran: bool) -> Any:
    """The ndarray of a worker's large array result (`ashard._worker.large_results`): a
    private, writable mapping of its sealed segment, owning the memory (freed with
    the array). Takes `fd` (closed here); `ValueError` if the segment is not what it
    claims to be - a worker's word is not trusted."""
    import numpy as np  # numpy on first use: a worker and `import ashard` start without it

    try:
        kind = np.dtype(dtype)
        if kind.hasobject or kind.kind not in SHAREABLE_KINDS + "SUVmM":
            raise ValueError(f"an array result of dtype {kind} cannot come by shared memory")
        nbytes = kind.itemsize * int(np.prod(shape, dtype=np.int64))
        seals = fcntl.fcntl(fd, getattr(fcntl, "F_GET_SEALS", 1034))
        if seals & _NEEDED_SEALS != _NEEDED_SEALS:
            raise ValueError("an array result's segment is not sealed against resizing")
        if os.fstat(fd).st_size != nbytes or nbytes == 0:
            raise ValueError("an array result's segment does not have the array's size")
        mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_PRIVATE)
    finally:
        os.close(fd)
    return np.ndarray(shape, kind, buffer=mm, order="F" if fortran else "C")


def is_arrow(obj: Any) -> bool:
    """True for a pyarrow Table or RecordBatch (without importing pyarrow)."""
    module = type(obj).__module__
    return module.startswith("pyarrow") and type(obj).__name__ in ("Table", "RecordBatch")


def ipc_segment(data: Any) -> tuple[Segment, str]:
    """A new segment holding a Table or RecordBatch as an Arrow IPC stream, and its kind
    ("table" or "batch")."""
    import pyarrow as pa  # pyarrow on first use: its import is slow

    sink = pa.MockOutputStream()
    _write_ipc(sink, data)
    segment = Segment(sink.size())
    try:
        assert segment.mmap is not None
        _write_ipc(pa.FixedSizeBufferWriter(pa.py_buffer(segment.mmap)), data)
    except BaseException:
        segment.close()
        raise
    return segment, "table" if isinstance(data, pa.Table) else "batch"


def _write_ipc(sink: Any, data: Any) -> None:
    import pyarrow as pa  # pyarrow on first use: its import is slow

    with pa.ipc.new_stream(sink, data.schema) as writer:
        if isinstance(data, pa.Table):
            writer.write_table(data)
        else:
            writer.write_batch(data)


def open_ipc(memory: Any, kind: str) -> Any:
    """A Table or RecordBatch over Arrow IPC bytes in `memory`, without copying them."""
    import pyarrow as pa  # pyarrow on first use: its import is slow

    reader = pa.ipc.open_stream(pa.py_buffer(memory))
    if kind == "table":
        return reader.read_all()
    batches = list(reader)
    return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=reader.schema)

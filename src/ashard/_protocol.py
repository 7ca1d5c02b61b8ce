"""Message kinds on the worker channel. Messages are tuples whose first field is one of
these codes; the comments give the rest of each tuple.

parent -> worker (each kind has its record, which `parse_order` makes)::

    HELLO    Hello         sys_path, init payload | None, max_frame, memory limit
                           (bytes) | None, the multiprocessing authkey | None, hygiene,
                           otel_setup | None, worker_loop
    JOB      RegisterJob   key, JobSpec: register fn and borrow for a call
    RUN      RunChunk      key, seq, first, n, attempts | None, items payload | None,
                           traceparent | None (W3C: the caller's attempt span)
    CALL     CallFn        seq, fn, args, kwargs, timeout: one call, no job
    CANCEL   CancelJob     key: drop queued chunks of a job (+ SIGUSR1)
    FORGET   ForgetJob     key: the job is over, free its fn and borrow
    SEGMENTS AddSegments   seg_ids: shared-memory fds ride along (SCM_RIGHTS)
    DROP     DropSegments  seg_ids: close those segments
    MARK     MarkOutput    token: write it to fds 1 and 2 (where a queued call's output
                           begins), then go on
    UNCALL   CancelCall    seq: do not run call `seq`, or stop it if it runs (+ SIGUSR1)
    RECALL   RecallChunks  key, seq: the chunks of job `key` from `seq` on that have not
                           started go back (each answered as never run, in its turn)
    PRELOAD  Preload       modules: import them now (a call about to come needs them)

A worker may hold several CALLs at once (the parent pipelines short calls): it runs them
in order and answers each in order, seq -1 included. The parent tells where the output of
each call after the first begins with a MARK before it.

The worker exits at end of stream: the parent closes its end to stop a worker.

worker -> parent::

    READY        pid, private rss after init (bytes)
    INIT_FAILED  exception record
    RESULT       seq, k0, n, values payload, errors, elapsed, final, writes, rss,
                 commits, arrays, peak, hygiene        (array segment fds ride along)

A RESULT reports chunk positions ``k0 .. k0+n-1`` of chunk `seq`. `errors` is a list of
``(k, kind, detail)`` for positions k (counted from k0): RAISED (detail: exception
record) or TIMEOUT (detail: seconds run, and the Python stack where it was stopped or
None) for ``k < n``, or INTERRUPTED at ``k == n``
(positions from there on never ran: the chunk ends, and they go back to the queue).
`final` says the chunk is over; `rss` is the worker's private memory then (bytes), and
`peak` (jobs that ask, `JobSpec.peak`) how far its private memory rose during the chunk
above where it started (bytes; 0 otherwise); `hygiene` (a final report only) what the
task changed in process-wide state, ``(notes, left)``: one-line notes, and whether it
left threads, processes or descriptors behind - or None; a third element, when there
is one, holds remarks for the call's `Diagnostics.notes` (an event loop held too long).
`commits` lists the files positions committed to table sinks and results stores:
``(k, name, rows, bytes, memory, schema)`` (name "" for the results store; rows -1 for
a pickled result; memory: the rows' in-memory bytes; schema: its serialized pyarrow
schema, or None). `arrays` lists ``(k, dtype, shape, fortran)`` for positions whose
value is a large ndarray sent as a sealed memfd (one fd each, in order) instead of
through the socket.

User objects (items, result values) travel as a `Payload` pickled on their own, apart
from their message: a message can always be read, and an object that cannot be
unpickled fails its shard, not the channel. A CALL carries its function and arguments
itself (the fastest round trip); a worker that cannot load one answers with seq -1,
which stands for the one call it was given. A CALL whose arguments (or whose function's
captures) hold large arrays carries instead a `SharedCall` as its function: the three
pickled together, each such array a segment sent ahead (SEGMENTS) in its place.

The parent trusts nothing a worker sends: `parse_result` checks every RESULT, and a
message that does not parse is a `ProtocolViolation` that breaks that worker. The
worker trusts its parent, but reads each message through `parse_order` all the same:
one place knows the shape of every kind, and the loop works with named fields.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any, NamedTuple

HELLO, JOB, RUN, CALL, CANCEL, FORGET, SEGMENTS, DROP, MARK, UNCALL, RECALL, PRELOAD = range(12)
READY, INIT_FAILED, RESULT = range(100, 103)

RAISED, TIMEOUT, INTERRUPTED = range(3)
_DETAIL_KINDS = {RAISED: tuple, TIMEOUT: tuple, INTERRUPTED: type(None)}

ITEMS, SHARDS = range(2)

UNREADABLE_CALL = -1
"""The seq of a worker's answer to a CALL it could not unpickle."""
EXIT_OVER_MEMORY = 213
"""Exit status of a worker that stopped itself past its memory limit (HELLO)."""

INTERRUPT_SIGNAL = signal.SIGUSR1
"""Sent by the parent to stop the shard a worker is running (cancellation)."""
DUMP_SIGNAL = signal.SIGUSR2
"""Sent by the parent before it kills a worker hung past its timeout: faulthandler
writes every thread's stack to the memfd the worker sent with READY."""


Payload = tuple[Any, list[Any]]
"""User objects pickled on their own (`ashard._serialize.pack`): ``(pickle, out-of-band
buffers)``; the pickle is bytes, or a view of the frame it arrived in. A plain tuple:
a class would cost ~6 us per message to pickle and unpickle."""


class ProtocolViolation(Exception):
    """The other end sent something that is not a valid frame or message: the channel
    cannot be trusted any more."""


Commit = tuple[int, str, int, int, int, "bytes | None"]
"""A file a position committed: k, output name, rows, bytes, memory, schema."""
ArrayDesc = tuple[int, str, tuple[int, ...], bool]
"""A large array value that travels as a memfd: k, dtype, shape, Fortran order."""


class Result(NamedTuple):
    """A parsed RESULT message (see the module docstring)."""

    seq: int
    k0: int
    n: int
    values: Payload
    errors: list[tuple[int, int, Any]]
    elapsed: Any
    final: bool
    writes: list[tuple[int, str]] | None
    rss: int
    commits: list[Commit] | None
    arrays: list[ArrayDesc] | None
    peak: int = 0
    hygiene: tuple[Any, ...] | None = None  # (notes, left) or (notes, left, remarks)


def parse_result(msg: Any) -> Result:
    """`msg` as a `Result`, or `ProtocolViolation` if it is not a well-formed one."""
    if type(msg) is not tuple or len(msg) != 14 or msg[0] != RESULT:
        raise ProtocolViolation(f"expected a result message, got {_describe(msg)}")
    _, seq, k0, n, values, errors, _elapsed, final, _writes, rss, commits, arrays, peak, hyg = msg
    if hyg is not None and not _is_notes(hyg):
        raise ProtocolViolation("a result message whose hygiene notes are not notes")
    if not all(type(v) is int for v in (seq, k0, n, rss, peak)):
        raise ProtocolViolation("a result message with counts that are not ints")
    if k0 < 0 or n < 0 or type(final) is not bool:
        raise ProtocolViolation("a result message with bad counts or flags")
    if not (type(values) is tuple and len(values) == 2 and type(values[1]) is list):
        raise ProtocolViolation("a result message whose values are not a payload")
    if type(values[0]) is not bytes and not _is_packed(values):
        raise ProtocolViolation("a result message whose values are not a payload")
    if errors:
        _check_errors(errors, n)
    if commits is not None:
        _check_entries(commits, "commit", lambda entry: _is_commit(entry, n))
    if arrays is not None:
        _check_entries(arrays, "array", lambda entry: _is_array(entry, n))
    return tuple.__new__(Result, msg[1:])  # skips the NamedTuple's __new__ (Python code)


def _is_notes(hygiene: Any) -> bool:
    """``(notes, left)`` or ``(notes, left, remarks)``: short lists of short strings,
    and a bool."""
    return (
        type(hygiene) is tuple
        and len(hygiene) in (2, 3)
        and type(hygiene[1]) is bool
        and all(_is_lines(part) for part in hygiene[:1] + hygiene[2:])
    )


def _is_lines(lines: Any) -> bool:
    return (
        type(lines) is list
        and len(lines) <= 64
        and all(type(line) is str and len(line) <= 1000 for line in lines)
    )


def split_result(result: Result, at: int) -> tuple[Result, Result]:
    """`result` as two: its positions before `at` and from `at` on (``0 < at < n``), for
    a parent that delivers a long report over several steps. Only the second is final
    and carries the memory reading; both keep the payload, already unpickled."""
    n = result.n
    times = cut_elapsed(result.elapsed, at, n)
    errors, writes = cut_entries(result.errors, at), cut_entries(result.writes, at)
    commits, arrays = cut_entries(result.commits, at), cut_entries(result.arrays, at)
    head = result._replace(
        n=at, errors=errors[0] or [], elapsed=times[0], final=False, writes=writes[0], rss=0,
        commits=commits[0], arrays=arrays[0], peak=0, hygiene=None,
    )  # fmt: skip
    tail = result._replace(
        k0=result.k0 + at, n=n - at, errors=errors[1] or [], elapsed=times[1],
        writes=writes[1], commits=commits[1], arrays=arrays[1],
    )  # fmt: skip
    return head, tail


def cut_entries(entries: list[Any] | None, at: int) -> tuple[Any, Any]:
    """A report's entries indexed by position (errors, writes, commits, arrays): those
    before `at`, and those from `at` on, re-indexed from 0."""
    if entries is None:
        return None, None
    return [e for e in entries if e[0] < at], [(e[0] - at, *e[1:]) for e in entries if e[0] >= at]


def cut_elapsed(elapsed: Any, at: int, n: int) -> tuple[Any, Any]:
    """A report's run times for its `n` positions (a list, a total, or None), cut at `at`;
    a total is shared in proportion."""
    if isinstance(elapsed, list):
        return elapsed[:at], elapsed[at:]
    if elapsed is None:
        return None, None
    return elapsed * at / n, elapsed * (n - at) / n


def _is_packed(payload: Any) -> bool:
    """A `Payload` as it arrives: its pickle in the message or beside it."""
    return (
        type(payload) is tuple
        and len(payload) == 2
        and type(payload[0]) in (bytes, memoryview)
        and type(payload[1]) is list
        and (not payload[1] or all(type(b) is memoryview for b in payload[1]))
    )


def is_ready(msg: Any) -> bool:
    """Is `msg` a well-formed READY?"""
    return (
        type(msg) is tuple and len(msg) == 4 and msg[0] == READY and type(msg[2]) is int
        and msg[3] in (0, 1)
    )  # fmt: skip


def is_init_failure(msg: Any) -> bool:
    """Is `msg` a well-formed INIT_FAILED?"""
    return (
        type(msg) is tuple
        and len(msg) == 2
        and msg[0] == INIT_FAILED
        and type(msg[1]) is tuple
        and _is_record(msg[1])
    )


def _check_errors(errors: Any, n: int) -> None:
    if type(errors) is not list:
        raise ProtocolViolation("a result message whose errors are not a list")
    for entry in errors:
        if type(entry) is not tuple or len(entry) != 3 or type(entry[0]) is not int:
            raise ProtocolViolation(f"a malformed error entry: {_describe(entry)}")
        k, kind = entry[0], entry[1]
        detail: Any = entry[2]
        expected = _DETAIL_KINDS.get(kind)
        in_range = k == n if kind == INTERRUPTED else 0 <= k < n
        if expected is None or type(detail) is not expected or not in_range:
            raise ProtocolViolation(f"a malformed error entry: {_describe(entry)}")
        if kind == RAISED and not _is_record(detail):
            raise ProtocolViolation("an exception record that is not one")
        if kind == TIMEOUT and not _is_timeout(detail):
            raise ProtocolViolation(f"a malformed timeout entry: {_describe(entry)}")


def _is_timeout(detail: tuple[Any, ...]) -> bool:
    """(seconds run, the stack where it stopped or None)."""
    return (
        len(detail) == 2
        and type(detail[0]) is float
        and (detail[1] is None or type(detail[1]) is str)
    )


def _check_entries(entries: Any, what: str, valid: Callable[[Any], bool]) -> None:
    """`entries` (the commits or arrays of a result) is a list and each one is `valid`."""
    if type(entries) is not list:
        raise ProtocolViolation(f"a result message whose {what}s are not a list")
    for entry in entries:
        if not valid(entry):
            raise ProtocolViolation(f"a malformed {what} entry: {_describe(entry)}")


def _is_commit(entry: Any, n: int) -> bool:
    return (
        _is_entry(entry, 6, n)
        and all(type(x) is int for x in entry[2:5])
        and entry[2] >= -1
        and entry[3] >= 0
        and (entry[5] is None or type(entry[5]) is bytes)
    )


MAX_ARRAY_DIMS = 64


def _is_array(entry: Any, n: int) -> bool:
    return (
        _is_entry(entry, 4, n)
        and len(entry[1]) < 64
        and type(entry[2]) is tuple
        and len(entry[2]) <= MAX_ARRAY_DIMS
        and all(type(d) is int and d >= 0 for d in entry[2])
        and type(entry[3]) is bool
    )


def _is_entry(entry: Any, size: int, n: int) -> bool:
    """A tuple of `size` fields about position ``entry[0] < n``, then a str."""
    return (
        type(entry) is tuple
        and len(entry) == size
        and type(entry[0]) is int
        and 0 <= entry[0] < n
        and type(entry[1]) is str
    )


def _is_record(detail: Any) -> bool:
    return (
        len(detail) == 4
        and (detail[0] is None or type(detail[0]) is bytes)
        and all(type(part) is str for part in detail[1:])
    )


def _describe(obj: Any) -> str:
    """What `obj` is, without calling any of its methods (it may be hostile)."""
    if type(obj) in (tuple, list):
        head = obj[0] if obj and type(obj[0]) is int else "..."
        return f"a {type(obj).__name__} of {len(obj)} starting with {head}"
    return f"a {type(obj).__name__}"


class ArrayRef(NamedTuple):
    """A shared array as it crosses the channel; the segment's fd travels beside it
    (SEGMENTS message). `mode`: "ro" read-only, "cow" private copy-on-write,
    "audit" copy-on-write with writes reported, "rw" shared writable (outputs)."""

    seg_id: int
    size: int
    dtype: str
    shape: tuple[int, ...]
    mode: str


class IpcRef(NamedTuple):
    """A pyarrow Table or RecordBatch as Arrow IPC in a segment, opened zero-copy."""

    seg_id: int
    size: int
    kind: str  # "table" | "batch"


class SinkRef(NamedTuple):
    """Where a worker writes: a table sink given in ``out=`` (`kind` "sink": fn gets a
    writer under its name) or the call's results store ("table" or "disk", for
    ``results=``). `place` is an `ashard._places.Place`; `format` "parquet", "arrow"
    or "pickle"; `schema` the sink's serialized schema, if it has one; `token` names
    this call's temporary files."""

    kind: str
    place: Any
    format: str
    schema: bytes | None
    token: str


class JobSpec(NamedTuple):
    """What a worker needs to run chunks of one job."""

    kind: int
    fn: Payload
    borrow: dict[str, Payload | ArrayRef | IpcRef | SinkRef] | None
    timeout: float | None
    seed: int | None
    layout: Any  # ashard.Shards for SHARDS jobs, else None
    sys_path: list[str]
    results: SinkRef | None = None
    peak: bool = False  # report each chunk's peak memory growth (`footprint="learn"`)
    concurrency: int = 1  # an async fn's shards in flight at once (`shard_concurrency`)


class Hello(NamedTuple):
    """HELLO: how the worker sets itself up before it answers READY."""

    sys_path: list[str]
    init: Payload | None
    max_frame: int
    memory_limit: int | None
    authkey: bytes | None
    hygiene: str = "check"  # "check" | "recycle" | "off" (`ashard._worker.hygiene`)
    otel_setup: str | None = None  # "pkg.module:function" installing a tracer provider
    worker_loop: str = "asyncio"  # the loop async shards run on: "asyncio" | "uvloop" | "trio"
    nice: int = 0  # steps of niceness to add to what the worker inherited from its parent


class RegisterJob(NamedTuple):
    """JOB: a job whose chunks will follow."""

    key: int
    spec: JobSpec


class RunChunk(NamedTuple):
    """RUN: positions ``first .. first+n-1`` of job `key`, answered as chunk `seq`;
    `attempts` per position (None: all first attempts); `items` packed, or None for a
    job without items."""

    key: int
    seq: int
    first: int
    n: int
    attempts: list[int] | None
    items: Payload | None
    trace: str | None  # the W3C traceparent of the caller's attempt span, if it traces


class CallFn(NamedTuple):
    """CALL: ``fn(*args, **kwargs)`` once, answered as chunk `seq`."""

    seq: int
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    timeout: float | None


class SharedCall(NamedTuple):
    """A CALL's function and arguments as one `Payload` of ``(fn, args, kwargs)``, its
    large arrays as `ArrayRef`s among the payload's buffers, mapped by the worker."""

    payload: Payload


class CancelJob(NamedTuple):
    """CANCEL: drop the queued chunks of job `key` (the running one gets SIGUSR1)."""

    key: int


class ForgetJob(NamedTuple):
    """FORGET: job `key` is over; free its function and borrowed objects."""

    key: int


class MarkOutput(NamedTuple):
    """MARK: write `token` to fds 1 and 2 (after what is buffered): the call after it
    starts there."""

    token: bytes


class CancelCall(NamedTuple):
    """UNCALL: call `seq` is not wanted: drop it if queued (answered as interrupted),
    interrupt it if it runs (the parent sends SIGUSR1 too); nothing if it is over."""

    seq: int


class RecallChunks(NamedTuple):
    """RECALL: the chunks of job `key` numbered `seq` or later that have not started
    are not to run here: each is answered as never run, in its turn (the parent runs
    them elsewhere). One that started runs and is answered as usual."""

    key: int
    seq: int


class AddSegments(NamedTuple):
    """SEGMENTS: shared-memory segments; their fds came with the frame, in this order."""

    seg_ids: list[int]


class DropSegments(NamedTuple):
    """DROP: close these segments."""

    seg_ids: list[int]


class Preload(NamedTuple):
    """PRELOAD: import these modules now, in turn with other orders. The parent sends it
    before it prepares a call that will need them (numpy, for borrowed arrays), so the
    import overlaps that work instead of following it. One that fails is left alone."""

    modules: list[str]


Order = (
    Hello | RegisterJob | RunChunk | CallFn | CancelJob | ForgetJob | AddSegments | DropSegments
    | MarkOutput | CancelCall | RecallChunks | Preload
)  # fmt: skip
"""A message from the parent, parsed (`parse_order`). The parent sends each as the plain
tuple ``(code, *fields)``: a record would pickle by its class, a cost on every message."""

_KINDS: list[tuple[int, type[Order]]] = [
    (HELLO, Hello), (JOB, RegisterJob), (RUN, RunChunk), (CALL, CallFn),
    (CANCEL, CancelJob), (FORGET, ForgetJob), (SEGMENTS, AddSegments), (DROP, DropSegments),
    (MARK, MarkOutput), (UNCALL, CancelCall), (RECALL, RecallChunks), (PRELOAD, Preload),
]  # fmt: skip
_ORDERS = {code: (kind, len(kind._fields) + 1) for code, kind in _KINDS}
"""Record and message length (the code, then the fields) of each kind, by code."""


def parse_order(msg: Any) -> Order:
    """`msg`, a message from the parent (``(code, *fields)``), as its record, or
    `ProtocolViolation` if it is none. The worker trusts its parent: this checks the
    kind and the number of fields, not each field."""
    found = _ORDERS.get(msg[0]) if type(msg) is tuple and msg and type(msg[0]) is int else None
    if found is None or len(msg) != found[1]:
        raise ProtocolViolation(f"expected a message from the parent, got {_describe(msg)}")
    return tuple.__new__(found[0], msg[1:])  # skips the NamedTuple's __new__ (Python code)

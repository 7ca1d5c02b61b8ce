"""Message kinds on the worker channel. Messages are tuples whose first field is one of
these codes; the comments give the rest of each tuple.

parent -> worker::

    HELLO   sys_path, init payload | None
    JOB     key, JobSpec                      register fn and borrow for a call
    RUN     key, seq, first, count, attempts | None, items | None
    CALL    seq, fn, args, kwargs, timeout    one-shot call, no job registration
    CANCEL  key                               drop queued chunks of a job (+ SIGUSR1)
    FORGET  key                               the job is over: free its fn and borrow
    SEGMENTS seg_ids                          shared-memory fds ride along (SCM_RIGHTS)
    DROP    seg_ids                           close those segments

The worker exits at end of stream: the parent closes its end to stop a worker.

worker -> parent::

    READY        pid, private rss after init (bytes)
    INIT_FAILED  exception record
    RESULT       seq, k0, values, errors, elapsed, final, writes, rss (final: bytes)

`errors` in RESULT is a list of ``(k, kind, detail)`` for chunk positions k: RAISED
(detail: exception record), TIMEOUT (detail: seconds run) or INTERRUPTED (positions
from k on never ran; the chunk ends there).
"""

from __future__ import annotations

import signal
from typing import Any, NamedTuple

HELLO, JOB, RUN, CALL, CANCEL, FORGET, SEGMENTS, DROP = range(8)
READY, INIT_FAILED, RESULT = range(100, 103)

RAISED, TIMEOUT, INTERRUPTED = range(3)

ITEMS, SHARDS = range(2)

INTERRUPT_SIGNAL = signal.SIGUSR1
"""Sent by the parent to stop the shard a worker is running (cancellation)."""


class Payload(NamedTuple):
    """User objects pickled once in the parent, shipped as-is to every worker."""

    data: bytes
    buffers: list[Any]


class ArrayRef(NamedTuple):
    """A shared array as it crosses the channel; the segment's fd travels beside it
    (SEGMENTS message). `mode`: "ro" read-only, "cow" private copy-on-write,
    "audit" copy-on-write with writes reported, "rw" shared writable (outputs)."""

    seg_id: int
    size: int
    dtype: str
    shape: tuple[int, ...]
    mode: str


class TableRef(NamedTuple):
    """A pyarrow Table or RecordBatch as Arrow IPC in a segment, opened zero-copy."""

    seg_id: int
    size: int
    kind: str  # "table" | "batch"


class JobSpec(NamedTuple):
    """What a worker needs to run chunks of one job."""

    kind: int
    fn: Payload
    borrow: dict[str, Payload | ArrayRef | TableRef] | None
    timeout: float | None
    seed: int | None
    layout: Any  # ashard.Shards for SHARDS jobs, else None
    sys_path: list[str]

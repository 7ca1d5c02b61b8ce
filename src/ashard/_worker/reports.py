"""What the worker sends to its parent: READY, INIT_FAILED and the RESULT messages that
report a chunk's finished positions (see `ashard._protocol`).

Values travel packed on their own. A value that cannot be pickled, or a report over the
parent's frame limit, fails its positions with an error that says so and the worker
goes on; a large array leaves through a sealed memfd (`large_results`), not the socket.

A shard stopped at its timeout may leave threads running that it started (a thread
cannot be stopped: `asyncio.to_thread`, an executor), and under `out=` buffers they can
still write the job's shared memory. Its report is then held until no thread but
ashard's own runs (`fence`): the parent runs the shard again only once the report came,
or once it killed this worker for its silence past the timeout and reaped it, so no
late write lands after the retry's, or after the call returned. The same holds for a
shard the caller interrupted (`hold`: the parent kills a worker that does not answer a
cancellation within its grace).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ashard._framing import DEFAULT_MAX_FRAME, encode, frame_size, send_frames
from ashard._protocol import (
    INTERRUPTED,
    RAISED,
    RESULT,
    TIMEOUT,
    ArrayDesc,
    Commit,
    Payload,
    cut_elapsed,
    cut_entries,
)
from ashard._serialize import dumps, encode_exception, pack, show_error
from ashard._worker.large_results import (
    RESULT_SEGMENT_BYTES,
    close_all,
    oob_bytes,
    segment_results,
)
from ashard._worker.process import peak_growth, private_rss

__all__ = ["PIECE_BYTES", "Reporter"]

PIECE_BYTES = 32 << 10
"""Many values are reported in pieces of about this size, pickled: the parent reads and
unpickles each in a fraction of a millisecond, between steps of its event loop."""
_MIN_PIECE = 256


class Reporter:
    """Sends to the parent over `sock`. `max_frame` is the parent's frame limit (from
    HELLO); `with_rss`: a chunk's final report carries the worker's private memory (a
    call's does not: it costs latency)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.max_frame = DEFAULT_MAX_FRAME
        self.with_rss = True
        self.peak_from: int | None = None  # the chunk's starting memory, when it measures
        self.notes: list[str] = []  # for the call's `Diagnostics.notes`, sent with a final report
        # the hygiene check of task `seq`, made as its final report goes (`Hygiene.end`)
        self.on_final: Callable[[int], tuple[list[str], bool] | None] | None = None
        self._item_bytes: float | None = None  # a value's size, pickled, as learned
        self.fence = False  # the job writes shared memory in place (out= buffers)
        # threads known to run nothing now (the worker loop's executor, once it exists)
        self.idle_threads: Callable[[], set[threading.Thread]] = set

    def send(self, msg: Any, fds: list[int] | None = None) -> None:
        send_frames(self.sock, encode(msg), fds or [])

    def result(
        self,
        seq: int,
        k0: int,
        values: list[Any],
        errors: list[Any],
        elapsed: Any,
        final: bool,
        writes: list[tuple[int, str]] | None = None,
        commits: list[Commit] | None = None,
    ) -> None:
        """Report positions ``k0 .. k0+len(values)-1`` of chunk `seq`: in pieces of about
        `PIECE_BYTES` each, pickled, when there are many values. Under `fence`, the
        first position that timed out, and those after it, wait while threads run on
        (see the module docstring); the positions before it go first."""
        n = len(values)
        if self.fence and errors:
            at = next((e[0] for e in errors if e[1] == TIMEOUT), None)
            if at is not None and self._threads_run_on():
                if at:
                    head, (errors, elapsed, writes, commits) = _cut(
                        at, n, errors, elapsed, writes, commits
                    )
                    self.result(seq, k0, values[:at], head[0], head[1], False, head[2], head[3])
                    k0, values, n = k0 + at, values[at:], n - at
                self._wait_for_threads()
        step = n if writes or commits else self._piece(values)
        if step >= n:
            self._send_result(seq, k0, values, errors, elapsed, final, writes, commits)
            return
        for lo in range(0, n, step):
            if lo + step < n:
                part_errors, errors = cut_entries(errors, step)
                part_elapsed, elapsed = cut_elapsed(elapsed, step, n - lo)
                self._send_result(seq, k0 + lo, values[lo : lo + step], part_errors, part_elapsed,
                                  False)  # fmt: skip
            else:
                self._send_result(seq, k0 + lo, values[lo:], errors, elapsed, final)

    def _piece(self, values: list[Any]) -> int:
        """How many values go in one report: about `PIECE_BYTES`' worth, pickled, as
        learned from the reports sent so far (a sample of these values, at first)."""
        if len(values) <= _MIN_PIECE:
            return len(values)
        if self._item_bytes is None:
            try:
                self._learn(_MIN_PIECE, pack(values[:_MIN_PIECE]))
            except BaseException:  # user pickling code: `_send_result` says what failed
                return len(values)
        assert self._item_bytes is not None
        return max(_MIN_PIECE, int(PIECE_BYTES / self._item_bytes))

    def _learn(self, n: int, payload: Payload) -> None:
        data = payload[0]
        if n and payload[1] == [] and isinstance(data, bytes):
            sample = max(1.0, len(data) / n)
            seen = self._item_bytes
            self._item_bytes = sample if seen is None else 0.5 * (seen + sample)

    def _send_result(self, seq: int, k0: int, values: list[Any], errors: list[Any], elapsed: Any,
                     final: bool, writes: list[tuple[int, str]] | None = None,
                     commits: list[Commit] | None = None) -> None:  # fmt: skip
        """One RESULT message: `result`'s arguments, for one piece. Values too large
        together for one message go in halves, so that only a value too large on its
        own fails (not its neighbours in the chunk)."""
        try:
            payload = pack(values)
        except BaseException:  # user pickling code: SystemExit is an outcome, not the end
            values, errors = _drop_unpicklable(values, errors)
            payload = pack(values)
        self._learn(len(values), payload)
        n = len(values)
        if n > 1 and _in_message(payload) > self.max_frame:
            half = n // 2
            head, (errors, elapsed, writes, commits) = _cut(
                half, n, errors, elapsed, writes, commits
            )
            self._send_result(seq, k0, values[:half], head[0], head[1], False, head[2], head[3])
            self._send_result(seq, k0 + half, values[half:], errors, elapsed, final, writes,
                              commits)  # fmt: skip
            return
        hygiene: tuple[Any, ...] | None = None
        if final and self.on_final is not None:
            hygiene = self.on_final(seq)
        if final and self.notes:
            notes, left = hygiene if hygiene is not None else ([], False)
            hygiene, self.notes = (notes, left, self.notes[:16]), []
        rss = private_rss() if final and self.with_rss else 0
        peak = 0
        if final and self.peak_from is not None:
            peak, self.peak_from = peak_growth(self.peak_from), None
        arrays: list[ArrayDesc] | None = None
        fds: list[int] = []
        if payload[1] and oob_bytes(payload) >= RESULT_SEGMENT_BYTES:
            values, arrays, fds = segment_results(values)
            if arrays:
                payload = pack(values)
        msg = (RESULT, seq, k0, n, payload, errors, elapsed, final, writes, rss, commits, arrays,
               peak, hygiene)  # fmt: skip
        parts = encode(msg)
        size = len(parts[0]) + len(parts[1]) if len(parts) == 2 else frame_size(parts)
        if size > self.max_frame:
            values, errors = _too_large(values, errors, frame_size(parts), self.max_frame)
            payload = pack(values)
            msg = (RESULT, seq, k0, n, payload, errors, elapsed, final, writes, rss, commits,
                   None, peak, hygiene)  # fmt: skip
            parts = encode(msg)
            close_all(fds)
            fds = []
        try:
            send_frames(self.sock, parts, fds)
        finally:
            close_all(fds)

    def hold(self) -> None:
        """The caller interrupted the task under way: under `fence`, wait while threads
        it may have started run on (the parent, cancelling, kills this worker if they
        do not end within its grace), so that none writes after the call returned."""
        if self.fence and self._threads_run_on():
            self._wait_for_threads()

    def _threads_run_on(self) -> bool:
        return threading.active_count() > 1 and bool(_others(self.idle_threads()))

    def _wait_for_threads(self) -> None:
        """Until every thread but ashard's own has ended or is idle: if one never is (a
        pool thread of the user's, a thread blocked for good), the parent kills this
        worker, silent past the shard's timeout or the cancellation's grace, which is
        what this waits for then. A signal's exception does not end the wait."""
        while _others(self.idle_threads()):  # polled: a thread started outside
            with contextlib.suppress(BaseException):  # `threading` cannot be joined
                time.sleep(0.01)

    def fail_all(self, seq: int, count: int, exc: BaseException) -> None:
        """Positions 0..count-1 of chunk `seq` each raised `exc`."""
        record = encode_exception(exc)
        errors = [(k, RAISED, record) for k in range(count)]
        self.result(seq, 0, [None] * count, errors, [0.0] * count, True)

    def never_ran(self, seq: int) -> None:
        """Chunk `seq` ends before its first position ran: the parent queues it again."""
        self.result(seq, 0, [], [(0, INTERRUPTED, None)], None, True)


_Entries = tuple[list[Any], Any, list[tuple[int, str]] | None, list[Commit] | None]


def _cut(
    at: int,
    n: int,
    errors: list[Any],
    elapsed: Any,
    writes: list[tuple[int, str]] | None,
    commits: list[Commit] | None,
) -> tuple[_Entries, _Entries]:
    """A report's errors, run times, writes and commits for its `n` positions, cut at
    position `at`: those before it, and those from it on (re-indexed from 0)."""
    head_errors, errors = cut_entries(errors, at)
    head_elapsed, elapsed = cut_elapsed(elapsed, at, n)
    head_writes, writes = cut_entries(writes, at)
    head_commits, commits = cut_entries(commits, at)
    return (head_errors, head_elapsed, head_writes, head_commits), (
        errors,
        elapsed,
        writes,
        commits,
    )


def _others(idle: set[threading.Thread]) -> list[threading.Thread]:
    """The threads running here that are not ashard's own (the main one, its memory
    watch) nor known to be `idle`: the user's, busy or maybe busy."""
    main = threading.main_thread()
    return [
        t
        for t in threading.enumerate()
        if t is not main and not t.name.startswith("ashard-") and t not in idle and t.is_alive()
    ]


def _in_message(payload: Payload) -> int:
    """About the bytes `payload` adds to its message: what is not large enough to leave
    through a segment of its own (`segment_results`)."""
    size = memoryview(payload[0]).nbytes
    for buffer in payload[1]:
        nbytes = memoryview(buffer).nbytes
        if nbytes < RESULT_SEGMENT_BYTES:
            size += nbytes
    return size


def _too_large(
    values: list[Any], errors: list[Any], size: int, limit: int
) -> tuple[list[Any], list[Any]]:
    """The results of one report, over the parent's frame limit: each fails, saying so."""
    failed = {e[0] for e in errors}
    exc = ValueError(
        f"the result is too large to send back: {size:,} bytes in one message, over the "
        f"limit of {limit:,} (Pool(max_message=...))"
    )
    record = encode_exception(exc)
    extra = [(k, RAISED, record) for k in range(len(values)) if k not in failed]
    return [None] * len(values), sorted(errors + extra, key=lambda e: e[0])


def _drop_unpicklable(values: list[Any], errors: list[Any]) -> tuple[list[Any], list[Any]]:
    """Replace results that cannot be pickled by errors that say so. A `SystemExit` or
    `KeyboardInterrupt` raised while pickling one is that result's outcome as it is
    (as `ProcessPoolExecutor` sends it back), and the worker goes on."""
    out = list(values)
    errs = list(errors)
    for k, value in enumerate(values):
        try:
            dumps(value, [])
        except BaseException as exc:
            out[k] = None
            error: BaseException = exc
            if isinstance(exc, Exception):
                error = TypeError(
                    f"the result of fn (a {type(value).__module__}.{type(value).__qualname__}) "
                    f"cannot be sent back to the parent: it could not be pickled "
                    f"({show_error(exc)})"
                )
                error.__cause__ = exc
            errs.append((k, RAISED, encode_exception(error)))
    errs.sort(key=lambda e: e[0])
    return out, errs

"""Bookkeeping of one call: which positions are queued, in flight, resolved.

A position is a shard id (`shard_map`) or an item index (`map`). Work leaves as
`Chunk`s of consecutive positions (retries leave alone, as chunks of one). Invariants:

* every position is resolved exactly once: a value, or a permanent failure;
* a position is in at most one place: queued, in one in-flight chunk, or resolved;
* results come back per chunk in order, so a chunk's undelivered positions are always
  its tail ``first + done ..``.

When a worker dies, the chunk it was running is the oldest it holds. Its undelivered
positions are charged an attempt if the culprit is known (a chunk of one, or a
timeout, where the worker reports each shard as it ends); otherwise they are retried
one by one, uncharged, so the next crash names the culprit and innocent shards are
never charged for it. Chunks queued behind it never started and go back uncharged.

A job knows nothing of processes: a backend (`ashard._backend`) takes its chunks with
`take_chunk`, reports what came back with `deliver` and what was lost with
`worker_lost`, and tells it which workers ran its shards with `ran_on`.

What is not the ledger has its own owner, which the job asks: a `ChunkSizer`
(`ashard._sizing`) how large a chunk is and how many a worker holds; the stream buffer
or reducer (`ashard._consumers`) where a value goes when the call does not keep it,
and how many more positions may be in flight; `Outputs` (`ashard._outputs`) which
committed files are kept; `Positions` (`ashard._positions`) what a position's items
and `Shard` are; `CallRecord` (`ashard._record`) the runs and workers the diagnostics
tell of. A backend sees the job only as `ashard._backend.JobPort`.
"""

from __future__ import annotations

import heapq
import sys
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, replace
from itertools import repeat
from logging import WARNING
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from ashard._backend import Changes, Chunk, JobWork, WorkerInfo
from ashard._budget import MemoryLog
from ashard._consumers import UNBOUNDED
from ashard._health import PROFILES
from ashard._log import worker_event
from ashard._options import CallOptions
from ashard._outcomes import (
    CRASHED,
    Loss,
    failure,
    output_failure,
    unreadable_result,
    unsendable_items,
)
from ashard._outputs import LOCAL, Outputs
from ashard._positions import ItemPositions, Positions, ShardPositions, make_old
from ashard._progress import Progress
from ashard._protocol import (
    INTERRUPTED,
    ITEMS,
    RAISED,
    SHARDS,
    TIMEOUT,
    Payload,
    Result,
)
from ashard._record import CallRecord
from ashard._rules import RETRY, SKIP, ErrorRules
from ashard._serialize import undrawn
from ashard._sizing import ChunkSizer
from ashard._tracing import CallTrace
from ashard.errors import ShardError
from ashard.results import Diagnostics, ShardDone, ShardResult
from ashard.shards import Shard, Shards

if TYPE_CHECKING:
    from ashard._consumers import Reducer, StreamBuffer
    from ashard.tables import ResultStore

_WHY = {CRASHED: "its worker died", TIMEOUT: "it ran past its timeout", RAISED: "fn raised"}
_OUTCOMES = {RAISED: "error", TIMEOUT: "timeout", INTERRUPTED: "cancelled"}
"""A report's error kinds as attempt outcomes (`ashard._tracing`)."""
OLD_AT = 1 << 14
"""Slots from which a results list is moved out of the collector's young generations."""
SLOTS_STEP = 1 << 16
"""A longer results list is made a piece of this many slots per loop step."""


class Job(Changes):
    """One `shard_map`, `shard_stream` or `map` call: what to run, and where each of
    its positions stands. Made by `Job.of_shards` or `Job.of_items`."""

    def __init__(
        self,
        *,
        kind: int,
        fn: Payload,
        opts: CallOptions,
        borrow: dict[str, Any],
        out: dict[str, Any],
        layout: Shards | None,
        sequence: Sequence[Any] | None,
        items: Iterable[Any] | None,
        total: int | None,
        stream: StreamBuffer | None,
        store: ResultStore | None = None,
        reducer: Reducer | None = None,
    ) -> None:
        self.kind = kind
        self.opts = opts
        self._what = JobWork(kind, fn, opts, layout, list(sys.path), borrow, out, None)
        self.noun = "shard" if kind == SHARDS else "item"
        self.positions: Positions
        if layout is not None:
            self.positions = ShardPositions(layout, sequence, opts.seed)
        else:
            assert items is not None
            self.positions = ItemPositions(items)
        self.total = total
        self.stream = stream
        self.progress: Progress | None = None  # made by `prepare`
        self.reducer = reducer
        # a stream hands values to its consumer and keeps none of them; a reduce
        # combines them
        keep = kind == SHARDS and stream is None and reducer is None
        self._resolved = bytearray()  # a byte per position taken (or made ahead): 1 once resolved
        self.results: list[Any] = []
        self._due: _Due | None = None  # those still to make (`prepare`)
        if kind == SHARDS:
            self._make_results(_Due(total or 0, None, (), keep))
        elif type(items) in (range, list) and total:  # a length that holds: made ahead,
            self._make_results(_Due(total, None, (), True))  # never grown (a copy each time)
        self.n_resolved = 0
        self.runs: dict[int, int] = {}  # position -> its latest run, if past the first
        self.rules = ErrorRules(opts.max_retries, opts.retry_errors, opts.on_error)
        self.skipped: dict[int, ShardError] = {}  # resolved as None by an on_error "skip"
        self._unrun: set[int] = set()  # queued again without having run
        self.failures: dict[int, ShardError] = {}
        self._retry: deque[int] = deque()
        self._delayed: list[tuple[float, int]] = []  # (due, position): a backoff's wait
        self._held_back: deque[Chunk] = deque()  # taken, then refused room (`put_back`)
        self.inflight_shards = 0
        self.aborted = False
        self.fatal: BaseException | None = None
        self.max_held = opts.max_held_bytes if opts.max_held_bytes is not None else 1 << 62
        self.held_bytes = 0  # items of chunks in flight, pickled (`sent`)
        self.record = CallRecord(self.runs)
        self.sizer = ChunkSizer(
            opts.chunk_size, PROFILES[opts.profile].chunk, opts.shard_concurrency
        )
        self.outputs = Outputs(out, store)
        self.given: Any = None  # a shard_map's arguments, for `retry_failed` (`ashard._calls`)
        self.api = "map" if kind != SHARDS else "shard_map"  # the call's name, for its span
        self.trace: CallTrace | None = None  # its spans, when the caller traces

    @classmethod
    def of_shards(
        cls,
        fn: Payload,
        opts: CallOptions,
        layout: Shards,
        sequence: Sequence[Any] | None,
        borrow: dict[str, Any],
        out: dict[str, Any],
        stream: StreamBuffer | None = None,
        store: ResultStore | None = None,
        reducer: Reducer | None = None,
    ) -> Job:
        """A `shard_map`, `shard_stream` (`stream`) or `shard_reduce` (`reducer`) over
        `layout` (`sequence`: its items); `store` takes the values under
        ``results="table"`` / ``"disk"``."""
        return cls(
            kind=SHARDS, fn=fn, opts=opts, borrow=borrow, out=out, layout=layout,
            sequence=sequence, items=None, total=len(layout), stream=stream, store=store,
            reducer=reducer,
        )  # fmt: skip

    def resume(
        self,
        todo: Sequence[int],
        earlier: Sequence[Any],
        failures: Mapping[int, ShardError],
        skipped: Mapping[int, ShardError],
    ) -> None:
        """Run only positions `todo` (sorted) of a `shard_map` that ran before
        (`retry_failed`): every other position keeps what that run resolved it to - its
        value (or its stored file's ref) in `earlier`, its failure or its skip."""
        assert self.kind == SHARDS and self.stream is None and self.reducer is None
        assert isinstance(self.positions, ShardPositions) and self.total is not None
        self._make_results(_Due(self.total, earlier, todo, True))
        self.n_resolved = self.total - len(todo)
        rerun = set(todo)
        self.failures = {p: e for p, e in failures.items() if p not in rerun}
        self.skipped = {p: e for p, e in skipped.items() if p not in rerun}
        self.positions.restrict(todo)
        self.outputs.again = True

    @classmethod
    def of_items(
        cls,
        fn: Payload,
        opts: CallOptions,
        items: Iterable[Any],
        borrow: dict[str, Any],
    ) -> Job:
        """A `map` over `items`, read lazily (the total is known if it has a length)."""
        total = len(items) if isinstance(items, Sized) else None
        return cls(
            kind=ITEMS, fn=fn, opts=opts, borrow=borrow, out={}, layout=None, sequence=None,
            items=items, total=total, stream=None,
        )  # fmt: skip

    def work(self) -> JobWork:
        """What to run (once the call's outputs are open: the results store's spec
        carries the call's token)."""
        store = self.outputs.store
        if store is None:
            return self._what
        return replace(self._what, results=store.spec())

    # -- what a backend asks of its sizes (`ChunkSizer`) ---------------------------------

    def served_by(self, workers: int, latency: float | None = None) -> None:
        """`workers` will run its chunks, each reaching its worker `latency` seconds
        after it is taken (None: a worker on this machine)."""
        self.sizer.served_by(workers, latency)

    def window(self) -> int:
        """How many chunks a worker should hold at once."""
        return self.sizer.window()

    # -- state ------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        if self.kind == SHARDS:
            return self.n_resolved == self.total
        return (
            self.positions.exhausted
            and not self._retry
            and not self._delayed
            and self.n_resolved == self.next_pos
        )

    @property
    def next_pos(self) -> int:
        """How many positions have been taken (all of them, once the job is over)."""
        return self.positions.next_pos

    @property
    def over(self) -> bool:
        """Nothing more will be dispatched: finished, aborted or failed."""
        return self.finished or self.aborted or self.fatal is not None

    async def prepare(self) -> None:
        """Before the call runs, what would hold the caller's loop if done in one step:
        a list given as the input is copied, a piece per loop step, and the progress
        bar's modules (tqdm, IPython's display) are imported in a thread."""
        await self.positions.copy_input()
        if self._due is not None:
            due, self._due = self._due, None
            self._resolved, self.results = await due.made()
        if self.opts.progress and self.progress is None:
            tqdm = await anyio.to_thread.run_sync(Progress.load)
            self.progress = Progress(self.total, f"{self.noun}s", tqdm)

    def _make_results(self, due: _Due) -> None:
        """Its results list and its list of resolved positions: made now if short, else
        by `prepare`, a piece per loop step (5M slots at once hold the loop 25 ms)."""
        if due.n > SLOTS_STEP or len(due.todo) > SLOTS_STEP:
            self._due = due
        else:
            self._resolved, self.results = due.made_now()

    async def let_go(self) -> None:
        """The call ran to its end: its copy of the input goes (`Positions.let_go`),
        unless `retry_failed` may run some of its shards again."""
        if self.kind == SHARDS and (self.failures or self.skipped or self._resolved.find(0) != -1):
            return
        await self.positions.let_go()

    def close(self) -> None:
        """The call is over: close its progress display."""
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    def abort(self, exc: BaseException | None = None) -> None:
        """Stop dispatching; `exc` (if given) is raised to the caller."""
        self.aborted = True
        if exc is not None and self.fatal is None:
            self.fatal = exc
        self.notify()

    def has_work(self) -> bool:
        """Could a chunk be dispatched now? Not while the caller holds `max_held_bytes`
        of items in flight or values waiting (once some are, they will be let go)."""
        if self.aborted:
            return False
        if self._held_back:
            return True
        if self._room() <= 0:
            return False
        if self.held_bytes >= self.max_held:
            return False
        if self._delayed:
            self._release_due()
        if self._retry:
            return True
        return not self.positions.exhausted

    def _release_due(self) -> bool:
        """Move the retries whose backoff is over to the queue; did any?"""
        delayed, now, moved = self._delayed, time.monotonic(), False
        while delayed and delayed[0][0] <= now:
            self._retry.append(heapq.heappop(delayed)[1])
            moved = True
        return moved

    async def wait_change(self) -> None:
        """Until something changes, or the next backoff ends (a retry comes due: the
        job's own timer, so a waiting shard holds no worker and no task)."""
        if not self._delayed:
            await super().wait_change()
            return
        with anyio.move_on_after(max(0.0, self._delayed[0][0] - time.monotonic())):
            await super().wait_change()
        if self._release_due():
            self.notify()

    def _room(self) -> int:
        """How many more positions may be in flight: as many as its consumer, if it has
        one, can take without passing its bounds."""
        held = self.stream if self.stream is not None else self.reducer
        if held is None:
            return UNBOUNDED
        return held.room(self.inflight_shards, self.max_held)

    # -- dispatch ---------------------------------------------------------------------

    def take_chunk(self, seq: int, limit: int | None = None) -> Chunk | None:
        """The next chunk to send (at most `limit` positions), or None."""
        if not self.has_work():
            return None
        if self._held_back:
            first = self._held_back[0]
            return self._held_back.popleft() if limit is None or first.count <= limit else None
        if self._retry:
            pos = self._retry.popleft()
            items = [self.positions.item_at(pos)] if self.positions.has_items else None
            chunk = Chunk(seq, pos, 1, [self._next_run(pos)], items)
        else:
            remaining = self.positions.left
            wanted = self.sizer.next_size(remaining, self.max_held, self.record.now())
            size = min(wanted, self._room())
            new = self._take_new(seq, size if limit is None else min(size, limit))
            if new is None:
                return None
            chunk = new
        self.inflight_shards += chunk.count
        self.record.chunks += 1
        chunk.heard = self.record.now()
        if self.trace is not None:
            attempt = chunk.attempts[0] if chunk.attempts else 1
            chunk.trace = self.trace.attempt(chunk, chunk.first, chunk.count, attempt, self.noun)
        if self._what.opts.footprint is not None:
            try:
                chunk.footprint = self._footprint(chunk)
            except Exception as exc:  # the caller's footprint() failed: the call does
                self.abort(exc)
                return None
        if chunk.items is not None:  # held from now: counted as estimated until `sent`
            chunk.nbytes = self.sizer.bytes_of(chunk.count)
            self.held_bytes += chunk.nbytes
        return chunk

    def put_back(self, chunk: Chunk) -> None:
        """`chunk`, just taken, found no room in the memory budget: it goes out first
        once there is."""
        self._held_back.appendleft(chunk)

    def _footprint(self, chunk: Chunk) -> int | None:
        """The bytes the largest shard of `chunk` may use (its shards run one at a time),
        as `footprint=` says; None until "learn" has learned."""
        given = self._what.opts.footprint
        memory = self.record.memory
        if isinstance(given, int) or given is None:
            memory.footprint_per_shard = given
            return given
        if given == "learn":
            return memory.footprint_per_shard
        assert callable(given)
        biggest = 0
        for k in range(chunk.count):
            pos = chunk.first + k
            if self.kind == SHARDS:
                item = None if chunk.items is None else chunk.items[k]
                subject = self.positions.shard_at(pos, 1, item)
            else:
                assert chunk.items is not None
                subject = undrawn(chunk.items[k])
            value = given(subject)
            if type(value) is not int or value < 0:
                raise TypeError(
                    f"footprint must give a number of bytes (an int >= 0) for each "
                    f"{self.noun}, got {value!r} for {self.noun} {pos}"
                )
            biggest = max(biggest, value)
        memory.footprint_per_shard = max(memory.footprint_per_shard or 0, biggest)
        return biggest

    def _next_run(self, pos: int) -> int:
        """The number of the run `pos` is about to have (`Shard.attempt`)."""
        if pos in self._unrun:
            self._unrun.discard(pos)
            return self.runs.get(pos, 1)
        run = self.runs.get(pos, 1) + 1
        self.runs[pos] = run
        self.record.retries += 1
        return run

    def _take_new(self, seq: int, size: int) -> Chunk | None:
        first = self.next_pos
        try:
            count, items = self.positions.take(size)
        except Exception as exc:  # the caller's iterable raised: that is the call's error
            self.abort(exc)
            return None
        if self.kind != SHARDS:
            if count < size:
                self.notify()  # the end is known now
            if not count:
                return None
            if len(self._resolved) < first + count:  # not made ahead (`_make_results`)
                if len(self.results) < OLD_AT <= len(self.results) + count:
                    make_old(self.results)
                self.results.extend(repeat(None, count))
                self._resolved.extend(bytes(count))
        return Chunk(seq, first, count, None, items)

    # -- outcomes ---------------------------------------------------------------------

    def deliver(self, chunk: Chunk, report: Result, values: list[Any], pid: int) -> None:
        """Record what worker `pid` reported for `chunk` (`report`, whose values are
        `values`, unpickled): positions ``k0 ..`` of it, their values, errors and run
        times, the files they committed, and (`final`) whether the chunk is over."""
        k0, errors, elapsed = report.k0, report.errors, report.elapsed
        commits, writes = report.commits, report.writes
        n = len(values)
        base = chunk.first + k0
        if commits:
            values, errors = self.outputs.keep(base, values, errors, commits)
        busy = self.record.reported(chunk, base, n, errors, elapsed, pid)
        if writes:
            self.record.cow_writes.update((base + k, name) for k, name in writes)
        self.inflight_shards -= n
        chunk.done = k0 + n
        if elapsed is not None:
            self.sizer.learn(n, busy)
        cap = self.record.memory.cap
        if report.final and report.rss and cap:
            self.sizer.pressed(report.rss / cap)
        if not errors:
            self._store(base, values, chunk, k0, elapsed, pid)
        else:
            self._store_mixed(base, values, errors, chunk, k0, elapsed, pid)
        if report.final and chunk.done < chunk.count:  # the worker stopped early
            self._requeue_rest(chunk, chunk.done)
        if report.hygiene is not None:
            self._hygiene(chunk, report.hygiene)
        if self.trace is not None:
            self._traced(chunk, report, pid)
        self._let_go(chunk)
        self.notify()

    def _traced(self, chunk: Chunk, report: Result, pid: int) -> None:
        """What `report` says of `chunk`'s attempt span."""
        assert self.trace is not None
        for _, kind, _ in report.errors:
            if kind not in (RAISED, TIMEOUT):  # those are told by `_charge`, after their rule
                self.trace.saw(chunk, _OUTCOMES.get(kind, "error"))
        if report.final:
            self.trace.ended(chunk, pid)

    def _hygiene(self, chunk: Chunk, hygiene: tuple[Any, ...]) -> None:
        """What `chunk`'s shards changed in their worker (noted under its first), and
        the worker's remarks on them, for `Diagnostics.notes`."""
        notes = hygiene[0]
        if len(hygiene) > 2:
            self.record.notes.extend(hygiene[2])
        if not notes:
            return
        last = chunk.first + max(chunk.done, 1) - 1
        where = "" if last == chunk.first else f"in {self.noun}s {chunk.first}-{last}: "
        said = self.record.hygiene.get(chunk.first, ())
        self.record.hygiene[chunk.first] = said + tuple(where + note for note in notes)

    def _run_of(self, pos: int) -> int:
        return self.runs.get(pos, 1)

    def deliver_unreadable(self, chunk: Chunk, report: Result, pid: int, exc: Exception) -> None:
        """Worker `pid` reported positions of `chunk` whose values, pickled there, do not
        unpickle here (`exc`). A lone position fails with `ShardFailed`; several run
        again one by one, uncharged, so that the failure names the position."""
        n, k0 = report.n, report.k0
        base = chunk.first + k0
        self.inflight_shards -= n
        chunk.done = k0 + n
        self.record.heard_from(pid)
        by_k = {e[0]: e for e in report.errors}
        for k in range(n):
            pos, err = base + k, by_k.get(k)
            if err is not None:
                self._charge(pos, chunk, k0 + k, err[1], err[2], pid)
            elif n == 1:
                shard = self.shard_at(pos, chunk, k0 + k)
                error = unreadable_result(f"{self.noun} {pos}", shard, shard.attempt, exc)
                self._fail(pos, error, chunk, k0 + k, pid)
            elif not self.aborted:
                self._push_retry(pos, chunk, k0 + k)  # it ran: its next run counts
        if report.final and chunk.done < chunk.count:
            self._requeue_rest(chunk, chunk.done)
        if report.hygiene is not None:
            self._hygiene(chunk, report.hygiene)
        if self.trace is not None and report.final:
            self.trace.ended(chunk, pid, "error")
        self._let_go(chunk)
        self.notify()

    def unsendable(self, chunk: Chunk, exc: Exception) -> None:
        """`chunk` was taken but its items cannot be pickled (`exc`): a lone position
        fails, never having run; several are queued again one by one, to name it."""
        if chunk.count > 1:
            self._requeue_rest(chunk, 0)
        else:
            self.inflight_shards -= 1
            chunk.done = 1
            error = unsendable_items(
                f"{self.noun} {chunk.first}", self.shard_at(chunk.first, chunk), exc
            )
            self._fail(chunk.first, error, chunk, 0, None)
        if self.trace is not None:
            self.trace.ended(chunk, None, "error")
        self.notify()

    def _store(
        self, base: int, values: list[Any], chunk: Chunk, k0: int, elapsed: Any, pid: int
    ) -> None:
        n = len(values)
        end = base + n
        if self._resolved.find(1, base, end) != -1:
            raise RuntimeError(f"ashard internal error: {self.noun} result delivered twice")
        self._resolved[base:end] = b"\x01" * n
        self.n_resolved += n
        if self.progress is not None:
            self.progress.update(n)
        if self.stream is None:
            if self.reducer is None:
                self.results[base:end] = values
            elif not self.aborted:
                try:
                    self.reducer.push(base, values)
                except Exception as exc:  # combine raised: the call's error
                    self.abort(exc)
            return
        for k, value in enumerate(values):
            self._emit(base + k, value, None, chunk, k0 + k, elapsed, k, pid)

    def _store_mixed(
        self,
        base: int,
        values: list[Any],
        errors: list[Any],
        chunk: Chunk,
        k0: int,
        elapsed: Any,
        pid: int,
    ) -> None:
        by_k = {e[0]: e for e in errors}
        for k, value in enumerate(values):
            err = by_k.get(k)
            if err is None:
                self._store(base + k, [value], chunk, k0 + k, _pick(elapsed, k), pid)
            elif err[1] == RAISED:
                self._charge(base + k, chunk, k0 + k, RAISED, err[2], pid)
            elif err[1] == TIMEOUT:
                self._charge(base + k, chunk, k0 + k, TIMEOUT, err[2], pid)
            elif err[1] == LOCAL:
                pos = base + k
                shard = self.shard_at(pos, chunk, k0 + k)
                error = output_failure(f"{self.noun} {pos}", shard, shard.attempt, err[2])
                self._fail(pos, error, chunk, k0 + k, pid)
        tail = by_k.get(len(values))
        if tail is not None and tail[1] != INTERRUPTED:
            raise RuntimeError(f"ashard internal error: unexpected error record {tail!r}")

    def _emit(
        self,
        pos: int,
        value: Any,
        error: ShardError | None,
        chunk: Chunk,
        k: int,
        elapsed: Any,
        j: int,
        pid: int | None,
        *,
        skipped: bool = False,
    ) -> None:
        assert self.stream is not None
        took = _pick(elapsed, j)
        attempts = self.runs.get(pos, 1)
        shard = error.shard if error is not None and error.shard else self.shard_at(pos, chunk, k)
        self.stream.push(ShardDone(shard, value, error, attempts, pid, took, skipped))

    def shard_at(self, pos: int, chunk: Chunk | None = None, k: int = 0) -> Shard:
        """The `Shard` for a position, as `fn` saw it on its last attempt."""
        item = chunk.items[k] if chunk is not None and chunk.items is not None else None
        return self.positions.shard_at(pos, self.runs.get(pos, 1), item)

    def _charge(self, pos: int, chunk: Chunk, k: int, kind: int, detail: Any, pid: int) -> None:
        """A failed run of `pos`: what its error rules (`ErrorRules`) say follows it -
        run it again (now, or after a backoff), skip it, or its permanent failure."""
        if kind == TIMEOUT:
            self.record.timeouts += 1
        rules = self.rules
        run = self.runs.get(pos, 1)
        error = None if rules.plain else self._error(pos, chunk, k, kind, detail, run)
        try:
            decision = rules.decide(pos, kind, error)
        except Exception as exc:  # the caller's retry_errors predicate raised: the call's
            self.abort(exc)
            return
        if decision.rule is not None:
            self.record.log.rules[(pos, run)] = decision.rule
        if self.trace is not None and kind != CRASHED:  # a crash: `worker_lost` tells it
            skipped = decision.action == SKIP
            self.trace.saw(chunk, "skipped" if skipped else _OUTCOMES[kind])
        if decision.action == RETRY and not self.aborted:
            why = _WHY.get(kind, "it failed")
            budget = "max_retries" if decision.rule is None else "its on_error rule"
            wait = f" in {decision.delay:.3g} s" if decision.delay else ""
            worker_event(WARNING, f"{self.noun} {pos} will run again{wait}: {why} on worker "
                         f"{pid} (retry {decision.count} of {decision.limit}, {budget})", pid,
                         shard_id=pos, reason=why)  # fmt: skip
            if kind == RAISED:
                self.record.error_retries += 1
            self._push_retry(pos, chunk, k, decision.delay)
            return
        if decision.action == SKIP:
            assert error is not None  # a rule decided: the error was made to match it
            self._skip(pos, error, chunk, k, pid)
            return
        if error is None:
            error = self._error(pos, chunk, k, kind, detail, run)
        self._fail(pos, error, chunk, k, pid)

    def _push_retry(self, pos: int, chunk: Chunk, k: int, delay: float = 0.0) -> None:
        if chunk.items is not None:
            self.positions.keep(pos, chunk.items[k])
        if delay > 0:
            heapq.heappush(self._delayed, (time.monotonic() + delay, pos))
        else:
            self._retry.append(pos)

    def _skip(self, pos: int, error: ShardError, chunk: Chunk, k: int, pid: int | None) -> None:
        """An on_error rule skips `pos` (which failed with `error`): resolved, its value
        None, not a failure."""
        self.skipped[pos] = error
        if self.trace is not None:
            self.trace.saw(chunk, "skipped")
        self._resolve_valueless(pos, None, chunk, k, pid)

    def _error(
        self, pos: int, chunk: Chunk, k: int, kind: int, detail: Any, attempts: int
    ) -> ShardError:
        return failure(
            kind,
            detail,
            subject=f"{self.noun} {pos}",
            shard=self.shard_at(pos, chunk, k),
            attempts=attempts,
            timeout=self.opts.timeout,
        )

    def _fail(self, pos: int, error: ShardError, chunk: Chunk, k: int, pid: int | None) -> None:
        self.failures[pos] = error
        self._resolve_valueless(pos, error, chunk, k, pid)
        if self.opts.errors == "raise":
            self.abort()

    def _resolve_valueless(
        self, pos: int, error: ShardError | None, chunk: Chunk, k: int, pid: int | None
    ) -> None:
        """`pos` is resolved without a value: failed (`error`) or skipped (None)."""
        if self._resolved[pos]:
            raise RuntimeError(f"ashard internal error: {self.noun} {pos} resolved twice")
        self._resolved[pos] = 1
        self.n_resolved += 1
        if self.progress is not None:
            self.progress.update(1)
        if self.stream is not None:
            self._emit(pos, None, error, chunk, k, None, 0, pid, skipped=error is None)
        elif self.reducer is not None and not self.aborted:
            try:
                self.reducer.skip(pos)
            except Exception as exc:
                self.abort(exc)

    def _requeue_rest(self, chunk: Chunk, start: int, *, ran: bool = False) -> None:
        """Queue positions ``start ..`` of `chunk` again, one by one and uncharged: they
        never ran, or (`ran`) may have run on a worker that died before saying."""
        rest = chunk.count - start
        self.inflight_shards -= rest
        if not self.aborted:
            for k in range(start, chunk.count):
                self._push_retry(chunk.first + k, chunk, k)
                if not ran:
                    self._unrun.add(chunk.first + k)
        chunk.done = chunk.count

    def sent(self, chunk: Chunk, nbytes: int) -> None:
        """`chunk`'s items, pickled, are `nbytes` long: the caller holds about that much
        until the chunk is over (its items stay for a retry). Until now it counted as
        the estimate made when it was taken."""
        self.held_bytes += nbytes - chunk.nbytes
        chunk.nbytes = nbytes
        self.sizer.learn_item_bytes(chunk.count, nbytes)

    def _let_go(self, chunk: Chunk) -> None:
        """`chunk` is over: the caller no longer holds its items."""
        if chunk.nbytes and chunk.done >= chunk.count:
            self.held_bytes -= chunk.nbytes
            chunk.nbytes = 0

    def undelivered(self, chunks: Sequence[Chunk]) -> None:
        """`chunks` never reached a worker (its channel had closed before they were
        whole in it): queued again, no run charged."""
        for chunk in chunks:
            self._requeue_rest(chunk, chunk.done)
            self._let_go(chunk)
            if self.trace is not None:
                self.trace.ended(chunk, None, "cancelled")
        self.notify()

    def worker_lost(self, chunks: Sequence[Chunk], loss: Loss, *, timed_out: bool) -> None:
        """The worker holding `chunks` (oldest first) died, or was killed because it
        ran past the timeout (`timed_out`)."""
        pid = loss.pid
        if not timed_out:
            self.record.crashes += 1
        for i, chunk in enumerate(chunks):
            start = chunk.done
            if i > 0 or start >= chunk.count:
                self._requeue_rest(chunk, start)
                continue
            undelivered = chunk.count - start
            if timed_out or undelivered == 1:
                self.inflight_shards -= 1
                chunk.done = start + 1
                kind = TIMEOUT if timed_out else CRASHED
                pos = chunk.first + start
                self.record.lost(range(pos, pos + 1), pid, chunk.heard, timed_out)
                detail = (0.0, loss.stack) if timed_out else loss
                self._charge(chunk.first + start, chunk, start, kind, detail, pid)
                self._requeue_rest(chunk, start + 1, ran=not timed_out)
            else:
                positions = range(chunk.first + start, chunk.first + chunk.count)
                self.record.lost(positions, pid, chunk.heard, timed_out=False)
                self._requeue_rest(chunk, start, ran=True)  # the culprit is one of them
        for i, chunk in enumerate(chunks):
            self._let_go(chunk)
            if self.trace is not None:  # those queued behind it never started
                lost = "timeout" if timed_out else "crash"
                self.trace.ended(chunk, pid, lost if i == 0 else "cancelled")
        self.notify()

    # -- result -----------------------------------------------------------------------

    def diagnostics(self) -> Diagnostics:
        shards = self.total if self.total is not None else self.next_pos
        cancelled = self.aborted and not self.finished  # stopped with positions unresolved
        return self.record.diagnostics(
            shards, len(self.failures), cancelled, tuple(self.sizer.autotune), len(self.skipped)
        )

    def ran_on(self, worker: WorkerInfo) -> None:
        """`worker` runs (or ran) shards of this job (`CallRecord.ran_on`)."""
        self.record.ran_on(worker)

    def scaled(self, before: int, after: int, reason: str, ended: str | None) -> None:
        """The pool went from `before` to `after` workers while this job ran."""
        self.record.scaled(before, after, reason, ended)

    @property
    def memory(self) -> MemoryLog:
        """Where a backend notes the budget, admission and memory recycling."""
        return self.record.memory

    def resolved_from(self, start: int) -> list[Any]:
        """The values of the resolved positions ``start, start+1, ...`` up to the first
        unresolved one (a failed position gives its `ShardError`), let go of here: for
        a caller that consumes a `map` in order while it runs."""
        end = start
        resolved = self._resolved
        while end < len(resolved) and resolved[end]:
            end += 1
        values = self.results[start:end]
        for pos in range(start, end):
            failure = self.failures.get(pos)
            if failure is not None:
                values[pos - start] = failure
            self.results[pos] = None
        return values

    def failure_list(self) -> list[ShardError]:
        return [self.failures[p] for p in sorted(self.failures)]

    def result(self, shards: Sequence[Shard], again: Any = None) -> ShardResult:
        """The call's `ShardResult` (`again`: what `retry_failed` needs of the call)."""
        results = self.results if self.stream is None else [None] * len(shards)
        skipped = tuple(sorted(self.skipped))
        store = self.outputs.store
        if store is None:
            return ShardResult(
                results, self.failure_list(), shards, self.diagnostics(), skipped=skipped,
                _again=again,
            )  # fmt: skip
        from ashard.tables import LazyResults  # pyarrow: a results store only

        return ShardResult(
            LazyResults(results), self.failure_list(), shards, self.diagnostics(),
            refs=results, skipped=skipped, _store=store, _again=again,
        )  # fmt: skip

    def unfinished(self) -> bytes:
        """A byte per position: 1 where it is resolved (`retry_failed` reruns the rest)."""
        return bytes(self._resolved)


@dataclass(frozen=True, slots=True)
class _Due:
    """A shard job's list of resolved positions and (`keep`) its results list, still to
    make: `n` positions, resolved and holding `earlier`'s values if it is given (else
    unresolved, None), but for those of `todo` (unresolved, None)."""

    n: int
    earlier: Sequence[Any] | None
    todo: Sequence[int]
    keep: bool

    def made_now(self) -> tuple[bytearray, list[Any]]:
        n, earlier = self.n, self.earlier
        resolved = bytearray(n) if earlier is None else bytearray(b"\x01") * n
        results: list[Any] = []
        if self.keep:
            if n < OLD_AT:
                results = [None] * n if earlier is None else list(earlier)
            else:
                make_old(results)
                results += repeat(None, n) if earlier is None else earlier
        for pos in self.todo:
            resolved[pos] = 0
            results[pos] = None
        return resolved, results

    async def made(self) -> tuple[bytearray, list[Any]]:
        """The same, a piece of `SLOTS_STEP` positions per loop step, the results list
        made old before it is filled (`make_old`)."""
        n, earlier, todo, keep = self.n, self.earlier, self.todo, self.keep
        resolved = bytearray()
        results: list[Any] = []
        if keep:
            make_old(results)
        mark = b"\x00" if earlier is None else b"\x01"
        for start in range(0, n, SLOTS_STEP):
            await anyio.lowlevel.checkpoint()
            end = min(n, start + SLOTS_STEP)
            resolved += mark * (end - start)
            if keep:
                results += repeat(None, end - start) if earlier is None else earlier[start:end]
        for start in range(0, len(todo), SLOTS_STEP):
            await anyio.lowlevel.checkpoint()
            for pos in todo[start : start + SLOTS_STEP]:
                resolved[pos] = 0
                results[pos] = None
        return resolved, results


def _pick(elapsed: Any, k: int) -> float:
    if elapsed is None:
        return 0.0
    if isinstance(elapsed, float):
        return elapsed
    return float(elapsed[k]) if k < len(elapsed) else 0.0

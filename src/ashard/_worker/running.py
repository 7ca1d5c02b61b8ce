"""Run the shards of one chunk (or one call) and report their outcomes.

Interruption is signal-driven. While user code runs, `_state.running` is true; the
SIGALRM (per-shard timeout) and SIGUSR1 (cancellation) handlers then raise
`Interrupted` into it. A handler clears the flag before raising, so at most one
interruption lands per call, and never outside the guarded region. A worker may hold
several calls: SIGUSR1 during a call stops it only if the UNCALL the parent sent first
names it (the handler reads it), never the call queued after one that just ended.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ashard import _seeding
from ashard._protocol import INTERRUPTED, RAISED, SHARDS, TIMEOUT, CallFn, Commit, RunChunk
from ashard._serialize import SETTLED, encode_exception, settled
from ashard._worker.jobs import JobContext
from ashard._worker.reports import Reporter
from ashard.shards import Shard

if TYPE_CHECKING:
    from ashard._worker.outputs import Finished, ResultWriter, TableWriter

FLUSH_INTERVAL = 0.02
"""Seconds of finished shards a worker may hold before reporting them."""


class Interrupted(BaseException):
    """Raised into user code by a signal handler; a BaseException so `except Exception`
    in user code does not swallow it."""

    def __init__(self, timeout: bool, frame: Any = None) -> None:
        super().__init__("timeout" if timeout else "interrupted")
        self.timeout = timeout
        # where the shard was stopped (a timeout): its stack, for `ShardTimeout.stack`
        self.stack = None if frame is None else "".join(traceback.format_stack(frame))


class _State:
    running = False
    control_pending = False
    call_seq: int | None = None  # the call running now (None: a chunk, or nothing)
    stop_call = False  # the parent cancelled the running call
    read_control: Callable[[], None] | None = None  # takes in what the parent sent
    reading = False  # a handler is taking in the parent's messages
    again = False  # another interrupt came meanwhile: read once more
    alarm_due = False  # the timeout's alarm came meanwhile
    async_running = False  # async shards or a call run on the worker's loop (asyncrun)
    stop_async = False  # the parent interrupted them: their watcher cancels them


_state = _State()


def _on_alarm(signum: int, frame: object) -> None:
    if _state.reading:  # never raise into the reader: after it
        _state.alarm_due = True
        return
    if _state.running:
        _state.running = False
        raise Interrupted(timeout=True, frame=frame)


def _on_interrupt(signum: int, frame: object) -> None:
    _state.control_pending = True
    if _state.reading:
        _state.again = True
        return
    if not _state.running and not _state.async_running:
        return
    if _state.call_seq is not None and _state.read_control is not None:
        _read_uncalls(_state.read_control)
        if _state.alarm_due and _state.running:
            _state.alarm_due = _state.running = False
            raise Interrupted(timeout=True, frame=frame)
        if not _state.stop_call:
            return
    if not _state.running:  # async code between steps: its watcher cancels it
        _state.stop_async = True
        return
    _state.running = False
    raise Interrupted(timeout=False)


def _read_uncalls(read_control: Callable[[], None]) -> None:
    """Take in the UNCALLs the parent sent before signalling (they say which call
    stops), however many signals come meanwhile: a handler that runs during another
    returns at once, and this one reads again."""
    _state.reading = True
    try:
        _state.again = True
        while _state.again:
            _state.again = False
            read_control()
    finally:
        _state.reading = False


def install_handlers(interrupt_signal: int, read_control: Callable[[], None]) -> None:
    """Handle SIGALRM and `interrupt_signal`; `read_control` takes in the parent's
    messages (called from the handler while a call runs)."""
    _state.read_control = read_control
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(interrupt_signal, _on_interrupt)


def cancel_call(seq: int) -> None:
    """The parent cancelled call `seq`: stop it if it is the one running."""
    if _state.call_seq == seq:
        _state.stop_call = True


def take_control_pending() -> bool:
    """True once after the parent signalled that control messages wait."""
    pending, _state.control_pending = _state.control_pending, False
    return pending


_OK, _ERR, _SIG = 0, 1, 2


def _guarded(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """(status, value or exception) of one user call, with interruption enabled."""
    try:
        try:
            _state.running = True
            return _OK, fn(*args, **kwargs)
        finally:
            _state.running = False
    except Interrupted as exc:
        return _SIG, exc
    except BaseException as exc:  # user code: SystemExit and KeyboardInterrupt are outcomes too
        return _ERR, exc


def _arm(timeout: float | None) -> None:
    if timeout is not None:
        signal.setitimer(signal.ITIMER_REAL, timeout)


def _disarm(timeout: float | None) -> None:
    if timeout is not None:
        signal.setitimer(signal.ITIMER_REAL, 0)


def run_chunk(
    ctx: JobContext, chunk: RunChunk, items: Sequence[Any] | None, report: Reporter
) -> None:
    """Run the positions of `chunk` (`items`: its items, unpacked) and report them."""
    if ctx.kind != SHARDS and ctx.timeout is None and ctx.seed is None and not ctx.audit:
        # (`map` jobs have no outputs: out= and results= are shard_map's)
        _run_items_fast(ctx, chunk.seq, items or [], report)
    else:
        _run_each(ctx, chunk, items, report)


_NO_ITEM = object()


def _run_items_fast(ctx: JobContext, seq: int, items: Sequence[Any], report: Reporter) -> None:
    """The `map` path with no timeout or seed: a tight loop, errors recorded in place.
    Values are sent once the chunk is done: if the first is one that could change (a
    list, an array), each is `settled` as it is made; else (numbers, strings) the loop
    runs in C."""
    fn = functools.partial(ctx.fn, **ctx.kwargs) if ctx.kwargs else ctx.fn
    values: list[Any] = []
    errors: list[Any] = []
    it = iter(items)
    t0 = time.perf_counter()
    careful = False  # each value `settled` as it is made, before the next item runs
    while True:
        try:
            try:
                _state.running = True
                # The loop runs in C; on an exception `extend` keeps what came before
                # and `it` has moved past the failed item, so the rest can go on.
                if careful:
                    keep = values.append
                    for item in it:
                        value = fn(item)
                        keep(settled(value))  # (`settled` counts `value`'s reference)
                elif not values:  # the first value says whether the values can change
                    item = next(it, _NO_ITEM)
                    if item is _NO_ITEM:
                        break
                    value = fn(item)
                    values.append(settled(value))
                    careful = type(value) not in SETTLED
                    continue
                else:
                    values.extend(map(fn, it))
                break
            finally:
                _state.running = False
        except Interrupted:
            errors.append((len(values), INTERRUPTED, None))
            break
        except BaseException as exc:  # user code failed on this item; go on with the next
            if ctx.read_only and isinstance(exc, ValueError):
                _hint_read_only(exc, ctx.read_only)
            errors.append((len(values), RAISED, encode_exception(exc)))
            values.append(None)
    report.result(seq, 0, values, errors, time.perf_counter() - t0, True)


def args_of(ctx: JobContext, pos: int, item: Any, attempt: int) -> tuple[Any, ...]:
    """What `fn` is called with for position `pos` (run `attempt`): its `Shard`, or its
    item; the `random` and numpy globals seeded for it first, under a `seed=`."""
    if ctx.seed is not None:
        _seeding.seed_globals(ctx.seed, pos)
    if ctx.kind != SHARDS:
        return (item,)
    assert ctx.layout is not None
    return (Shard(pos, ctx.layout.indices(pos), item, None, attempt, ctx.seed),)


def _run_each(
    ctx: JobContext, chunk: RunChunk, items: Sequence[Any] | None, report: Reporter
) -> None:
    """One guarded call per position: timeouts, seeds, shards; flushes every so often."""
    seq, first, count, attempts = chunk.seq, chunk.first, chunk.n, chunk.attempts
    shards = ctx.kind == SHARDS
    timeout = ctx.timeout
    values: list[Any] = []
    errors: list[Any] = []
    elapsed: list[float] = []
    writes: list[tuple[int, str]] = []
    commits: list[Commit] = []
    outputs = ctx.outputs
    k0 = 0
    last_flush = time.perf_counter()
    for k in range(count):
        pos = first + k
        attempt = attempts[k] if attempts else 1
        item = items[k] if items is not None else None
        args = args_of(ctx, pos, item, attempt)
        for output in outputs:
            output.begin(pos, attempt)
        t0 = time.perf_counter()
        _arm(timeout)
        status, out = _guarded(ctx.fn, args, ctx.kwargs)
        _disarm(timeout)
        if outputs:
            status, out = _settle_outputs(ctx, status, out, k - k0, commits)
        t1 = time.perf_counter()
        for audited in ctx.audit:
            if audited.written():
                if audited.reports:
                    writes.append((k - k0, audited.name))
                ctx.kwargs[audited.name] = audited.refresh()
        took = t1 - t0
        last = k == count - 1
        if status == _OK:  # (sent at once with a timeout, or as the chunk's last: as it is)
            values.append(out if timeout is not None or last else settled(out))
        else:
            values.append(None)
            if status == _ERR:
                if ctx.read_only and isinstance(out, ValueError):
                    _hint_read_only(out, ctx.read_only)
                if shards and isinstance(out, TypeError | AttributeError):
                    _hint_shard(out)
                errors.append((k - k0, RAISED, encode_exception(out)))
            elif out.timeout:
                errors.append((k - k0, TIMEOUT, (took, out.stack)))
            else:
                errors.append((k - k0, INTERRUPTED, None))
                values.pop()
                report.hold()
                report.result(seq, k0, values, errors, elapsed if shards else sum(elapsed), True,
                              writes, commits or None)  # fmt: skip
                return
        elapsed.append(took)
        if last or timeout is not None or t1 - last_flush >= FLUSH_INTERVAL:
            report.result(seq, k0, values, errors, elapsed if shards else sum(elapsed), last,
                          writes, commits or None)  # fmt: skip
            k0 = k + 1
            values, errors, elapsed, writes, commits = [], [], [], [], []
            last_flush = t1


def _hint_read_only(exc: ValueError, names: tuple[str, ...]) -> None:
    """numpy's "assignment destination is read-only", said in ashard's terms."""
    if "read-only" in str(exc):
        shown = ", ".join(repr(n) for n in names)
        exc.add_note(
            f"ashard: borrowed arrays ({shown}) are read-only under cow='deny' (the default); "
            "pass cow='allow' to write to a private copy, or use ashard.buffer() in out= for "
            "shared output"
        )


def _hint_shard(exc: TypeError | AttributeError) -> None:
    """`fn` treated the `Shard` it got as an item: say what `shard_map` passes."""
    if "'Shard'" in str(exc):
        exc.add_note(
            "ashard: shard_map passes fn an ashard.Shard (its items are shard.items, its "
            "positions shard.idx), not an item; to call fn once per item, use "
            "ashard.map(fn, items)"
        )


def _settle_outputs(
    ctx: JobContext,
    status: int,
    out: Any,
    k: int,
    commits: list[Commit],
    outputs: Sequence[TableWriter | ResultWriter] | None = None,
) -> tuple[int, Any]:
    """After one shard: commit what it wrote to every output (the job's, or the
    shard's own `outputs`) if it succeeded (then the results store holds its value,
    and None goes back), else discard it. A failure to write or commit fails the
    shard, and nothing of it stays visible."""
    if outputs is None:
        outputs = ctx.outputs
    if status != _OK:
        for output in outputs:
            output.abort()
        return status, out
    from ashard._places import commit_all  # on demand: its dataclasses slow a worker's start

    finished: list[tuple[str, Finished]] = []
    try:
        for output in outputs:
            done = output.finish(out)
            if done is not None:
                finished.append((output.name, done))
        sizes = commit_all([done[0] for _, done in finished])
    except BaseException as exc:  # a write that failed (disk full, a bad value): the shard's
        for output in outputs:
            output.abort()
        for _, done in finished:
            done[0].discard()
        return _ERR, exc
    for (name, (_, rows, memory, schema)), size in zip(finished, sizes, strict=True):
        commits.append((k, name, rows, size, memory, schema))
    return _OK, None if ctx.stores_results else out


def run_call(call: CallFn, report: Reporter) -> None:
    """One `ashard.call`."""
    seq, timeout = call.seq, call.timeout
    t0 = time.perf_counter()
    _state.call_seq, _state.stop_call, _state.alarm_due = seq, False, False
    _arm(timeout)
    try:
        status, out = _guarded(call.fn, call.args, call.kwargs)
    finally:
        _disarm(timeout)
        _state.call_seq = None
    took = time.perf_counter() - t0
    if status == _OK:
        report.result(seq, 0, [out], [], [took], True)
    elif status == _ERR:
        report.result(seq, 0, [None], [(0, RAISED, encode_exception(out))], [took], True)
    elif out.timeout:
        report.result(seq, 0, [None], [(0, TIMEOUT, (took, out.stack))], [took], True)
    else:
        report.result(seq, 0, [], [(0, INTERRUPTED, None)], [], True)


def flush_stdio() -> None:
    """User prints reach the parent's terminal promptly even when stdout is a file."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.flush()

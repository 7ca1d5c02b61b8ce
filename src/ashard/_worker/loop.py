"""The worker's message loop: it reads the parent's messages from the inherited socket,
as records (`ashard._protocol.parse_order`), and does what each says.

After the handshake (HELLO, answered READY) the loop takes jobs, chunks, calls and
shared segments in the order they came, except CANCEL, UNCALL and RECALL, which act as
soon as they are read (a call that cannot be loaded is answered in its turn, as seq -1).
Between orders it reads what came at least every `READ_EVERY` seconds, so that a RECALL
finds the chunks queued behind a long one before they start. It ends at end of stream:
the parent closed its end, or is gone (on Linux the parent's death also kills the
worker: `process.set_up`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import time
from collections import deque
from typing import Any, NamedTuple

from ashard._asyncfn import is_async_fn
from ashard._fds import StdioGuard
from ashard._framing import FrameReader, RawFrame, Unreadable
from ashard._protocol import (
    INIT_FAILED,
    INTERRUPT_SIGNAL,
    INTERRUPTED,
    READY,
    SHARDS,
    UNREADABLE_CALL,
    AddSegments,
    CallFn,
    CancelCall,
    CancelJob,
    DropSegments,
    ForgetJob,
    Hello,
    MarkOutput,
    Order,
    Preload,
    ProtocolViolation,
    RecallChunks,
    RegisterJob,
    RunChunk,
    SharedCall,
    parse_order,
)
from ashard._serialize import LoadError, encode_exception, load_failure, unpack
from ashard._worker import process, running
from ashard._worker.hygiene import Hygiene
from ashard._worker.jobs import JobContext, load_error, load_job
from ashard._worker.reports import Reporter
from ashard._worker.segments import Segments

__all__ = ["READ_EVERY", "Worker", "main"]

READ_EVERY = 0.001
"""Seconds between reads of the socket while orders wait in the queue, at most."""

_Control = CancelJob | CancelCall | RecallChunks


class Worker:
    """The message loop. Control messages (CANCEL) take effect as soon as they are read,
    ahead of chunks queued before them."""

    def __init__(self, sock: socket.socket, stdio: StdioGuard) -> None:
        self.sock = sock
        self.stdio = stdio
        self.report = Reporter(sock)
        self.reader = FrameReader(accept_fds=True)
        self.segments = Segments()
        self.queue: deque[Order | _Unloadable | _Dropped | _Recalled] = deque()
        self.jobs: dict[int, JobContext | LoadError] = {}
        self.hygiene: Hygiene | None = None  # made after init (`Pool(hygiene="off")`: none)
        self.tracing: Any = None  # a `WorkerTracing`, with `Pool(otel_setup=...)`
        self.holding = False  # chunks are under way that answer first: control orders wait
        self.held: list[_Control] = []
        self._batch = (0, "shard")  # the first position of the chunks running together
        self._read_at = 0.0  # time.monotonic() of the last read of the socket

    def clean_up_after(self, dump_fd: int | None, mode: str) -> None:
        """From now on (init is done: its work is the baseline), put back what each task
        changes in the process, as `mode` says ("off": ashard's own signal handlers only)."""
        reader = self.reader
        self.hygiene = Hygiene(mode, lambda: set(reader.fds or ()), dump_fd)
        self.report.on_final = self.hygiene.end

    def read(self, block: bool) -> bool:
        """Take in what the socket holds; False at end of stream."""
        self._read_at = time.monotonic()
        while True:
            try:
                n = self.reader.fill(self.sock, 0 if block else socket.MSG_DONTWAIT)
            except BlockingIOError:
                return True
            if n == 0:
                return False
            for msg in self.reader.messages():
                self._ingest(msg)
            if block and self.queue:
                return True

    def _ingest(self, msg: object) -> None:
        if isinstance(msg, RawFrame):
            msg = msg.decode()
        if isinstance(msg, Unreadable):  # only a CALL carries what may not unpickle here
            self.queue.append(_Unloadable(msg.error))
            return
        order = parse_order(msg)
        if isinstance(order, _Control):
            if self.holding:
                self.held.append(order)
            else:
                self._control(order)
        else:
            self.queue.append(order)

    def _control(self, order: _Control) -> None:
        if isinstance(order, CancelJob):
            self._cancel(order.key)
        elif isinstance(order, CancelCall):
            self._uncall(order.seq)
        else:
            self._recall(order.key, order.seq)

    def _recall(self, key: int, seq: int) -> None:
        for i, order in enumerate(self.queue):
            if isinstance(order, RunChunk) and order.key == key and order.seq >= seq:
                self.queue[i] = _Recalled(order.seq)  # answered in its turn

    def _uncall(self, seq: int) -> None:
        for i, order in enumerate(self.queue):
            if isinstance(order, CallFn) and order.seq == seq:
                self.queue[i] = _Dropped(seq)  # answered in its turn: answers go in order
                return
        running.cancel_call(seq)

    def read_control(self) -> None:
        """Take in what the parent sent, without waiting (from the interrupt handler,
        while a call runs: the reader is not in use then)."""
        with contextlib.suppress(OSError):
            self.read(block=False)

    def join_next(self, key: int) -> tuple[RunChunk, Any] | bool:
        """The next chunk of job `key`, to run beside its chunks under way (async shards,
        `asyncrun.Joiner`), if it is next in the queue; True if nothing came yet; False
        if something else is next. What the parent cancels meanwhile acts after them."""
        if not self.queue:
            if self.held:
                return False
            self.holding = True
            try:
                alive = self.read(block=False)
            except OSError:
                alive = False
            finally:
                self.holding = False
            if not alive or self.held:
                return False
            if not self.queue:
                return True
        order = self.queue[0]
        if not isinstance(order, RunChunk) or order.key != key:
            return False
        try:
            items = None if order.items is None else unpack(order.items)
        except (Exception, SystemExit):  # it fails in its turn, saying so
            return False
        self.queue.popleft()
        if self.hygiene is not None:
            first, noun = self._batch
            last = order.first + order.n - 1
            self.hygiene.carry(order.seq, f"{noun}s {first}-{last} ran at once on its event loop")
        return order, items

    def _act_on_held(self) -> None:
        held, self.held = self.held, []
        for order in held:
            self._control(order)

    def _cancel(self, key: int) -> None:
        kept: deque[Order | _Unloadable | _Dropped | _Recalled] = deque()
        for order in self.queue:
            if isinstance(order, RunChunk) and order.key == key:
                self.report.never_ran(order.seq)
            else:
                kept.append(order)
        self.queue = kept

    def serve(self) -> None:
        while True:
            if not self.queue:
                if not self.read(block=True):
                    return
                continue
            due = time.monotonic() - self._read_at >= READ_EVERY
            if (running.take_control_pending() or due) and not self.read(block=False):
                return
            if not self.queue:
                continue
            order = self.queue.popleft()
            self._obey(order)
            del order  # a call's arguments go now, not when the next message comes

    def _obey(self, order: Order | _Unloadable | _Dropped | _Recalled) -> None:
        if isinstance(order, RunChunk):
            self._run(order)
            self.stdio.check()  # user code ran: put back what it did to fds 0-2
        elif isinstance(order, MarkOutput):
            running.flush_stdio()
            for fd in (1, 2):
                with contextlib.suppress(OSError):
                    os.write(fd, order.token)
        elif isinstance(order, _Dropped):
            self.report.result(order.seq, 0, [], [(0, INTERRUPTED, None)], [], True)
        elif isinstance(order, _Recalled):
            self.report.never_ran(order.seq)
        elif isinstance(order, _Unloadable):
            error = load_error("the call's function or arguments", order.error)
            self.report.fail_all(UNREADABLE_CALL, 1, error)
        elif isinstance(order, CallFn):
            if isinstance(order.fn, SharedCall):
                try:
                    fn, args, kwargs = self.segments.unpack(order.fn.payload)
                except (Exception, SystemExit) as exc:
                    error = load_error("the call's function or arguments", load_failure(exc))
                    self.report.fail_all(UNREADABLE_CALL, 1, error)
                    return
                order = order._replace(fn=fn, args=args, kwargs=kwargs)
            is_async = is_async_fn(order.fn)
            if is_async:
                asyncrun = self._prepare_async()
            if self.hygiene is not None:
                self.hygiene.begin(order.seq, seeded=False, loaded=True)
            self.report.with_rss = False  # a call's latency is worth more than its memory
            self.report.fence = False
            if is_async:
                asyncrun.run_call(order, self.report)
            else:
                running.run_call(order, self.report)
            self.report.with_rss = True
            self.stdio.check()
        elif isinstance(order, RegisterJob):
            self.jobs[order.key] = load_job(order.spec, self.segments, self.stdio)
            self.stdio.check()
            if self.hygiene is not None:  # what loading it did is not a task's doing
                self.hygiene.rebase()
        elif isinstance(order, ForgetJob):
            self.jobs.pop(order.key, None)
        elif isinstance(order, AddSegments):
            fds = self.reader.fds
            assert fds is not None
            self.segments.add(order.seg_ids, [fds.popleft() for _ in order.seg_ids])
        elif isinstance(order, DropSegments):
            self.segments.drop(order.seg_ids)
        elif isinstance(order, Preload):
            for name in order.modules:
                with contextlib.suppress(Exception):  # the call that needs it will say why
                    importlib.import_module(name)
            if self.hygiene is not None:  # what importing did is not a task's doing
                self.hygiene.rebase()

    def _prepare_async(self) -> Any:
        """`asyncrun`, its loop made (once), and the checks after a task told which of
        the loop's executor threads are idle (not left running) and which of its tasks
        are pending."""
        from ashard._worker import asyncrun  # the loop and anyio: when first used

        asyncrun.prepare()
        self.report.idle_threads = asyncrun.idle_threads
        if self.hygiene is not None:
            self.hygiene.idle_threads = asyncrun.idle_threads
            self.hygiene.loop_tasks = asyncrun.pending_tasks
        return asyncrun

    def _run(self, chunk: RunChunk) -> None:
        ctx = self.jobs.get(chunk.key)
        if not isinstance(ctx, JobContext):
            exc = ctx if ctx is not None else RuntimeError(f"job {chunk.key} is not registered")
            self.report.fail_all(chunk.seq, chunk.n, exc)
            return
        try:
            items = None if chunk.items is None else unpack(chunk.items)
        except (Exception, SystemExit) as raised:
            failure = load_failure(raised)
            if chunk.n > 1:  # the parent sends them again one by one, to name the bad one
                self.report.never_ran(chunk.seq)
            else:
                what = "item" if ctx.kind != SHARDS else "the items of shard"
                self.report.fail_all(chunk.seq, 1, load_error(f"{what} {chunk.first}", failure))
            return
        if ctx.peak:
            self.report.peak_from = process.peak_start()
        self.report.fence = ctx.writes_shared
        if ctx.is_async:
            asyncrun = self._prepare_async()
        if self.hygiene is not None:
            self.hygiene.begin(chunk.seq, ctx.seed is not None, fds=not ctx.outputs)
        if ctx.is_async and ctx.concurrency > 1 and not ctx.peak and self.tracing is None:
            self._batch = chunk.first, "shard" if ctx.kind == SHARDS else "item"
            asyncrun.run_chunk(ctx, chunk, items, self.report, _Joiner(self))
            self._act_on_held()
            return
        run = running.run_chunk
        if ctx.is_async:
            run = asyncrun.run_chunk
        if self.tracing is not None and chunk.trace is not None:
            with self.tracing.run(chunk.trace, chunk.first, chunk.n):
                run(ctx, chunk, items, self.report)
        else:
            run(ctx, chunk, items, self.report)


class _Joiner:
    """The worker's queue as `asyncrun.Joiner`."""

    def __init__(self, worker: Worker) -> None:
        self.sock = worker.sock
        self.join_next = worker.join_next

    def __call__(self, key: int) -> tuple[RunChunk, Any] | bool:
        return self.join_next(key)


class _Unloadable(NamedTuple):
    """A CALL that did not unpickle here, answered (as seq -1) in its turn."""

    error: Exception


class _Dropped(NamedTuple):
    """A queued CALL the parent cancelled, answered (as interrupted) in its turn."""

    seq: int


class _Recalled(NamedTuple):
    """A queued chunk the parent recalled, answered (as never run) in its turn."""

    seq: int


def _handshake(worker: Worker) -> bool:
    """Apply HELLO (the process's setup, init) and answer READY; False if the worker
    must stop."""
    if not worker.read(block=True):
        return False
    hello = worker.queue.popleft()
    if not isinstance(hello, Hello):
        raise ProtocolViolation(f"expected HELLO first, got {type(hello).__name__}")
    process.configure(hello)
    if hello.worker_loop != "asyncio":
        from ashard._worker import asyncrun

        asyncrun.configure(hello.worker_loop)
    worker.report.max_frame = hello.max_frame
    try:
        if hello.init is not None:
            unpack(hello.init)()
        if hello.otel_setup is not None:
            from ashard._worker.tracing import WorkerTracing  # opentelemetry: only then

            worker.tracing = WorkerTracing(hello.otel_setup)
    except BaseException as exc:  # reported to the parent, which fails the pool start
        worker.report.send((INIT_FAILED, encode_exception(exc)))
        return False
    worker.stdio.check()
    dump = process.stack_dump_fd()  # where its stacks go if it ever hangs in C code
    worker.clean_up_after(dump, hello.hygiene)
    fds = [] if dump is None else [dump]
    worker.report.send((READY, os.getpid(), process.private_rss(), len(fds)), fds)
    return True


def main(argv: list[str]) -> None:
    """``python -m ashard._worker FD PARENT_PID``: serve the parent on socket FD."""
    fd, parent_pid = int(argv[1]), int(argv[2])
    stdio = process.set_up(parent_pid)
    worker = Worker(socket.socket(fileno=fd), stdio)
    running.install_handlers(INTERRUPT_SIGNAL, worker.read_control)
    try:
        if _handshake(worker):
            worker.serve()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        running.flush_stdio()
        if worker.tracing is not None:
            worker.tracing.flush()
    os._exit(0)

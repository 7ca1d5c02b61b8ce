"""The worker's message loop: handshake, job registration, chunks, segments.

Receives messages on the inherited socket FD, runs chunks, sends results back. It exits
on end of stream (the parent closed its end, or is gone) and - on Linux - when the
parent dies, through the kernel's parent-death signal.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from typing import Any

from ashard._fds import StdioGuard
from ashard._framing import (
    DEFAULT_MAX_FRAME,
    FrameReader,
    RawFrame,
    Unreadable,
    encode,
    frame_size,
    send_frames,
)
from ashard._protocol import (
    CALL,
    CANCEL,
    DROP,
    EXIT_OVER_MEMORY,
    FORGET,
    HELLO,
    INIT_FAILED,
    INTERRUPT_SIGNAL,
    INTERRUPTED,
    JOB,
    RAISED,
    READY,
    RESULT,
    RUN,
    SEGMENTS,
    SHARDS,
    UNREADABLE_CALL,
    ArrayDesc,
    ArrayRef,
    Commit,
    IpcRef,
    JobSpec,
    Payload,
    SinkRef,
)
from ashard._serialize import LoadError, dumps, encode_exception, load_failure, pack, unpack
from ashard._serialize import show_error as _show_error
from ashard._worker import run
from ashard._worker.attach import Audited, Segments
from ashard._worker.results import (
    RESULT_SEGMENT_BYTES,
    close_all,
    oob_bytes,
    segment_results,
)


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


class Worker:
    """The message loop. Control messages (CANCEL) take effect as soon as they are read,
    ahead of chunks queued before them."""

    def __init__(self, sock: socket.socket, stdio: StdioGuard) -> None:
        self.sock = sock
        self.stdio = stdio
        self.reader = FrameReader(accept_fds=True)
        self.segments = Segments()
        self.queue: deque[Any] = deque()
        self.jobs: dict[int, run.JobContext | BaseException] = {}
        self.report_rss = True  # memory with chunk results; calls skip it (latency)
        self.max_frame = DEFAULT_MAX_FRAME  # the parent's limit, from HELLO

    def send(self, msg: Any) -> None:
        send_frames(self.sock, encode(msg))

    def send_result(
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
        rss = private_rss() if final and self.report_rss else 0
        try:
            payload = pack(values)
        except BaseException:  # user pickling code: SystemExit is an outcome, not the end
            values, errors = _drop_unpicklable(values, errors)
            payload = pack(values)
        arrays: list[ArrayDesc] | None = None
        fds: list[int] = []
        if payload[1] and oob_bytes(payload) >= RESULT_SEGMENT_BYTES:
            values, arrays, fds = segment_results(values)
            if arrays:
                payload = pack(values)
        n = len(values)
        msg = (RESULT, seq, k0, n, payload, errors, elapsed, final, writes, rss, commits, arrays)
        parts = encode(msg)
        size = len(parts[0]) + len(parts[1]) if len(parts) == 2 else frame_size(parts)
        if size > self.max_frame:
            values, errors = _too_large(values, errors, frame_size(parts), self.max_frame)
            payload = pack(values)
            parts = encode(
                (RESULT, seq, k0, n, payload, errors, elapsed, final, writes, rss, commits, None)
            )
            close_all(fds)
            fds = []
        try:
            send_frames(self.sock, parts, fds)
        finally:
            close_all(fds)

    def read(self, block: bool) -> bool:
        """Take in what the socket holds; False at end of stream."""
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

    def _ingest(self, msg: Any) -> None:
        if isinstance(msg, RawFrame):
            msg = msg.decode()
        if isinstance(msg, Unreadable):  # only a CALL carries what may not unpickle here
            error = _load_error("the call's function or arguments", msg.error)
            self._fail_all(UNREADABLE_CALL, 1, error)
            return
        if msg[0] == CANCEL:
            self._cancel(msg[1])
        else:
            self.queue.append(msg)

    def _cancel(self, key: int) -> None:
        kept: deque[Any] = deque()
        for msg in self.queue:
            if msg[0] == RUN and msg[1] == key:
                self.send_result(msg[2], 0, [], [(0, INTERRUPTED, None)], None, True)
            else:
                kept.append(msg)
        self.queue = kept

    def serve(self) -> None:
        while True:
            if not self.queue:
                if not self.read(block=True):
                    return
                continue
            if run.take_control_pending() and not self.read(block=False):
                return
            if not self.queue:
                continue
            msg = self.queue.popleft()
            op = msg[0]
            if op == RUN:
                self._run(*msg[1:])
                self.stdio.check()  # user code ran: put back what it did to fds 0-2
            elif op == CALL:
                self._call(*msg[1:])
                self.stdio.check()
            elif op == JOB:
                self.jobs[msg[1]] = _load_job(msg[2], self.segments, self.stdio)
                self.stdio.check()
            elif op == FORGET:
                self.jobs.pop(msg[1], None)
            elif op == SEGMENTS:
                fds = self.reader.fds
                assert fds is not None
                self.segments.add(msg[1], [fds.popleft() for _ in msg[1]])
            elif op == DROP:
                self.segments.drop(msg[1])
            del msg  # a call's arguments go now, not when the next message comes

    def _run(
        self,
        key: int,
        seq: int,
        first: int,
        count: int,
        attempts: list[int] | None,
        packed: Payload | None,
    ) -> None:
        ctx = self.jobs.get(key)
        if not isinstance(ctx, run.JobContext):
            exc = ctx if ctx is not None else RuntimeError(f"job {key} is not registered")
            self._fail_all(seq, count, exc)
            return
        try:
            items = None if packed is None else unpack(packed)
        except (Exception, SystemExit) as raised:
            exc = load_failure(raised)
            if count > 1:  # the parent sends them again one by one, to name the bad one
                self.send_result(seq, 0, [], [(0, INTERRUPTED, None)], None, True)
            else:
                what = "item" if ctx.kind != SHARDS else "the items of shard"
                self._fail_all(seq, 1, _load_error(f"{what} {first}", exc))
            return
        run.run_chunk(ctx, seq, first, count, attempts, items, self.send_result)

    def _fail_all(self, seq: int, count: int, exc: BaseException) -> None:
        record = encode_exception(exc)
        errors = [(k, RAISED, record) for k in range(count)]
        self.send_result(seq, 0, [None] * count, errors, [0.0] * count, True)

    def _call(
        self,
        seq: int,
        fn: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
    ) -> None:
        self.report_rss = False
        run.run_call(fn, args, kwargs, timeout, seq, self.send_result)
        self.report_rss = True


def _load_job(
    spec: JobSpec, segments: Segments, stdio: StdioGuard
) -> run.JobContext | BaseException:
    """Unpickle a job's function and borrowed objects, map its shared arrays, open
    its outputs; the error, if that fails."""
    if spec.sys_path != sys.path:
        sys.path[:] = spec.sys_path
    kwargs: dict[str, Any] = {}
    audit: list[Audited] = []
    outputs: list[Any] = []
    what = "fn"
    try:
        fn = unpack(spec.fn)
        for name, value in (spec.borrow or {}).items():
            what = f"borrow[{name!r}]"
            if isinstance(value, ArrayRef) and value.mode == "audit" and value.size:
                audit.append(Audited(name, segments, value))
                kwargs[name] = audit[-1].array
            elif isinstance(value, ArrayRef):
                kwargs[name] = segments.view(value)
            elif isinstance(value, IpcRef):
                kwargs[name] = segments.table(value)
            elif isinstance(value, SinkRef):
                outputs.append(_writer(name, value, stdio))
                kwargs[name] = outputs[-1]
            else:
                kwargs[name] = unpack(value)
        if spec.results is not None:
            what = "results="
            outputs.append(_writer("", spec.results, stdio))
    except (Exception, SystemExit) as exc:
        return _load_error(what, load_failure(exc))
    read_only = tuple(
        name
        for name, v in (spec.borrow or {}).items()
        if isinstance(v, ArrayRef) and v.mode == "ro"
    )
    return run.JobContext(
        spec.kind, fn, kwargs, spec.timeout, spec.seed, spec.layout, audit, outputs,
        spec.results is not None, read_only,
    )  # fmt: skip


def _writer(name: str, ref: SinkRef, stdio: StdioGuard) -> Any:
    """The writer of a table sink (`name`, in out=) or of the results store ("")."""
    from ashard._worker import sinks

    sinks.guard = stdio
    return sinks.TableWriter(name, ref) if ref.kind == "sink" else sinks.ResultWriter(name, ref)


def _load_error(what: str, exc: Exception) -> LoadError:
    """`exc`, raised while unpickling `what` in the worker, as an error that says so."""
    return LoadError(what, exc, "the worker")


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
                    f"({_show_error(exc)})"
                )
                error.__cause__ = exc
            errs.append((k, RAISED, encode_exception(error)))
    errs.sort(key=lambda e: e[0])
    return out, errs


def _handshake(worker: Worker) -> bool:
    """Apply HELLO (sys.path, init, frame limit) and answer READY; False if the worker
    must stop."""
    if not worker.read(block=True):
        return False
    hello = worker.queue.popleft()
    assert hello[0] == HELLO, hello
    _, sys_path, init, worker.max_frame, memory_limit, authkey = hello
    sys.path[:] = sys_path
    if authkey is not None:
        share_mp_authkey(authkey)
    if memory_limit is not None:
        watch_memory(memory_limit)
    if init is not None:
        try:
            unpack(init)()
        except BaseException as exc:  # reported to the parent, which fails the pool start
            worker.send((INIT_FAILED, encode_exception(exc)))
            return False
        worker.stdio.check()
    worker.send((READY, os.getpid(), private_rss()))
    return True


def share_mp_authkey(key: bytes) -> None:
    """Take the parent's multiprocessing authkey (Manager proxies among the arguments
    then connect): at once if multiprocessing is loaded, else when it first is — its
    import is 20 ms, not for every worker to pay."""
    process = sys.modules.get("multiprocessing.process")
    if process is not None:
        process.current_process().authkey = key
        return
    sys.meta_path.insert(0, _AuthkeyOnImport(key))


class _AuthkeyOnImport:
    """A meta-path finder that sets the authkey right after `multiprocessing.process`
    is imported, then leaves."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "multiprocessing.process":
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader, key = spec.loader, self.key

        class _Loader:
            def create_module(self, spec: Any) -> Any:
                return loader.create_module(spec)

            def exec_module(self, module: Any) -> None:
                loader.exec_module(module)
                module.current_process().authkey = key

        spec.loader = _Loader()  # type: ignore[assignment]
        return spec


_statm: int | None = None
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def private_rss() -> int:
    """Resident memory not shared with other processes (RSS minus shared pages), read
    from an open /proc/self/statm (about a microsecond); 0 where there is none."""
    global _statm
    try:
        if _statm is None:
            _statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        fields = os.pread(_statm, 128, 0).split()
        return (int(fields[1]) - int(fields[2])) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


MEMORY_WATCH_SECONDS = 0.005
"""How often a worker with a memory limit reads its private memory."""


def watch_memory(limit: int) -> None:
    """Exit at once (`EXIT_OVER_MEMORY`) when private memory passes `limit` bytes: a
    thread reading /proc/self/statm every few milliseconds, so a runaway allocation
    is stopped where it happens, not at the parent's next look (a second later, and
    gigabytes on)."""
    private_rss()  # opens statm before the thread shares it
    # The watcher needs the GIL to look: a long allocation in C holds it, and the
    # default 5 ms before a waiting thread may claim it lets a fast one run ~10 MiB on.
    sys.setswitchinterval(0.001)

    def watch() -> None:
        while True:
            time.sleep(MEMORY_WATCH_SECONDS)
            if private_rss() > limit:
                os._exit(EXIT_OVER_MEMORY)

    threading.Thread(target=watch, name="ashard-memory", daemon=True).start()


def _line_buffer_c_stdio() -> None:
    """C's stdout to a pipe is block-buffered: a `printf` in an extension would reach the
    parent only when the worker exits. Line-buffer it, as on a terminal."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        for name in ("stdout", "stderr"):
            libc.setvbuf(ctypes.c_void_p.in_dll(libc, name), None, 1, 0)  # 1: _IOLBF
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str]) -> None:
    fd, parent_pid = int(argv[1]), int(argv[2])
    _die_with_parent(parent_pid)
    _line_buffer_c_stdio()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    run.install_handlers(INTERRUPT_SIGNAL)
    stdio = StdioGuard()
    faulthandler.enable()
    sock = socket.socket(fileno=fd)
    worker = Worker(sock, stdio)
    try:
        if _handshake(worker):
            worker.serve()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        run.flush_stdio()
    os._exit(0)

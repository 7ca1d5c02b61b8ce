"""The parent side of one worker process: spawn, handshake, state, kill, reap.

Workers are fresh interpreters, never forks, launched by `ashard._spawn`. The handshake
(HELLO -> READY) is awaited with a bound, so a broken interpreter fails fast.

A `WorkerHandle` owns its state and changes it through methods named for what
happened (`hand`, `finished_work`, `mark_idle`, `mark_ended`, `forget_job`, ...);
nobody else assigns its fields. It holds what outlives one lease: the jobs and shared
segments the worker process has loaded, its memory readings, why it should be
recycled or why it ended. The chunks in flight belong to the lease that sent them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

import anyio

from ashard import _spawn
from ashard._channel import Channel
from ashard._framing import DEFAULT_MAX_FRAME, ChannelClosed, encode, encode_many
from ashard._health import EndReason, HealthPolicy, Profile, RecycleReason
from ashard._log import worker_event
from ashard._outcomes import describe_exit, start_failure
from ashard._output import WorkerOutput
from ashard._protocol import (
    DROP,
    DUMP_SIGNAL,
    EXIT_OVER_MEMORY,
    FORGET,
    HELLO,
    INTERRUPT_SIGNAL,
    PRELOAD,
    Payload,
    ProtocolViolation,
    is_init_failure,
    is_ready,
)
from ashard._shm import Segment
from ashard.errors import WorkerStartError

START_TIMEOUT = 60.0
"""Seconds a new worker may take to import and run `init` before it counts as broken."""

_live: weakref.WeakSet[WorkerHandle] = weakref.WeakSet()


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """How to start a worker: extra environment, an `init` callable (pickled), and the
    largest frame the parent accepts from it (bytes)."""

    env: dict[str, str] = field(default_factory=dict)
    init: Payload | None = None
    max_frame: int = DEFAULT_MAX_FRAME
    memory_limit: int | None = None  # private memory past which the worker stops itself
    hygiene: str = "check"  # what the worker puts back after each task (`Pool(hygiene=)`)
    otel_setup: str | None = None  # installs the worker's tracer provider (`Pool(otel_setup=)`)
    worker_loop: str = "asyncio"  # where `async def` shards run (`Pool(worker_loop=)`)
    nice: int = 0  # niceness steps below the parent's (`Pool(worker_nice=)`)


class WorkerHandle:
    """One live worker: its process, its channel, and what the parent knows of it."""

    def __init__(self, proc: subprocess.Popen[bytes], channel: Channel) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.channel = channel
        self.output = WorkerOutput(proc.stdout, proc.stderr)
        self.output.watch(channel.fileno())
        self._jobs: set[int] = set()  # keys of the jobs the worker has loaded
        self._forget: list[int] = []  # jobs it may drop, told with the next send
        self._segments: set[int] = set()  # shared-memory segments it holds
        self._drops: list[int] = []  # segments it should close, told with the next send
        self._preloaded: set[str] = set()  # modules it was asked to import ahead
        self._tasks = 0  # shards and calls handed to it (for max_tasks)
        self._disowned = False  # a forked child's copy of the parent's handle
        self._rss = self._peak_rss = self._baseline_rss = 0  # private memory, bytes
        self._idle_since = time.monotonic()
        self._recycle: RecycleReason | None = None
        self._paused_since: float | None = None  # above mem_pause since (monotonic)
        self.oom_counted = False  # its cgroup counted an OOM kill when it died
        self._stack_fd: int | None = None  # a memfd its faulthandler dumps stacks into
        self.hang_stack: str | None = None  # what it dumped before it was killed hung
        self._ended: EndReason | None = None
        self._violation: str | None = None  # what it sent that broke the protocol
        self._ps: Any = None
        _live.add(self)

    # -- start ------------------------------------------------------------------------

    @classmethod
    async def start(cls, config: WorkerConfig) -> WorkerHandle:
        """Spawn a worker and wait until it reports ready."""
        ahead = _spawn.take(config.env)
        if ahead is not None:
            launched, parent_sock = ahead
            proc = (
                launched.result()
                if launched.done()
                else await anyio.to_thread.run_sync(launched.result)
            )
        else:
            parent_sock, child_sock = _spawn.socket_pair()
            proc = await anyio.to_thread.run_sync(
                _spawn.spawn_blocking, parent_sock, child_sock, config.env
            )
        handle = cls(proc, Channel(parent_sock, config.max_frame))
        worker_event(INFO, f"worker {proc.pid} started", proc.pid)
        try:
            await handle._handshake(config)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await handle.kill()
                handle.output.close(cut_short=True)  # what it said before it died: why, often
            raise
        handle.output.drain()  # what `init` printed
        return handle

    async def _handshake(self, config: WorkerConfig) -> None:
        try:
            with anyio.fail_after(START_TIMEOUT):
                hello = (HELLO, list(sys.path), config.init, config.max_frame,
                         config.memory_limit, _mp_authkey(), config.hygiene,
                         config.otel_setup, config.worker_loop, config.nice)  # fmt: skip
                await self.channel.send(encode(hello))
                while not (msgs := await self.channel.receive(wake=self.output.fileno())):
                    self.output.drain()  # what `init` prints, as it comes: it may not fit a pipe
                reply = msgs[0]
        except ProtocolViolation as exc:
            raise WorkerStartError(f"worker {self.pid} broke the protocol: it sent {exc}") from None
        except TimeoutError:
            raise WorkerStartError(
                f"worker {self.pid} did not start within {START_TIMEOUT:.0f} s"
            ) from None
        except ChannelClosed:
            code = await self.wait_exit(5.0)
            if code == EXIT_OVER_MEMORY:
                self.mark_ended("mem_hard")
                raise WorkerStartError(
                    f"worker {self.pid} went past its hard memory limit before it was ready "
                    "(in init?)"
                ) from None
            if code is not None and code < 0:
                how = describe_exit(self.pid, None, -code)
                raise WorkerStartError(f"{how} before it was ready") from None
            raise WorkerStartError(
                f"worker {self.pid} exited with code {code} before it was ready; "
                "its stderr above says why"
            ) from None
        if is_init_failure(reply):
            error = start_failure(self.pid, reply[1])
            raise error from error.__cause__
        if not is_ready(reply):
            raise WorkerStartError(f"worker {self.pid} answered its start with something else")
        self._baseline_rss = reply[2]
        self.observe(reply[2])
        if reply[3]:
            self._stack_fd = self.channel.take_fds(1)[0]

    # -- what it has done -------------------------------------------------------------

    @property
    def tasks(self) -> int:
        """Shards and calls handed to it so far."""
        return self._tasks

    def hand(self, key: int | None, tasks: int) -> bool:
        """`tasks` more shards of job `key` (or one call: `key` None) are handed to it;
        True the first time for a job: the caller then sends the job along."""
        self._tasks += tasks
        if key is None or key in self._jobs:
            return False
        self._jobs.add(key)
        return True

    @property
    def rss(self) -> int:
        """The last reading of its private resident memory, bytes (0: none yet)."""
        return self._rss

    @property
    def peak_rss(self) -> int:
        """The highest reading of its private resident memory, bytes."""
        return self._peak_rss

    def observe(self, rss: int) -> None:
        """Record a reading of the worker's private resident memory."""
        if rss > 0:
            self._rss = rss
            self._peak_rss = max(self._peak_rss, rss)

    def read_rss(self) -> int:
        """Private resident memory (RSS minus shared pages) read with psutil; 0 if the
        process is gone. Blocking (a /proc read): call it off the event loop."""
        import psutil  # here, not at the top: off a cold start's way to its first result

        try:
            if self._ps is None:
                self._ps = psutil.Process(self.pid)
            info = self._ps.memory_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return 0
        return int(info.rss - getattr(info, "shared", 0))

    def mark_idle(self) -> None:
        self._idle_since = time.monotonic()

    def idle_for(self, now: float) -> float:
        """Seconds since it went idle (meaningful while it is idle)."""
        return now - self._idle_since

    @property
    def recycle_reason(self) -> RecycleReason | None:
        """Why it should be replaced once its current work is done, if it should."""
        return self._recycle

    @property
    def paused(self) -> bool:
        """Above `mem_pause`: it takes no new work until it falls back below."""
        return self._paused_since is not None

    def paused_for(self, now: float) -> float:
        return 0.0 if self._paused_since is None else now - self._paused_since

    def set_paused(self, paused: bool, now: float) -> None:
        self._paused_since = now if paused else None

    def recycle_for(self, reason: RecycleReason) -> None:
        """Replace it once its current work is done (the first reason stays)."""
        if self._recycle is None:
            self._recycle = reason

    def finished_work(
        self, rss: int, policy: HealthPolicy, profile: Profile, left: bool = False
    ) -> None:
        """A chunk or call is done: record the memory it reported (bytes), and whether
        the worker should be replaced now that it is free (the first reason stays);
        `left`: it left threads, processes or descriptors behind (`hygiene="recycle"`)."""
        self.observe(rss)
        if self._recycle is None:
            self._recycle = policy.soft_reason(self._tasks, self._rss, self._baseline_rss, profile)
        if self._recycle is None and left and policy.hygiene == "recycle":
            self._recycle = "hygiene"

    @property
    def end_reason(self) -> EndReason | None:
        return self._ended

    def mark_ended(self, reason: EndReason) -> None:
        """Record why it ended (the first reason stays)."""
        if self._ended is None:
            self._ended = reason

    # -- jobs and shared memory it holds -----------------------------------------------

    def forget_job(self, key: int) -> None:
        """Job `key` is over: the worker may drop it (told with the next send)."""
        if key in self._jobs:
            self._jobs.discard(key)
            self._forget.append(key)

    def hand_segments(self, segments: Iterable[Segment]) -> list[Segment]:
        """Those of `segments` it does not hold yet, now counted as held: the caller
        sends their descriptors."""
        new = [seg for seg in segments if seg.id not in self._segments]
        for seg in new:
            self._segments.add(seg.id)
            seg.holders.add(self)
        return new

    def drop_segment(self, seg_id: int) -> None:
        """The parent closed segment `seg_id`: the worker should close it too."""
        if seg_id in self._segments:
            self._segments.discard(seg_id)
            self._drops.append(seg_id)
            self.flush_control()

    def preload(self, modules: Sequence[str]) -> None:
        """Ask the worker to import `modules` now, once each: a call that needs them is
        being prepared. A hint: not sent while a send is under way."""
        new = [m for m in modules if m not in self._preloaded]
        if new and self.proc.returncode is None and self.channel.post(encode((PRELOAD, new))):
            self._preloaded.update(new)

    @property
    def has_control(self) -> bool:
        """Are FORGET or DROP messages waiting to be sent?"""
        return bool(self._forget or self._drops)

    def take_control(self) -> list[Any]:
        """The FORGET and DROP messages that wait for the next send to this worker."""
        if not (self._forget or self._drops):
            return []
        msgs: list[Any] = [(FORGET, k) for k in self._forget]
        if self._drops:
            msgs.append((DROP, self._drops))
        self._forget, self._drops = [], []
        return msgs

    def flush_control(self) -> None:
        """Send waiting FORGET/DROP messages now, unless a send is under way (then they
        go with the next one): an idle worker should not hold memory of a finished call."""
        if self.has_control and self.proc.returncode is None:
            msgs = self.take_control()
            if not self.channel.post(encode_many(msgs)):
                self._forget = [m[1] for m in msgs if m[0] == FORGET] + self._forget
                self._drops = [i for m in msgs if m[0] == DROP for i in m[1]] + self._drops

    # -- the process ------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return not self._disowned and self.poll() is None and not self.channel.broken

    def poll(self) -> int | None:
        """The exit status once the process has ended (reaped), else None. What is left
        of its process group (what its shards started or forked and left running) is
        killed first: the group is named by the worker's pid, which is not reused until
        the worker is reaped. Safe from any thread."""
        code = self.proc.returncode
        if code is None and not self._disowned and _ended_unreaped(self.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            code = self.proc.poll()
        return code

    def notice_exit(self) -> bool:
        """Has the process ended? Then end its channel from this side too, so that the
        channel's reader sees the worker gone now: a process it forked into a session of
        its own may still hold the worker's end open, and EOF would never come."""
        if self._disowned or self.poll() is None:
            return False
        self.channel.shut()  # (its output's epoll watches the channel: readable now too)
        return True

    def disown(self) -> None:
        """In a forked child: the worker is the parent's. Let go of the child's copies of
        its channel and pipes (so the worker still sees its parent's death) and never
        signal it."""
        self._disowned = True
        self.channel.disown()
        self.output.disown()

    def interrupt(self) -> None:
        """Ask the worker to stop the shard it runs (it checks control messages)."""
        self.signal(INTERRUPT_SIGNAL)

    def signal(self, signum: int) -> None:
        """Send `signum` to the worker if it has not been reaped (and is ours)."""
        if self.proc.returncode is None and not self._disowned:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    @property
    def violation(self) -> str | None:
        """What it sent that was not a valid message, if it did."""
        return self._violation

    def broke_protocol(self, what: str) -> None:
        """It sent `what`, which is not a valid message: it is to be killed."""
        self._violation = what
        self.mark_ended("protocol")

    def kill_for(self, reason: EndReason) -> None:
        """SIGKILL it now, from any thread, recording why (its drive sees the EOF)."""
        if self._ended is None:
            self._ended = reason
            self.signal(signal.SIGKILL)

    def reap(self, timeout: float) -> bool:
        """Wait (blocking: not on the event loop) for the process to exit."""
        if not self._wait_blocking(timeout):
            return False
        _live.discard(self)
        self.output.close()
        return True

    def _wait_blocking(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the process to end and be reaped (`poll`),
        blocking; True if it was."""
        deadline = time.monotonic() + timeout
        delay = 0.001
        while self.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.05)
        return True

    def stop_blocking(self) -> None:
        """Let it exit (EOF on its channel) and reap it, killing it if it lingers.
        Blocking: for the monitor's thread."""
        self.close_channel()
        if not self.reap(2.0):
            self.signal(signal.SIGKILL)
            self.reap(5.0)

    async def wait_exit(self, timeout: float) -> int | None:
        """The exit status (negative: killed by that signal), polled without blocking;
        None if the process still runs after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        delay = 0.001
        while (code := self.poll()) is None and time.monotonic() < deadline:
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return code

    async def dump_stack(self, wait: float) -> str | None:
        """Every thread's stack, written by the worker's faulthandler when asked (it does
        so even when the worker is stuck in C code), within `wait` seconds; None if it
        cannot say (every signal blocked, or no memfd)."""
        fd = self._stack_fd
        if fd is None or not self.alive:
            return None
        try:  # its own copy: the worker's may be closed meanwhile (it died)
            own = os.dup(fd)
            start = os.fstat(own).st_size
        except OSError:
            return None
        try:
            self.signal(DUMP_SIGNAL)
            return await anyio.to_thread.run_sync(_read_dump, own, start, wait)
        finally:
            os.close(own)

    def close_channel(self) -> None:
        """Close its channel (it exits at EOF) and what else the parent holds of it."""
        self._close_stack_fd()
        self.channel.close()
        self.output.wake_waiters()  # a call's reader waits on it, watching the channel

    def _close_stack_fd(self) -> None:
        fd, self._stack_fd = self._stack_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    async def kill(self) -> int:
        """SIGKILL the worker and reap it; returns the exit status."""
        self.signal(signal.SIGKILL)
        self.close_channel()
        code = await self.wait_exit(10.0)
        _live.discard(self)
        self.output.close(cut_short=True)
        return code if code is not None else -signal.SIGKILL

    async def stop(self, grace: float) -> None:
        """Ask the worker to exit (EOF on its channel); kill it after `grace` seconds."""
        self.close_channel()
        if await self.wait_exit(grace) is None:
            await self.kill()
        _live.discard(self)
        self.output.close()

    @property
    def stopped_over_memory(self) -> bool:
        """Did it stop itself past its memory limit?"""
        return self.proc.returncode == EXIT_OVER_MEMORY

    def exit_info(self) -> tuple[int | None, int | None]:
        """(exitcode, signal) once the process has ended."""
        code = self.proc.returncode
        if code is None:
            return None, None
        if code < 0:
            return None, -code
        return code, None

    def __repr__(self) -> str:
        return f"<WorkerHandle pid={self.pid}>"


def _disown_all() -> None:
    """After a fork, in the child: none of the live workers is the child's."""
    handles = list(_live)
    _live.clear()
    for h in handles:
        h.disown()


os.register_at_fork(after_in_child=_disown_all)


def _ended_unreaped(pid: int) -> bool:
    """Has child `pid` ended, not reaped yet? (False once reaped: by another thread's
    `Popen.poll`, say; and where `os.waitid` is missing.)"""
    if not hasattr(os, "waitid"):
        return False
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return False


def _read_dump(fd: int, start: int, wait: float) -> str | None:
    """What faulthandler wrote to `fd` past `start`, once it stops growing (it writes
    in pieces), within `wait` seconds; None if nothing came. Blocking: a thread's."""
    deadline = time.monotonic() + wait
    size = start
    while time.monotonic() < deadline:
        time.sleep(0.01)
        now = os.fstat(fd).st_size
        if now > start and now == size:
            break
        size = now
    if size <= start:
        return None
    return os.pread(fd, size - start, start).decode("utf-8", "replace")


def kill_all_now() -> None:
    """At interpreter exit: no worker may outlive the parent."""
    handles = list(_live)
    for h in handles:
        h.close_channel()
    deadline = time.monotonic() + 1.0
    for h in handles:
        if not h._wait_blocking(max(0.0, deadline - time.monotonic())):
            h.signal(signal.SIGKILL)
            h._wait_blocking(60.0)
        with contextlib.suppress(Exception):  # its last lines, then the pipes (no warning)
            h.output.close()


def _mp_authkey() -> bytes | None:
    """This process's multiprocessing authkey, if it uses multiprocessing: workers take
    it, so that a `multiprocessing.Manager` proxy passed to them can connect (they are
    not multiprocessing's children, which inherit it)."""
    process = sys.modules.get("multiprocessing.process")
    return None if process is None else bytes(process.current_process().authkey)

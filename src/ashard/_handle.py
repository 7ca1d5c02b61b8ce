"""The parent side of one worker process: spawn, handshake, kill, reap.

Workers are fresh interpreters (``python -m ashard._worker``), never forks. `Popen`
runs on one long-lived thread: on Linux a worker asks for SIGKILL when its parent
*thread* exits, so that thread must live as long as the process does. The handshake
(HELLO -> READY) is awaited with a bound, so a broken interpreter fails fast.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from ashard._async_channel import Channel
from ashard._channel import ChannelClosed, encode, encode_many
from ashard._protocol import DROP, FORGET, HELLO, INIT_FAILED, INTERRUPT_SIGNAL, READY, Payload
from ashard._serialize import decode_exception
from ashard.errors import RemoteTraceback, WorkerStartError

if TYPE_CHECKING:
    from ashard._job import Chunk

START_TIMEOUT = 60.0
"""Seconds a new worker may take to import and run `init` before it counts as broken."""

_spawner: ThreadPoolExecutor | None = None
_live: weakref.WeakSet[WorkerHandle] = weakref.WeakSet()


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """How to start a worker: extra environment and an `init` callable (pickled)."""

    env: dict[str, str] = field(default_factory=dict)
    init: Payload | None = None


def _popen(child_fd: int, config: WorkerConfig) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(config.env)
    path = env.get("PYTHONPATH")
    package_root = str(Path(__file__).resolve().parent.parent)  # so `-m ashard._worker` works
    env["PYTHONPATH"] = package_root + (os.pathsep + path if path else "")
    # -u: user prints go straight out (no flush per result, nothing lost on a crash)
    cmd = [sys.executable, "-u", "-m", "ashard._worker", str(child_fd), str(os.getpid())]
    return subprocess.Popen(
        cmd, pass_fds=(child_fd,), stdin=subprocess.DEVNULL, cwd=os.getcwd(), env=env
    )


def _spawn_blocking(child_fd: int, config: WorkerConfig) -> subprocess.Popen[bytes]:
    global _spawner
    if _spawner is None:
        _spawner = ThreadPoolExecutor(1, thread_name_prefix="ashard-spawner")
    return _spawner.submit(_popen, child_fd, config).result()


class WorkerHandle:
    """One live worker: its process, channel and the chunks it holds."""

    def __init__(self, proc: subprocess.Popen[bytes], channel: Channel) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.channel = channel
        self.inflight: deque[Chunk] = deque()
        self.jobs: set[int] = set()
        self.forget: list[int] = []  # jobs the worker may drop
        self.segments: set[int] = set()  # shared-memory segments the worker holds
        self.drops: list[int] = []  # segments the worker should close
        self.last_heard = 0.0
        self.shards_done = 0
        self.started_at = time.monotonic()
        self.tasks = 0  # shards and calls handed to it (for max_tasks)
        self.busy = 0.0  # seconds spent running shards
        self.rss = self.peak_rss = self.baseline_rss = 0  # private memory, bytes
        self.idle_since = self.started_at
        self.recycle_reason: str | None = None  # replace it once its work is done
        self.end_reason: str | None = None  # why it ended, once it has
        self._ps: Any = None
        _live.add(self)

    def observe(self, rss: int) -> None:
        """Record a reading of the worker's private resident memory."""
        if rss > 0:
            self.rss = rss
            self.peak_rss = max(self.peak_rss, rss)

    def read_rss(self) -> int:
        """Private resident memory (RSS minus shared pages) read with psutil; 0 if the
        process is gone. Blocking (a /proc read): call it off the event loop."""
        import psutil

        try:
            if self._ps is None:
                self._ps = psutil.Process(self.pid)
            info = self._ps.memory_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return 0
        return int(info.rss - getattr(info, "shared", 0))

    @classmethod
    async def start(cls, config: WorkerConfig) -> WorkerHandle:
        """Spawn a worker and wait until it reports ready."""
        parent_sock, child_sock = socket.socketpair()
        try:
            proc = await anyio.to_thread.run_sync(_spawn_blocking, child_sock.fileno(), config)
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        handle = cls(proc, Channel(parent_sock))
        try:
            await handle._handshake(config)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await handle.kill()
            raise
        return handle

    async def _handshake(self, config: WorkerConfig) -> None:
        try:
            with anyio.fail_after(START_TIMEOUT):
                await self.channel.send(encode((HELLO, list(sys.path), config.init)))
                reply = (await self.channel.receive())[0]
        except TimeoutError:
            raise WorkerStartError(
                f"worker {self.pid} did not start within {START_TIMEOUT:.0f} s"
            ) from None
        except ChannelClosed:
            code = await self.wait_exit(5.0)
            raise WorkerStartError(
                f"worker {self.pid} exited with code {code} before it was ready; "
                "its stderr above says why"
            ) from None
        if reply[0] == INIT_FAILED:
            exc = decode_exception(reply[1])
            exc.__cause__ = RemoteTraceback(reply[1][3])
            raise WorkerStartError(f"init failed in worker {self.pid}: {exc!r}") from exc
        if reply[0] != READY:
            raise WorkerStartError(f"worker {self.pid} sent {reply[0]!r} instead of READY")
        self.baseline_rss = reply[2]
        self.observe(reply[2])

    def take_control(self) -> list[Any]:
        """The FORGET and DROP messages that wait for the next send to this worker."""
        msgs: list[Any] = [(FORGET, k) for k in self.forget]
        if self.drops:
            msgs.append((DROP, self.drops))
        self.forget, self.drops = [], []
        return msgs

    def flush_control(self) -> None:
        """Send waiting FORGET/DROP messages now, unless a send is under way (then they
        go with the next one): an idle worker should not hold memory of a finished call."""
        if (self.forget or self.drops) and self.proc.returncode is None:
            msgs = self.take_control()
            if not self.channel.post(encode_many(msgs)):
                self.forget = [m[1] for m in msgs if m[0] == FORGET] + self.forget
                self.drops = [i for m in msgs if m[0] == DROP for i in m[1]] + self.drops

    def drop_segment(self, seg_id: int) -> None:
        """The parent closed segment `seg_id`: the worker should close it too."""
        if seg_id in self.segments:
            self.segments.discard(seg_id)
            self.drops.append(seg_id)
            self.flush_control()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None and not self.channel.broken

    def interrupt(self) -> None:
        """Ask the worker to stop the shard it runs (it checks control messages)."""
        self._signal(INTERRUPT_SIGNAL)

    def signal(self, signum: int) -> None:
        """Send `signum` to the worker if it has not been reaped."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    _signal = signal

    def reap(self, timeout: float) -> bool:
        """Wait (blocking: not on the event loop) for the process to exit."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        _live.discard(self)
        return True

    async def wait_exit(self, timeout: float) -> int | None:
        """The exit status (negative: killed by that signal), polled without blocking;
        None if the process still runs after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        delay = 0.001
        while (code := self.proc.poll()) is None and time.monotonic() < deadline:
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return code

    async def kill(self) -> int:
        """SIGKILL the worker and reap it; returns the exit status."""
        self._signal(signal.SIGKILL)
        self.channel.close()
        code = await self.wait_exit(10.0)
        _live.discard(self)
        return code if code is not None else -signal.SIGKILL

    async def stop(self, grace: float) -> None:
        """Ask the worker to exit (EOF on its channel); kill it after `grace` seconds."""
        self.channel.close()
        if await self.wait_exit(grace) is None:
            await self.kill()
        _live.discard(self)

    def exit_info(self) -> tuple[int | None, int | None]:
        """(exitcode, signal) once the process has ended."""
        code = self.proc.returncode
        if code is None:
            return None, None
        if code < 0:
            return None, -code
        return code, None

    def __repr__(self) -> str:
        return f"<WorkerHandle pid={self.pid} inflight={len(self.inflight)}>"


def kill_all_now() -> None:
    """At interpreter exit: no worker may outlive the parent."""
    handles = list(_live)
    for h in handles:
        h.channel.close()
    deadline = time.monotonic() + 1.0
    for h in handles:
        try:
            h.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            h.proc.kill()
            h.proc.wait()

"""A worker's output, written where the caller's output goes.

A worker's fds 1 and 2 are pipes to the parent (never the parent's own terminal), so
whatever `fn` prints - from Python or C - is read here and written, whole lines at a
time, to `sys.stdout` / `sys.stderr` as the task that made the call sees them: the
writes happen in that task's context (a job's drive or pump task, a call's own task),
which is what `contextlib.redirect_stdout` and ipykernel (output in the cell that
launched the work, fd capture on or off) go by. Calls queued on one worker are told
apart by the marker the worker writes before each (`marker`): `pull` reads and splits,
`take` hands a call its share. A call's reader waits on `WorkerOutput.fileno()`, which
is readable when the channel or a pipe is, so a call printing more than a pipe holds is
read while it runs instead of blocking its worker. What a worker prints while no call
holds it (its start, `init`) goes to the parent's streams of the moment.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import select
import sys
from collections.abc import Callable
from typing import IO, Any

import anyio

__all__ = ["WorkerOutput", "ended", "marker", "redirect", "write_taken", "write_text"]

_redirect: contextvars.ContextVar[Callable[[str, str], None] | None] = contextvars.ContextVar(
    "ashard_output", default=None
)

_READ = 1 << 16
_MARK = b"\x00ashard-call:" + os.urandom(12)
"""The start of every call marker: random per parent process, so no output can fake one."""
_SEQ = 8
_MARKER_SIZE = len(_MARK) + _SEQ
_MAX_PARTIAL = 1 << 20
"""A line longer than this is written in pieces rather than held back."""


class WorkerOutput:
    """The parent's ends of one worker's stdout and stderr pipes."""

    def __init__(self, stdout: IO[bytes] | None, stderr: IO[bytes] | None) -> None:
        self._files = [f for f in (stdout, stderr) if f is not None]
        self.fds = [f.fileno() for f in self._files]
        self._names = ["stdout" if f is stdout else "stderr" for f in self._files]
        for fd in self.fds:
            os.set_blocking(fd, False)
        self._partial = [b"" for _ in self.fds]
        self._held: list[list[tuple[int | None, bytes]]] = [[] for _ in self.fds]
        self.eof = [False for _ in self.fds]
        self._ready = _Readiness()  # the pipes and `watch`ed descriptors
        for fd in self.fds:
            self._ready.register(fd)
        self.closed = False

    def fileno(self) -> int | None:
        """A descriptor readable while a pipe has something to read (or has ended) or a
        `watch`ed descriptor is readable: what a call waiting for its answer waits on,
        so that a worker blocked on a full pipe is read while its call runs (-1 once
        closed; None without epoll: then the pipes are read only with answers)."""
        return -1 if self.closed else self._ready.fileno()

    def watch(self, fd: int) -> None:
        """Make `fileno()` readable whenever `fd` is too (the worker's channel)."""
        self._ready.register(fd)

    def wake_waiters(self) -> None:
        """Wake whoever waits on `fileno()` (the watched channel was closed)."""
        fd = self.fileno()
        if fd is not None and fd >= 0:
            with contextlib.suppress(Exception):  # no event loop at interpreter exit
                anyio.notify_closing(fd)

    def pull(self) -> bool:
        """Read what the pipes hold now and keep it for the calls it belongs to (`take`):
        after each batch of answers, and whenever `fileno()` was readable. True if it
        read anything."""
        if self.closed:
            return False
        ready = self._ready.ready()
        read = False
        for i, fd in enumerate(self.fds):
            partial = self._partial[i]
            if partial or fd in ready:
                data = self._read_all(i, fd)
                if partial:
                    data, self._partial[i] = partial + data, b""
                if data:
                    _split(data, self._held[i])
                    read = True
        return read

    def take(self, seq: int) -> list[tuple[str, bytes]]:
        """What call `seq`, the oldest this worker has not answered, wrote, as far as
        `pull` read: everything up to the marker of a later call (kept for that call), as
        ``(stream name, bytes)``."""
        taken: list[tuple[str, bytes]] = []
        for i, held in enumerate(self._held):
            if mine := _own(held, seq):
                taken.append((self._names[i], mine))
        return taken

    def take_lines(self, seq: int) -> list[tuple[str, bytes]]:
        """Of what `take(seq)` would give now, the whole lines: call `seq` still runs,
        and what it printed so far is written as it comes rather than held."""
        taken: list[tuple[str, bytes]] = []
        for i, held in enumerate(self._held):
            mine = _own(held, seq)
            cut = mine.rfind(b"\n") + 1
            if len(mine) - cut > _MAX_PARTIAL:
                cut = len(mine)
            if cut < len(mine):
                held.insert(0, (seq, mine[cut:]))
            if cut:
                taken.append((self._names[i], mine[:cut]))
        return taken

    def _read_all(self, i: int, fd: int) -> bytes:
        data = b""
        while True:
            try:
                chunk = os.read(fd, _READ)
            except (BlockingIOError, InterruptedError):
                return data
            except OSError:
                chunk = b""  # unreadable: as good as ended (or `fileno()` never rests)
            if not chunk:
                if not self.eof[i]:
                    self.eof[i] = True
                    self._ready.unregister(fd)
                return data
            data += chunk
            if len(chunk) < _READ:  # a pipe's read takes all it holds
                return data

    def drain(self, *, final: bool = False, cut_short: bool = False) -> None:
        """Write every complete line read so far to the caller's streams (`final`: the
        rest too; `cut_short`: the worker died, so a last line it did not end is ended
        here, and what another worker prints next starts a line of its own)."""
        if self.closed:
            return
        for i, fd in enumerate(self.fds):
            held = self._held[i]
            data = self._partial[i] + self._read_all(i, fd)
            if data:
                _split(data, held)  # (a call's marker is never output)
            data = b"".join(part for _, part in held)
            held.clear()
            if not data:
                continue
            cut = data.rfind(b"\n") + 1
            if final or len(data) - cut > _MAX_PARTIAL:
                cut = len(data)
            if cut_short and cut == len(data) and not data.endswith(b"\n"):
                data += b"\n"
                cut += 1
            if cut:
                _write(self._names[i], data[:cut])
            self._partial[i] = data[cut:]

    def open_fds(self) -> list[int]:
        """The pipes not yet at end of file (for tasks waiting to drain them)."""
        return [fd for fd, eof in zip(self.fds, self.eof, strict=True) if not eof]

    def disown(self) -> None:
        """Close this process's descriptors of the pipes, writing nothing (a forked
        child's copies)."""
        self.closed = True
        self._ready.close()
        for f in self._files:
            with contextlib.suppress(OSError):
                f.close()

    def close(self, *, cut_short: bool = False) -> None:
        """Write what is left and close the pipes (`cut_short`: as in `drain`)."""
        if self.closed:
            return
        self.drain(final=True, cut_short=cut_short)
        self.wake_waiters()
        self.closed = True
        self._ready.close()
        for f in self._files:
            with contextlib.suppress(OSError):
                f.close()


class _Readiness:
    """Which of a set of descriptors are readable: an epoll set, itself a descriptor to
    wait on (Linux); `select.poll` elsewhere, with nothing to wait on."""

    def __init__(self) -> None:
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self._poll = select.poll() if self._epoll is None else None

    def fileno(self) -> int | None:
        return None if self._epoll is None else self._epoll.fileno()

    def register(self, fd: int) -> None:
        if self._epoll is not None:
            self._epoll.register(fd, select.EPOLLIN)
        elif self._poll is not None:
            self._poll.register(fd, select.POLLIN)

    def unregister(self, fd: int) -> None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            if self._epoll is not None:
                self._epoll.unregister(fd)
            elif self._poll is not None:
                self._poll.unregister(fd)

    def ready(self) -> set[int]:
        """The registered descriptors readable now (one system call)."""
        if self._epoll is not None:
            return {fd for fd, _ in self._epoll.poll(0)}
        return {fd for fd, _ in self._poll.poll(0)} if self._poll is not None else set()

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()


def marker(seq: int) -> bytes:
    """What a worker writes to fds 1 and 2 where the output of call `seq` begins."""
    return _MARK + seq.to_bytes(_SEQ, "little", signed=True)


def _own(held: list[tuple[int | None, bytes]], seq: int) -> bytes:
    """Take the pieces of call `seq` (None: the oldest unanswered call's) off the front
    of `held`."""
    parts: list[bytes] = []
    while held and held[0][0] in (None, seq):
        parts.append(held.pop(0)[1])
    return b"".join(parts)


def _split(data: bytes, held: list[tuple[int | None, bytes]]) -> None:
    """Append `data` to `held` as pieces owned by calls: what comes before a marker
    belongs to the owner of the last piece (None: the oldest unanswered call). A marker
    always starts a piece, empty or not: what comes after it later is that call's."""
    if len(data) == _MARKER_SIZE and data.startswith(_MARK):  # a call that wrote nothing
        held.append((int.from_bytes(data[-_SEQ:], "little", signed=True), b""))
        return
    owner = held[-1][0] if held else None
    start = 0
    while (at := data.find(_MARK, start)) >= 0 and at + len(_MARK) + _SEQ <= len(data):
        if at > start:
            held.append((owner, data[start:at]))
        seq_at = at + len(_MARK)
        owner = int.from_bytes(data[seq_at : seq_at + _SEQ], "little", signed=True)
        start = seq_at + _SEQ
        held.append((owner, b""))
    if start < len(data):
        held.append((owner, data[start:]))


def ended(taken: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """What `take` gave a call whose worker died, each stream's last line ended."""
    return [(name, data if data.endswith(b"\n") else data + b"\n") for name, data in taken]


def write_taken(taken: list[tuple[str, bytes]]) -> None:
    """Write what `WorkerOutput.take` returned, in this context."""
    for name, data in taken:
        _write(name, data)


def redirect(to: Callable[[str, str], None]) -> None:
    """In this context (and the tasks it starts), worker lines go to ``to(name, text)``
    instead of `sys.stdout` / `sys.stderr`: a cluster node sends them to the caller."""
    _redirect.set(to)


def _write(name: str, data: bytes) -> None:
    write_text(name, data.decode("utf-8", errors="backslashreplace"))


def write_text(name: str, text: str) -> None:
    """Whole lines of a worker's stream `name` ("stdout" or "stderr"), written where
    this context's output goes."""
    to = _redirect.get()
    if to is not None:
        to(name, text)
        return
    stream: Any = getattr(sys, name, None)
    if stream is None:
        return
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError):  # the caller's stream is closed or broken: drop it
        pass

"""A worker's output, written where the caller's output goes.

A worker's fds 1 and 2 are pipes to the parent (never the parent's own terminal), so
whatever `fn` prints - from Python or C - is read here and written, whole lines at a
time, to `sys.stdout` / `sys.stderr` as the task that made the call sees them: the
writes happen in that task's context (a job's drive or pump task, a call's own task),
which is what `contextlib.redirect_stdout` and ipykernel (output in the cell that
launched the work, fd capture on or off) go by. Each worker serves one call at a
time, so lines of concurrent calls never mix. What a worker prints while no call
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

__all__ = ["WorkerOutput", "redirect", "write_text"]

_redirect: contextvars.ContextVar[Callable[[str, str], None] | None] = contextvars.ContextVar(
    "ashard_output", default=None
)

_READ = 1 << 16
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
        self.eof = [False for _ in self.fds]
        self._poll = select.poll()
        for fd in self.fds:
            self._poll.register(fd, select.POLLIN | select.POLLHUP)
        self.closed = False

    def pending(self) -> bool:
        """Is anything waiting in the pipes (one `poll`, no waiting)?"""
        return not self.closed and bool(self._poll.poll(0))

    def drain(self, *, final: bool = False) -> None:
        """Write every complete line read so far to the caller's streams (`final`: the
        rest too, with no newline of its own)."""
        if self.closed:
            return
        for i, fd in enumerate(self.fds):
            data = self._partial[i]
            while True:
                try:
                    chunk = os.read(fd, _READ)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                if not chunk:
                    if not self.eof[i]:
                        self.eof[i] = True
                        self._poll.unregister(fd)
                    break
                data += chunk
            if not data:
                continue
            cut = data.rfind(b"\n") + 1
            if final or len(data) - cut > _MAX_PARTIAL:
                cut = len(data)
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
        for f in self._files:
            with contextlib.suppress(OSError):
                f.close()

    def close(self) -> None:
        """Write what is left and close the pipes."""
        if self.closed:
            return
        self.drain(final=True)
        self.closed = True
        for f in self._files:
            with contextlib.suppress(OSError):
                f.close()


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

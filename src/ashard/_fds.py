"""File descriptors 0, 1 and 2 belong to standard I/O and nothing else.

A process that closed one of them gets it back from the next `open`, `socketpair` or
`memfd_create` — and a print then lands in a channel or in shared memory. So every
descriptor ashard makes is moved above 2 (`above_stdio`), and a worker checks its
standard descriptors after user code ran, before it does anything else, restoring
any that `fn` closed or replaced (`StdioGuard`).
"""

from __future__ import annotations

import fcntl
import os
import sys
from typing import Any

__all__ = ["StdioGuard", "above_stdio"]

_STDIO = (0, 1, 2)


def above_stdio(fd: int) -> int:
    """`fd`, or a close-on-exec duplicate of it numbered 3 or above (the original is
    closed) when it took the number of a closed standard descriptor."""
    if fd > 2:
        return fd
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return high


def _identity(fd: int) -> tuple[int, int]:
    try:
        st = os.fstat(fd)
    except OSError:
        return (-1, -1)
    return st.st_dev, st.st_ino


class StdioGuard:
    """A worker's standard descriptors and streams as they were at start, and `check`,
    which puts back whatever user code closed or replaced."""

    def __init__(self) -> None:
        for fd in _STDIO:  # started with one closed: give it /dev/null
            if _identity(fd) == (-1, -1):
                null = os.open(os.devnull, os.O_RDWR)
                if null != fd:
                    os.dup2(null, fd)
                    os.close(null)
        self._saved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in _STDIO]
        self._ids = [_identity(fd) for fd in _STDIO]
        self._stdout: Any = sys.stdout
        self._stderr: Any = sys.stderr

    def check(self) -> None:
        """Restore descriptors 0-2 and `sys.stdout` / `sys.stderr` if they changed. It
        runs after every chunk, so the common case is two fstat and a fcntl (~3 us):
        stdin is only checked for being open (replacing it sends no output anywhere)."""
        if not self._unchanged():
            for fd in _STDIO:
                if _identity(fd) != self._ids[fd]:
                    os.dup2(self._saved[fd], fd, inheritable=True)
            sys.stdout = self._stdout = self._usable(self._stdout, 1)
            sys.stderr = self._stderr = self._usable(self._stderr, 2)

    def _unchanged(self) -> bool:
        try:
            out, err = os.fstat(1), os.fstat(2)
            fcntl.fcntl(0, fcntl.F_GETFD)
        except OSError:
            return False
        ids = self._ids
        return (
            (out.st_dev, out.st_ino) == ids[1]
            and (err.st_dev, err.st_ino) == ids[2]
            and sys.stdout is self._stdout  # ours, so .closed is a plain attribute
            and sys.stderr is self._stderr
            and not self._stdout.closed
            and not self._stderr.closed
        )

    @staticmethod
    def _usable(stream: Any, fd: int) -> Any:
        """`stream`, or a new one on `fd` if it was closed."""
        if not _closed(stream):
            return stream
        return os.fdopen(os.dup(fd), "w", buffering=1, errors="backslashreplace")


def _closed(stream: Any) -> bool:
    try:
        return bool(stream.closed)
    except Exception:
        return True

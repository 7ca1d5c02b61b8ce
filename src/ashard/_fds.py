"""File descriptors 0, 1 and 2 belong to standard I/O and nothing else.

A process that closed one of them gets it back from the next `open`, `socketpair` or
`memfd_create` — and a print then lands in a channel or in shared memory. So every
descriptor ashard makes is moved above 2 (`above_stdio`), and a worker checks its
standard descriptors after user code ran, before it does anything else, restoring
any that `fn` closed or replaced (`StdioGuard`).
"""

from __future__ import annotations

import contextlib
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


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class StdioGuard:
    """A worker's standard descriptors and streams as they were at start, and `check`,
    which puts back whatever user code closed or replaced."""

    def __init__(self) -> None:
        for fd in _STDIO:  # started with one closed: give it /dev/null
            if _identity(fd) is None:
                null = os.open(os.devnull, os.O_RDWR)
                if null != fd:
                    os.dup2(null, fd)
                    os.close(null)
        self._saved = {fd: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in _STDIO}
        self._ids = {fd: _identity(fd) for fd in _STDIO}
        self._streams: dict[str, Any] = {"stdout": sys.stdout, "stderr": sys.stderr}

    def check(self) -> None:
        """Restore descriptors 0-2 and `sys.stdout` / `sys.stderr` if they changed."""
        for fd in _STDIO:
            if _identity(fd) != self._ids[fd]:
                os.dup2(self._saved[fd], fd, inheritable=True)
        for name, stream in self._streams.items():
            current = getattr(sys, name)
            if current is not stream or _closed(stream):
                setattr(sys, name, self._reopen(name, stream))

    def _reopen(self, name: str, stream: Any) -> Any:
        if not _closed(stream):
            return stream
        fd = 1 if name == "stdout" else 2
        fresh = os.fdopen(os.dup(fd), "w", buffering=1, errors="backslashreplace")
        self._streams[name] = fresh
        return fresh


def _closed(stream: Any) -> bool:
    with contextlib.suppress(Exception):
        return bool(stream.closed)
    return True

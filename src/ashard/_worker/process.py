"""Setting up the worker process, apart from the messages it serves.

At start (`set_up`): die with the parent, line-buffer C's stdio, leave Ctrl-C to the
parent, keep fds 0-2 for `StdioGuard` to restore, dump tracebacks on a fatal signal.
On HELLO (`configure`): the parent's sys.path, its multiprocessing authkey, and the
memory watch that stops the worker at its limit. `private_rss` is the worker's memory
as it reports it to the parent.
"""

from __future__ import annotations

import ctypes
import faulthandler
import importlib.util
import os
import signal
import sys
import threading
import time
from typing import Any

from ashard._fds import StdioGuard
from ashard._priority import lower
from ashard._protocol import DUMP_SIGNAL, EXIT_OVER_MEMORY, Hello

__all__ = [
    "MEMORY_WATCH_SECONDS",
    "configure",
    "peak_growth",
    "peak_start",
    "private_rss",
    "set_up",
    "stack_dump_fd",
]


def set_up(parent_pid: int) -> StdioGuard:
    """Make this process a worker of `parent_pid`; the guard of its fds 0-2."""
    _die_with_parent(parent_pid)
    _line_buffer_c_stdio()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    stdio = StdioGuard()
    faulthandler.enable()  # after the guard: fd 2 is open by now
    return stdio


def configure(hello: Hello) -> None:
    """Take what HELLO asks of the process (the job of `init` is the loop's)."""
    _renice(hello.nice)  # first: the threads started from here on inherit it
    sys.path[:] = hello.sys_path
    if hello.authkey is not None:
        _share_mp_authkey(hello.authkey)
    if hello.memory_limit is not None:
        _watch_memory(hello.memory_limit)


def _renice(by: int) -> None:
    """Run `by` steps of niceness below the parent (whose value the worker inherited),
    every thread of it: Linux keeps a nice value per thread."""
    if by <= 0:
        return
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: the value is the process's
        threads = [0]
    for tid in threads:
        lower(tid, by)


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _line_buffer_c_stdio() -> None:
    """C's stdout to a pipe is block-buffered: a `printf` in an extension would reach the
    parent only when the worker exits. Line-buffer it, as on a terminal."""
    try:
        libc = ctypes.CDLL(None)
        for name in ("stdout", "stderr"):
            libc.setvbuf(ctypes.c_void_p.in_dll(libc, name), None, 1, 0)  # 1: _IOLBF
    except (OSError, ValueError, AttributeError):
        pass


def _share_mp_authkey(key: bytes) -> None:
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
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader, key = spec.loader, self.key
        from importlib.abc import Loader  # only when multiprocessing is imported

        class _Loader(Loader):
            def create_module(self, spec: Any) -> Any:
                return loader.create_module(spec)

            def exec_module(self, module: Any) -> None:
                loader.exec_module(module)
                module.current_process().authkey = key

        spec.loader = _Loader()
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


def stack_dump_fd() -> int | None:
    """A memfd that faulthandler writes every thread's stack to on `DUMP_SIGNAL` (from C:
    it works while the interpreter is stuck in C code), sent to the parent; None if
    one cannot be made."""
    try:
        fd = os.memfd_create("ashard.stack", os.MFD_CLOEXEC)  # not a data segment (ashard-*)
        faulthandler.register(DUMP_SIGNAL, file=fd, all_threads=True, chain=False)
    except (AttributeError, OSError, RuntimeError, ValueError):
        return None
    return fd


def peak_start() -> int:
    """Start measuring a peak: reset the kernel's high-water mark of this process's
    resident memory (VmHWM) and return its private (anonymous) memory now, bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status().get("RssAnon", 0)
    except OSError:
        return 0


def peak_growth(start: int) -> int:
    """How far private memory rose above `start` since `peak_start`: the high-water
    mark less the file and shared pages resident now (borrowed shared memory is no
    shard's own), bytes; 0 where it cannot be read."""
    status = _status()
    if "VmHWM" not in status:
        return 0
    own = status["VmHWM"] - status.get("RssFile", 0) - status.get("RssShmem", 0)
    return max(0, own - start)


def _status() -> dict[str, int]:
    """The kB fields of /proc/self/status, in bytes."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                parts = value.split()
                if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
                    fields[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return fields


MEMORY_WATCH_SECONDS = 0.005
"""How often a worker with a memory limit reads its private memory."""


def _watch_memory(limit: int) -> None:
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

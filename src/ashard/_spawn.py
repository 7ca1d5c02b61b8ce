"""How a worker process is launched: a fresh interpreter, ``python -m ashard._worker``.

`Popen` runs on one long-lived thread: on Linux a worker asks for SIGKILL when its
parent *thread* exits, so that thread must live as long as the process does. Each
worker leads a process group of its own: what its shards start (and fork) stays in it,
and ends with it (`WorkerHandle.poll`).

`prestart` launches one worker ahead of need. The first call on the default pool does
it before it imports the supervisor, so that the worker's interpreter starts while
the parent loads the rest of ashard (on a cold start the two are most of the time to
the first result). The next worker start with the default environment `take`s it; the
call `discard`s it if nobody did (bad arguments, say). This module imports nothing of
the supervisor, so that it can run first.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor

from ashard._fds import above_stdio

_spawner: ThreadPoolExecutor | None = None
_Launched = Future[subprocess.Popen[bytes]]
_ahead: tuple[int, _Launched, socket.socket] | None = None
_lock = threading.RLock()  # first calls may come from several threads (ashard.sync)


def _after_fork_in_child() -> None:
    """The spawner thread, the worker launched ahead and the lock are the parent's."""
    global _spawner, _ahead, _lock
    if _ahead is not None:
        _ahead[2].close()  # this process's copy of the parent's end
    _spawner, _ahead, _lock = None, None, threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _popen(child_fd: int, env_extra: Mapping[str, str]) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(env_extra)
    path = env.get("PYTHONPATH")
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = package_root + (os.pathsep + path if path else "")  # for `-m`
    # -u: user prints go straight out (no flush per result, nothing lost on a crash)
    cmd = [sys.executable, "-u", "-m", "ashard._worker", str(child_fd), str(os.getpid())]
    return subprocess.Popen(
        cmd, pass_fds=(child_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, cwd=_cwd(), env=env, process_group=0,
    )  # fmt: skip


def _cwd() -> str | None:
    """The caller's working directory; None (the worker inherits it) if it was removed:
    a process may go on in a removed directory, and so may its workers."""
    try:
        return os.getcwd()
    except FileNotFoundError:
        return None


def _above_stdio(sock: socket.socket) -> socket.socket:
    """`sock`, numbered 3 or above (a worker's channel must never be its stdout)."""
    if sock.fileno() > 2:
        return sock
    return socket.socket(fileno=above_stdio(sock.detach()))


def _submit(parent: socket.socket, child: socket.socket, env_extra: Mapping[str, str]) -> _Launched:
    global _spawner
    with _lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(1, thread_name_prefix="ashard-spawner")

    def launch() -> subprocess.Popen[bytes]:
        try:
            return _popen(child.fileno(), env_extra)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()

    return _spawner.submit(launch)


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """The parent's and the worker's ends of a new channel, both above stdio."""
    parent, child = socket.socketpair()
    return _above_stdio(parent), _above_stdio(child)


def spawn_blocking(
    parent: socket.socket, child: socket.socket, env_extra: Mapping[str, str]
) -> subprocess.Popen[bytes]:
    """Launch a worker on the spawner thread and wait for `Popen` (off the loop).
    Closes `child` in any case, and `parent` if the launch fails."""
    return _submit(parent, child, env_extra).result()


def prestart() -> None:
    """Launch one worker with the default environment ahead of need (once)."""
    global _ahead
    with _lock:
        if _ahead is not None and _ahead[0] == os.getpid():
            return
        parent, child = socket_pair()
        _ahead = (os.getpid(), _submit(parent, child, {}), parent)


def take(
    env_extra: Mapping[str, str],
) -> tuple[Future[subprocess.Popen[bytes]], socket.socket] | None:
    """The worker launched ahead, if there is one for this environment."""
    global _ahead
    with _lock:
        if env_extra or _ahead is None or _ahead[0] != os.getpid():
            return None
        _, launched, parent = _ahead
        _ahead = None
    return launched, parent


def discard() -> Future[None] | None:
    """End the worker launched ahead if nobody took it; the future is done once it has
    been reaped."""
    ahead = take({})
    if ahead is None:
        return None
    launched, parent = ahead
    parent.close()

    def end() -> None:
        try:
            proc = launched.result()
        except BaseException:
            return
        proc.kill()
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()

    assert _spawner is not None
    return _spawner.submit(end)

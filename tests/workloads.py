"""Functions the tests run on workers. They live in an importable module, as user code
usually does; tests of closures, lambdas and `__main__` functions build their own."""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import gc
import logging
import os
import random
import signal
import sys
import time
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np

from ashard import Shard


def square(x: int) -> int:
    return x * x


def shard_sum(shard: Shard) -> int:
    return int(sum(shard.idx))


def shard_ids(shard: Shard) -> tuple[int, list[int]]:
    return shard.id, list(shard.idx)


def shard_sum_taking_any(shard: Shard, **borrowed: Any) -> int:
    """`shard_sum`, taking whatever is borrowed."""
    return int(sum(shard.idx))


def identity_taking_any(x: Any, **borrowed: Any) -> Any:
    return x


def shard_items(shard: Shard) -> Any:
    return shard.items


def items_described(shard: Shard) -> tuple[str, list[Any]]:
    """The type of the shard's items, and the items (arrays as lists)."""
    return type(shard.items).__name__, [
        x.tolist() if isinstance(x, np.ndarray) else x for x in shard.items
    ]


def args_seen(*args: Any, **kwargs: Any) -> tuple[list[str], bool, list[Any], dict[str, Any]]:
    """A call's arguments as its function got them: their types, whether the first two
    are one object, and the arguments themselves."""
    values = (*args, *kwargs.values())
    alias = len(args) > 1 and args[0] is args[1]
    return [type(v).__name__ for v in values], alias, list(args), kwargs


def borrowed_seen(shard: Shard, **borrowed: Any) -> tuple[dict[str, str], list[Any]] | None:
    """What shard 0 was lent: each object's type, and the entries of the one named "d"
    in their order (None from the other shards)."""
    if shard.id != 0:
        return None
    return {name: type(v).__name__ for name, v in borrowed.items()}, list(borrowed["d"].items())


def pid_of(shard: Shard) -> int:
    return os.getpid()


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def attempt_of(shard: Shard) -> int:
    return shard.attempt


def sleep_shard(shard: Shard, seconds: float = 0.05) -> int:
    time.sleep(seconds)
    return shard.id


def busy(seconds: float) -> float:
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        x += 1
    return seconds


def fail_on(shard: Shard, bad: int = 3) -> int:
    if shard.id == bad:
        raise ValueError(f"shard {shard.id} is bad")
    return shard.id


class CustomError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"custom failure {code}")
        self.code = code


class UnpicklableError(Exception):
    def __reduce__(self) -> Any:
        raise TypeError("this exception refuses to be pickled")


def raise_custom(shard: Shard) -> None:
    raise CustomError(shard.id)


def raise_unpicklable(shard: Shard) -> None:
    raise UnpicklableError("cannot travel")


def die(how: str) -> None:
    """End the calling worker process the way `how` says."""
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "exit":
        os._exit(3)
    elif how == "segfault":
        ctypes.string_at(0)
    elif how == "hang":
        signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals))
        time.sleep(3600)
    elif how == "oom":
        blocks = []
        while True:  # the test caps the address space, so this ends in MemoryError or a kill
            blocks.append(np.ones(1 << 27, dtype=np.uint8))
    raise AssertionError(how)


def write_then_die(text: str) -> None:
    """Write `text` to fd 1 with no newline, then die by SIGKILL."""
    os.write(1, text.encode())
    die("sigkill")


def cut_short_first_attempt(shard: Shard) -> int:
    """Attempt 1: write part of a line, then die; later attempts print a whole one."""
    if shard.attempt == 1:
        write_then_die("cut sh")
    print(f"attempt {shard.attempt}")
    return shard.id


def die_first_attempt(shard: Shard, how: str = "sigkill", victim: int = 2) -> int:
    if shard.id == victim and shard.attempt == 1:
        die(how)
    return shard.id * 10


def items_dying_first_attempt(shard: Shard, victim: int = 2) -> Any:
    """Shard `victim`'s first run dies; every run returns the items it was given."""
    if shard.id == victim and shard.attempt == 1:
        die("sigkill")
    return list(shard.items)


def die_always(shard: Shard, how: str = "sigkill", victim: int = 2) -> int:
    if shard.id == victim:
        die(how)
    return shard.id * 10


def random_draws(shard: Shard) -> tuple[list[float], float, float]:
    assert shard.rng is not None
    return shard.rng.random(3).tolist(), random.random(), float(np.random.random())


def random_draws_crash_once(shard: Shard) -> tuple[list[float], float, float]:
    if shard.id == 1 and shard.attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return random_draws(shard)


def blocked_sleep(shard: Shard, victim: int = 1) -> int:
    """Shard `victim` sleeps with every signal blocked: only SIGKILL can stop it."""
    if shard.id == victim:
        signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL})
        time.sleep(60)
    return shard.id


def python_sleep(shard: Shard, victim: int = 1) -> int:
    if shard.id == victim:
        time.sleep(60)
    return shard.id


def chatty(shard: Shard) -> int:
    for i in range(50):
        print(f"chatty {shard.id} line {i}", flush=(i % 7 == 0))
    os.write(1, b"raw bytes straight to fd 1 \x00\xff\n")
    os.write(2, b"raw bytes straight to fd 2\n")
    return shard.id


def return_lock(shard: Shard) -> Any:
    import threading

    if shard.id == 1:
        return threading.Lock()
    return shard.id


def timestamps(x: int) -> tuple[int, float]:
    time.sleep(0.002)
    return x, time.monotonic()


def identity(x: Any) -> Any:
    return x


def die_first_attempt_sum(shard: Shard, X: np.ndarray, victim: int = 2) -> int:
    """The sum of the borrowed X; shard `victim` kills its worker on the first attempt."""
    if shard.id == victim and shard.attempt == 1:
        die("sigkill")
    return int(X.sum())


def sum_once_released(shard: Shard, X: np.ndarray, directory: str) -> int:
    """The sum of the borrowed X; shard 0's first attempt waits for ``release`` in
    `directory` (`waiting_here`), then kills its worker."""
    if shard.id == 0 and shard.attempt == 1:
        waiting_here(directory, "0")
        die("sigkill")
    return int(X.sum())


def shard_sum_plus(shard: Shard, offset: int, table: dict[str, int]) -> int:
    return sum(shard.idx) + offset + table["a"]


def misbehave(how: str) -> None:
    """`die(how)`, plus "hang-python" (a busy loop that signals can interrupt), "hang-c"
    (a sleep in C with every signal blocked: only SIGKILL ends it), "hostile" (bytes
    that are not a frame written into the channel, then carry on) and "memory"
    (allocate without end)."""
    if how == "hang-python":
        while True:
            pass
    if how == "hostile":
        os.write(channel_fd(), hostile_bytes("garbage"))
        return
    if how == "memory":  # touched pages, as fast as it can: the pool's mem_cap must stop it
        hoard = []
        while True:
            hoard.append(b"\x01" * (16 << 20))
    die("hang" if how == "hang-c" else how)


def misbehave_once(armed: str, how: str) -> None:
    """`misbehave(how)` in the one process that claims the marker file `armed` (renaming it
    is atomic: exactly one claim succeeds); every other call returns at once."""
    try:
        os.rename(armed, armed + ".claimed")
    except FileNotFoundError:
        return
    # a claim in the test process itself would kill pytest: refuse it loudly instead
    main = getattr(sys.modules["__main__"].__spec__, "name", "")
    assert main.startswith("ashard._worker"), f"claimed outside a worker, in {main!r}"
    misbehave(how)


def shard_misbehaving_once(shard: Shard, armed: str, how: str) -> int:
    """`shard.id * 10`; the first shard to run misbehaves (`misbehave_once`)."""
    misbehave_once(armed, how)
    return shard.id * 10


class UnpicklesBadlyOnce:
    """A borrowed object whose unpickling in a worker misbehaves once (`misbehave_once`)."""

    def __init__(self, armed: str, how: str) -> None:
        self.armed = armed
        self.how = how

    def __reduce__(self) -> Any:
        return _unpickle_badly_once, (self.armed, self.how)


def _unpickle_badly_once(armed: str, how: str) -> UnpicklesBadlyOnce:
    misbehave_once(armed, how)
    return UnpicklesBadlyOnce(armed, how)


def shard_times_ten(shard: Shard, **borrow: Any) -> int:
    return shard.id * 10


class PicklesBadlyOnce:
    """A result whose pickling misbehaves once (`misbehave_once`), then pickles as the int
    `value`."""

    def __init__(self, value: int, armed: str, how: str) -> None:
        self.value = value
        self.armed = armed
        self.how = how

    def __reduce__(self) -> Any:
        misbehave_once(self.armed, self.how)
        return int, (self.value,)


def shard_result_pickling_badly_once(shard: Shard, armed: str, how: str) -> PicklesBadlyOnce:
    """`shard.id * 10`, as a `PicklesBadlyOnce`."""
    return PicklesBadlyOnce(shard.id * 10, armed, how)


def channel_fd() -> int:
    """The worker's end of its channel (``python -m ashard._worker FD PARENT_PID``)."""
    return int(sys.argv[1])


def hostile_bytes(kind: str) -> bytes:
    """Bytes a broken worker might write into its channel, by `kind` of violation."""
    import pickle
    import struct

    from ashard import _framing

    def frame(payload: bytes, nbuf: int = 0, plen: int | None = None) -> bytes:
        size = len(payload) if plen is None else plen
        return struct.pack("<IIQ", _framing.MAGIC, nbuf, size) + payload

    if kind == "garbage":
        return b"this is not a frame at all, just noise on the channel " * 4
    if kind == "claims-1GiB":
        return frame(b"", plen=1 << 30)  # a header, then never the payload
    if kind == "over-limit":
        return frame(b"", plen=64 << 30)
    if kind == "many-buffers":
        return frame(b"", nbuf=(1 << 32) - 1, plen=10)
    if kind == "unknown-message":
        return frame(pickle.dumps(("hello", "parent"), protocol=5))
    if kind == "bad-pickle":
        return frame(b"\x80\x05this is no pickle")
    if kind == "stale-result":
        msg = (102, 10**9, 0, 0, (b"\x80\x05]\x94.", []), [], None, True, None, 0, None, None, 0)
        return frame(pickle.dumps(msg, protocol=5))
    if kind.startswith("array-"):  # a result claiming a 1 MiB array in a segment
        values = (pickle.dumps([None], protocol=5), [])
        arrays = [(0, "<f8", (1 << 17,), False)]
        msg = (102, 10**9, 0, 1, values, [], None, True, None, 0, None, arrays, 0)
        return frame(pickle.dumps(msg, protocol=5))
    raise AssertionError(kind)


def hostile_fds(kind: str) -> list[int]:
    """The descriptors that ride with `kind` of hostile bytes (the worker closes them)."""
    import fcntl

    if kind not in ("array-unsealed", "array-size-lie"):
        return []
    fd = os.memfd_create("ashard-result", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    if kind == "array-unsealed":
        os.ftruncate(fd, 1 << 20)  # the right size, but it could shrink under the parent
    else:
        os.ftruncate(fd, 4096)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return [fd]


def write_hostile_once(armed: str, kind: str) -> None:
    """In the one worker that claims `armed`, write `kind` of hostile bytes into the
    channel (then carry on as if nothing happened)."""
    try:
        os.rename(armed, armed + ".claimed")
    except FileNotFoundError:
        return
    import socket

    fds = hostile_fds(kind)
    with socket.socket(fileno=os.dup(channel_fd())) as sock:
        anc = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(np.array(fds, np.int32)))] if fds else []
        )
        sock.sendmsg([hostile_bytes(kind)], anc)
    for fd in fds:
        os.close(fd)


def shard_writing_hostile_once(shard: Shard, armed: str, kind: str) -> int:
    write_hostile_once(armed, kind)
    return shard.id * 10


class StrRaises(Exception):
    """An exception that cannot even say what it is."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ of StrRaises raised")


def raise_bad_str(shard: Shard) -> None:
    if shard.id == 1:
        raise StrRaises("hidden")


def _rebuild_fails() -> None:
    raise RuntimeError("cannot be rebuilt on this side")


class RebuildFails:
    """Pickles anywhere; unpickling it always raises."""

    def __reduce__(self) -> Any:
        return _rebuild_fails, ()


class ExitsWhenUnpickled:
    """Pickles anywhere; unpickling it raises SystemExit (in a worker, or the caller)."""

    def __reduce__(self) -> Any:
        return _exit_on_load, ()


def _exit_on_load() -> None:
    raise SystemExit("raised while unpickling")


def return_exiting_when_unpickled(_: Any = None) -> ExitsWhenUnpickled:
    return ExitsWhenUnpickled()


class RaisesWhenPickled:
    """Pickling it raises `exc_type` (SystemExit, KeyboardInterrupt, ...) in the worker."""

    def __init__(self, exc_type: type[BaseException]) -> None:
        self.exc_type = exc_type

    def __reduce__(self) -> Any:
        raise self.exc_type("raised while pickling the result")


def return_raising_when_pickled(exc_type: type[BaseException]) -> RaisesWhenPickled:
    return RaisesWhenPickled(exc_type)


def return_unrebuildable(x: Any) -> Any:
    return RebuildFails() if x == 13 else x


def die_once_then(armed: str, value: Any) -> Any:
    """SIGKILL the calling worker the first time (`armed` claimed), then return `value`."""
    misbehave_once(armed, "sigkill")
    return value


def hang_once_then(armed: str, value: Any) -> Any:
    misbehave_once(armed, "hang-c")
    return value


def sleep_in_python_once_then(armed: str, value: Any) -> Any:
    """A Python-level hang the first time (`armed` claimed): a timeout interrupts it and
    the worker lives on; then return `value` and the pid that returned it."""
    misbehave_once(armed, "hang-python")
    return value, os.getpid()


def refuse_channel_soon(delay: float = 0.2, linger: float = 30.0) -> int:
    """After `delay` s, shut this worker's channel for reading, so that the parent's
    next send fails, and keep the process alive but deaf for `linger` s (libc calls
    through `ctypes.PyDLL` keep the GIL: the main thread never sees the end of its
    channel and never exits): a worker that ended as far as the channel goes while its
    process still runs. Returns the worker's pid at once."""
    import ctypes
    import socket
    import stat
    import threading

    channels = [
        fd for fd in map(int, os.listdir("/proc/self/fd"))
        if fd > 2 and _is_socket(fd, stat)
    ]  # fmt: skip
    libc = ctypes.PyDLL(None)

    def refuse() -> None:
        time.sleep(delay)
        for fd in channels:  # from here on the GIL stays with this thread
            libc.shutdown(fd, socket.SHUT_RD)
        libc.sleep(int(linger))

    threading.Thread(target=refuse, daemon=True).start()
    return os.getpid()


def _is_socket(fd: int, stat: Any) -> bool:
    try:
        return bool(stat.S_ISSOCK(os.fstat(fd).st_mode))
    except OSError:
        return False


def append_line(log: str, line: str) -> None:
    """Append `line` to the file `log` in one write (O_APPEND: whole lines, whichever
    process writes)."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def logged_run(shard: Shard, log: str, victim: int = -1, armed: str = "") -> tuple[int, int]:
    """Append this run (shard id, attempt) to `log` (O_APPEND: whole lines), then return
    them; shard `victim` SIGKILLs its worker once (`armed`)."""
    append_line(log, f"{shard.id} {shard.attempt} {os.getpid()}\n")
    if shard.id == victim:
        misbehave_once(armed, "sigkill")
    time.sleep(0.003)
    return shard.id, shard.attempt


def break_stdio(shard: Shard, how: str) -> int:
    """Leave the worker's standard output broken the way `how` says."""
    if how == "close-fd1":
        os.close(1)
    elif how == "close-fd2":
        os.close(2)
    elif how == "replace-fd1":
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.close(fd)
    elif how == "close-sys-stdout":
        sys.stdout.close()
    return shard.id


def print_then_sum(shard: Shard, X: np.ndarray) -> int:
    print(f"line from shard {shard.id} " + "x" * 200)
    print(f"err from shard {shard.id}", file=sys.stderr)
    return int(X.sum())


def touch_sleep_touch(started: str, finished: str, seconds: float = 5.0) -> str:
    """Mark the start, sleep, mark the end: a run that was stopped never marks its end."""
    open(started, "w").close()
    time.sleep(seconds)
    open(finished, "w").close()
    return "finished"


def shard_touch_sleep_touch(shard: Shard, directory: str, seconds: float = 5.0) -> str:
    return touch_sleep_touch(
        os.path.join(directory, f"started-{shard.id}"),
        os.path.join(directory, f"done-{shard.id}"),
        seconds,
    )


# -- tables and results (test_tables.py) -------------------------------------------------


def write_rows(shard: Shard, rows: Any, times: int = 2) -> int:
    """Write `times` tables of this shard's ids (and the attempt) to `rows`."""
    for _ in range(times):
        rows.write(
            {"id": np.asarray(shard.idx, dtype=np.int64), "attempt": [shard.attempt] * len(shard)}
        )
    return shard.id


def write_then(
    shard: Shard, rows: Any, how: str = "sigkill", victim: int = 1, always: bool = False
) -> int:
    """Write rows, then (for `victim`, on its first attempt or `always`) fail as `how` says:
    die, hang past the timeout or raise."""
    write_rows(shard, rows)
    if shard.id == victim and (always or shard.attempt == 1):
        if how == "raise":
            raise ValueError("failed after writing")
        if how == "sleep":
            time.sleep(60)
        die(how)
    return shard.id


def write_rows_once_released(shard: Shard, rows: Any, directory: str) -> int:
    """Shard 0 waits for ``release`` in `directory` (`waiting_here`) before it writes."""
    if shard.id == 0:
        waiting_here(directory, "0")
    return write_rows(shard, rows)


def write_then_sleep(shard: Shard, rows: Any, quick: int = 2) -> int:
    """Shards below `quick` write and return at once; the others write, then sleep."""
    write_rows(shard, rows)
    if shard.id >= quick:
        time.sleep(60)
    return shard.id


def write_typed(shard: Shard, rows: Any, kind: str) -> int:
    """Write a table whose column `x` has a type chosen by `kind` (for shard 1 only,
    unless kind starts with "all-")."""
    import pyarrow as pa

    chosen = kind.removeprefix("all-") if kind.startswith("all-") or shard.id == 1 else "int64"
    columns: dict[str, Any] = {
        "int64": {"x": pa.array([1, 2], pa.int64())},
        "int32": {"x": pa.array([1, 2], pa.int32())},
        "float": {"x": pa.array([1.5, 2.0])},
        "string": {"x": pa.array(["a", "b"])},
        "extra": {"x": pa.array([1, 2], pa.int64()), "y": pa.array([1, 2])},
        "renamed": {"z": pa.array([1, 2], pa.int64())},
    }[chosen]
    rows.write(columns)
    return shard.id


def write_bad(shard: Shard, rows: Any) -> None:
    rows.write([1, 2, 3])


def write_when_told(shard: Shard, rows: Any = None, *, tag: int, started: str, go: str) -> int:
    """Mark `started`, wait (a minute at most) until the file `go` exists, then write a
    row that says `tag` to `rows` (if given) and return ``tag + shard.id``."""
    open(started, "a").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    if rows is not None:
        rows.write({"id": np.array([shard.id], dtype=np.int64), "tag": [tag]})
    return tag + shard.id


def write_empty(shard: Shard, rows: Any) -> int:
    """Shard 0 writes an empty table; shard 1 writes nothing; the others write a row."""
    if shard.id == 0:
        rows.write({"id": np.zeros(0, dtype=np.int64)})
    elif shard.id != 1:
        rows.write({"id": np.array([shard.id], dtype=np.int64)})
    return shard.id


def table_of(shard: Shard) -> Any:
    """A table of the shard's ids, or None for shard 1."""
    if shard.id == 1:
        return None
    return {"id": np.asarray(shard.idx, dtype=np.int64), "sq": np.asarray(shard.idx) ** 2}


def blob(shard: Shard, size: int = 200_000) -> bytes:
    """`size` bytes that say which shard made them."""
    return shard.id.to_bytes(4, "little") * (size // 4)


def big_array(shard: Shard, mib: int = 200, order: str = "C") -> np.ndarray:
    n = mib * 2**20 // 8
    a = np.arange(n, dtype=np.float64)
    if order == "F":
        return np.asfortranarray(a.reshape(-1, 4))
    return a


def make_big_array(mib: int, order: str = "C") -> np.ndarray:
    a = np.arange(mib * 2**20 // 8, dtype=np.float64)
    return np.asfortranarray(a.reshape(-1, 8)) if order == "F" else a


def every_other(make: Callable[..., np.ndarray], *args: Any) -> np.ndarray:
    """Every other element of what `make(*args)` returns: a strided view."""
    return make(*args)[::2]


def floats_of(shard: Shard, seed: int = 7) -> float:
    """A float sum whose value depends on the order it is added in."""
    rng = np.random.default_rng([seed, shard.id])
    return float(rng.standard_normal() * 10.0 ** rng.integers(-8, 8))


def slow_first_logged(shard: Shard, log: str, seconds: float = 1.5) -> int:
    """Shard 0 takes `seconds`; every shard logs when it ends (monotonic clock)."""
    if shard.id == 0:
        time.sleep(seconds)
    append_line(log, f"{shard.id} {time.monotonic()}\n")
    return shard.id


def shard_dying_mid_array_once(shard: Shard, armed: str) -> int:
    """In the one worker that claims `armed`: send the first bytes of a result holding a
    1 MiB array segment (the segment's descriptor rides with them), then die."""
    import fcntl
    import pickle
    import socket
    import struct

    from ashard import _framing

    try:
        os.rename(armed, armed + ".claimed")
    except FileNotFoundError:
        return shard.id * 10
    fd = os.memfd_create("ashard-result", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 20)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    values = (pickle.dumps([None], protocol=5), [])
    msg = (102, 0, 0, 1, values, [], [0.0], True, None, 0, None, [(0, "<f8", (1 << 17,), False)], 0)
    payload = pickle.dumps(msg, protocol=5)
    head = struct.pack("<IIQ", _framing.MAGIC, 0, len(payload) + 1000)  # more than will come
    with socket.socket(fileno=os.dup(channel_fd())) as sock:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(np.array([fd], np.int32)))]
        sock.sendmsg([head + payload[:10]], anc)
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


def write_borrowed(shard: Shard, X: np.ndarray) -> None:
    X[0] = 1.0


def print_every_way(shard: Shard, tag: str) -> int:
    """Print a line each way a worker can: Python's print (in pieces), sys.stderr, a raw
    write to fd 1, C's printf."""
    import ctypes

    print(f"{tag} py ", end="")
    print(f"shard {shard.id}")
    print(f"{tag} err shard {shard.id}", file=sys.stderr)
    os.write(1, f"{tag} raw shard {shard.id}\n".encode())
    ctypes.CDLL(None).printf(f"{tag} c shard {shard.id}\n".encode())
    return shard.id


def sleep_then_print(shard: Shard, seconds: float = 1.0) -> int:
    time.sleep(seconds)
    print(f"worker line {shard.id}")
    return shard.id


# -- a Dask cluster (test_dask.py) ---------------------------------------------------------


def logged_sleep(shard: Shard, log: str, seconds: float = 0.2) -> tuple[int, int]:
    """Append this run (shard id, attempt, pid) to `log`, sleep, return (id, attempt)."""
    append_line(log, f"{shard.id} {shard.attempt} {os.getpid()}\n")
    time.sleep(seconds)
    return shard.id, shard.attempt


def borrowed_sum(shard: Shard, X: np.ndarray, hold: float = 0.0) -> float:
    """Touch every page of the borrowed `X`, then hold on for `hold` seconds."""
    value = float(X[shard.id :: 4096].sum())
    time.sleep(hold)
    return value


def borrowed_total(shard: Shard, X: np.ndarray, hold: float = 0.0) -> tuple[float, tuple[int, ...]]:
    """The sum and shape of the borrowed `X` this shard sees, after `hold` seconds."""
    time.sleep(hold)
    return float(X.sum()), X.shape


# -- the drop-ins: ashard.Executor and the joblib backend (test_executor.py, test_joblib.py)


def sleep_deaf(seconds: float) -> float:
    """Sleep with every signal blocked: only SIGKILL stops it (a hung C call)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL})
    time.sleep(seconds)
    return seconds


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_self_shard(shard: Shard) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def fail_odd(shard: Shard) -> int:
    if shard.id % 2:
        raise ValueError(f"shard {shard.id} is odd")
    return shard.id


def fail_on_one(x: int) -> int:
    if x == 1:
        raise ValueError("one is bad")
    return x


def fail_on_one_slowly(x: int) -> int:
    """`fail_on_one`, each other item taking a millisecond."""
    if x == 1:
        raise ValueError("one is bad")
    time.sleep(0.001)
    return x


def raise_system_exit(code: int) -> None:
    raise SystemExit(code)


def touch_then_sleep(directory: str, name: str, seconds: float) -> str:
    """Mark `name` started in `directory`, then sleep."""
    open(os.path.join(directory, name), "w").close()
    time.sleep(seconds)
    return name


_INIT_VALUE: Any = None


def remember(value: Any) -> None:
    """An executor initializer: keep `value` for `remembered`."""
    global _INIT_VALUE
    _INIT_VALUE = value


def remembered() -> Any:
    return _INIT_VALUE


def failing_init() -> None:
    raise RuntimeError("initializer failed")


def fail_at(x: int, bad: int = 5, log: str = "") -> int:
    """Return x; x == bad raises ValueError. With `log`, mark each start there."""
    if log:
        open(os.path.join(log, f"started-{x}"), "w").close()
    if x == bad:
        raise ValueError(f"bad item {x}")
    time.sleep(0.05)
    return x


def nested_sum(n: int) -> int:
    """A joblib Parallel inside a task, with joblib's default backend."""
    import joblib

    return sum(joblib.Parallel(n_jobs=2)(joblib.delayed(square)(i) for i in range(n)))


def nested_ashard(n: int) -> tuple[int, list[int]]:
    """A joblib Parallel on the "ashard" backend inside a task: its sum, and the pids
    of the ashard workers that ran it."""
    import joblib

    import ashard

    ashard.register_joblib()
    out = joblib.Parallel(n_jobs=2, backend="ashard")(
        joblib.delayed(square_and_pid)(i) for i in range(n)
    )
    return sum(v for v, _ in out), sorted({p for _, p in out})


def square_and_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def mark_init(path: str, value: Any) -> None:
    """A joblib initializer: remember `value` in this worker and log its pid to `path`."""
    os.environ["ASHARD_TEST_INIT"] = str(value)
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")


def init_marker(_: Any = None) -> str | None:
    return os.environ.get("ASHARD_TEST_INIT")


def set_event(event: Any) -> bool:
    """Set a `multiprocessing.Manager` event from a worker (its proxy connects back)."""
    event.set()
    return True


def keywords(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


class Payload:
    """A plain object a task returns (the caller checks nobody else keeps it)."""

    def __init__(self, n: int) -> None:
        self.n = n


def make_payload(n: int) -> Payload:
    return Payload(n)


def wait_for_file(path: str, seconds: float) -> None:
    """Until the file `path` exists, `seconds` at most."""
    deadline = time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)


def held_until_go(x: Any, directory: str) -> Any:
    """`x`, once the file `directory`/go exists; the first items to run, before it
    does, make `directory`/started."""
    go = os.path.join(directory, "go")
    if not os.path.exists(go):
        open(os.path.join(directory, "started"), "a").close()
        wait_for_file(go, 30)
    return x


def shard_items_held_until_go(shard: Shard, directory: str) -> Any:
    """The shard's items, once the file `directory`/go exists (`held_until_go`)."""
    return held_until_go(list(shard.items), directory)


def payload_past_gate(n: int, gate: str) -> Payload:
    """`Payload(n)` at once for 0; the others once the file `gate` exists."""
    if n:
        wait_for_file(gate, 60)
    return Payload(n)


def shard_payload_past_gate(shard: Shard, gate: str) -> Payload:
    return payload_past_gate(shard.id, gate)


async def first_value_is_let_go(stream: Any, gate: str) -> None:
    """In the caller: the first value of a stream of `shard_payload_past_gate` over two
    shards is freed once dropped, while the second shard still runs; then it is let
    through."""
    dones = aiter(stream)
    first = await anext(dones)
    ref = weakref.ref(first.value)
    del first
    gc.collect()
    assert ref() is None  # shard 1 still runs: nothing waiting for it holds shard 0's
    open(gate, "w").close()
    assert (await anext(dones)).value.n == 1


def megabyte_value(shard: Shard) -> bytes:
    """A 1 MB value, quickly."""
    return bytes([shard.id % 256]) * 1_000_000


def make_items(n: int, size: int) -> Iterator[bytes]:
    """`n` items of `size` bytes each, made as they are read."""
    for i in range(n):
        yield bytes([i % 256]) * size


# -- calls queued on a worker (test_call_lanes.py) ------------------------------------------


def logged_call(log: str, tag: str, seconds: float = 0.0) -> str:
    """Append `tag` to `log` (one line per run), sleep `seconds`, return `tag`."""
    append_line(log, f"{tag}\n")
    time.sleep(seconds)
    return tag


def print_tagged(tag: str, k: int) -> int:
    """Print a line through Python and one through a raw write to fd 1; return `k`."""
    print(f"{tag} py {k}")
    os.write(1, f"{tag} raw {k}\n".encode())
    return k


def print_bulk(tag: str, lines: int) -> int:
    """Print `lines` lines of 100 bytes, half through Python and half as raw writes to
    fd 1 (more than a pipe holds, for a few thousand); return `lines`."""
    for i in range(lines):
        line = f"{tag} {i:08d} ".ljust(99, "x") + "\n"
        if i % 2:
            os.write(1, line.encode())
        else:
            sys.stdout.write(line)
            sys.stdout.flush()
    return lines


def sleep_then(seconds: float, value: Any) -> Any:
    """Sleep `seconds`, then return `value`."""
    time.sleep(seconds)
    return value


def call_writing_hostile_once(armed: str, kind: str, seconds: float, value: Any) -> Any:
    """Sleep `seconds`, write `kind` of hostile bytes into the channel (in the one
    worker that claims `armed`), return `value`."""
    time.sleep(seconds)
    write_hostile_once(armed, kind)
    return value


def sleep_pid(shard: Shard, seconds: float = 0.2) -> int:
    time.sleep(seconds)
    return os.getpid()


def interval(shard: Shard, seconds: float = 0.3) -> tuple[float, float]:
    """The wall-clock interval this shard ran in."""
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def interval_of_item(x: Any, seconds: float = 0.3) -> tuple[float, float]:
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def most_overlapping(intervals: Any, sizes: Any = None) -> int:
    """The most of `intervals` ((start, end) pairs) that ran at one moment, or (with
    `sizes`, one per interval) the largest sum of their sizes at one moment."""
    sizes = [1] * len(intervals) if sizes is None else sizes
    edges = sorted([(s, n) for (s, _), n in zip(intervals, sizes, strict=True)]
                   + [(e, -n) for (_, e), n in zip(intervals, sizes, strict=True)])  # fmt: skip
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


_KEPT: list[Any] = []  # per worker process: what `hoard` keeps


def hoard(shard: Shard, mib: int, hold: float = 0.0, free_after: float | None = None) -> int:
    """Keep `mib` MiB of private memory in this worker (touched), sleep `hold` seconds,
    and give it back `free_after` seconds later if that is given; return the pid."""
    block = bytearray(mib << 20)
    block[::4096] = b"\x01" * len(block[::4096])
    _KEPT.append(block)
    if free_after is not None:
        import threading

        timer = threading.Timer(free_after, _KEPT.clear)
        timer.daemon = True  # not a thread left running: hygiene would say so
        timer.start()
    time.sleep(hold)
    return os.getpid()


def spike(shard: Shard, mib: int, seconds: float = 0.2) -> tuple[float, float]:
    """Hold `mib` MiB (touched) for `seconds`, let it go; the wall-clock interval."""
    start = time.time()
    block = bytearray(mib << 20)
    block[::4096] = b"\x01" * len(block[::4096])
    time.sleep(seconds)
    del block
    return start, time.time()


def leak_mib(x: int) -> int:
    """Keep one more MiB (touched) in this worker; return x."""
    block = bytearray(1 << 20)
    block[::4096] = b"\x01" * len(block[::4096])
    _KEPT.append(block)
    return x


def blocked_sleep_but_dump(shard: Shard, victim: int = 1) -> int:
    """Shard `victim` sleeps with every signal blocked but SIGKILL and ashard's stack
    dump signal (a C hang that ignores the interrupt)."""
    if shard.id == victim:
        from ashard._protocol import DUMP_SIGNAL

        signal.pthread_sigmask(
            signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL, DUMP_SIGNAL}
        )
        time.sleep(60)
    return shard.id


def deaf_sleep(shard: Shard, victim: int = 1) -> int:
    """Shard `victim` ignores ashard's stack dump signal, then sleeps with every signal
    blocked: nothing but SIGKILL reaches the worker, and it cannot say where it is."""
    if shard.id == victim:
        from ashard._protocol import DUMP_SIGNAL

        signal.signal(DUMP_SIGNAL, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL})
        time.sleep(60)
    return shard.id


def raise_as_planned(shard: Shard, plan: dict[int, tuple[str, int]]) -> int:
    """Shard `id` of `plan` does what `plan[id]` names on its first `n` runs (n 0: on every
    run): raise the builtin exception of that name, "sigkill" its worker or "hang"."""
    what = plan.get(shard.id)
    if what is not None:
        name, times = what
        if times == 0 or shard.attempt <= times:
            if name == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            if name == "hang":
                time.sleep(60)
            raise getattr(builtins, name)(f"shard {shard.id} run {shard.attempt}")
    return shard.id * 10


def fail_while_armed(
    shard: Shard, armed: str, bad: dict[int, str], log: str, rows: Any = None, draw: bool = False
) -> Any:
    """Log the run; shard `id` of `bad` raises the builtin exception named there while the
    file `armed` exists. Returns the shard's id, or (`draw`) the first draw of its `rng`;
    with `rows` (a table sink), writes the shard's id and value there too."""
    append_line(log, f"{shard.id}\n")
    if shard.id in bad and os.path.exists(armed):
        raise getattr(builtins, bad[shard.id])(f"shard {shard.id} failed while armed")
    value = float(shard.rng.random()) if draw else float(shard.id)
    if rows is not None:
        rows.write({"id": [shard.id], "value": [value]})
    return value


def table_while_armed(shard: Shard, armed: str, bad: dict[int, str], log: str) -> Any:
    """`fail_while_armed`, returning a one-row table (for ``results="table"``)."""
    value = fail_while_armed(shard, armed, bad, log)
    return {"id": [shard.id], "value": [value]}


def waiting_here(directory: str, key: str) -> str:
    """Touch ``started-{key}`` in `directory`, then wait in this function until the file
    ``release`` appears there (the stacks tests look for this function's name)."""
    path = os.path.join(directory, f"started-{key}")
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY))
    release = os.path.join(directory, "release")
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return key


def shard_waiting_here(shard: Shard, directory: str) -> str:
    return waiting_here(directory, str(shard.id))


# -- hygiene between tasks (test_hygiene.py) ---------------------------------------------


def change_process_state(shard: Shard, where: str) -> int:
    """Shard 0 changes everything hygiene puts back; the others change nothing."""
    if shard.id == 0:
        os.environ["ASHARD_TEST_LEFT"] = "1"
        os.environ.pop("ASHARD_TEST_KEPT", None)
        os.chdir(where)
        sys.path.append("/nowhere/at/all")
        warnings.simplefilter("ignore")
        logging.basicConfig(level=logging.DEBUG)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # ashard's timeouts use it
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # ashard's stack dumps use it
        random.seed(42)
    return shard.id


def process_state(_: Any = None) -> dict[str, Any]:
    """What a task sees of the state `change_process_state` changes."""
    return {
        "left": os.environ.get("ASHARD_TEST_LEFT"),
        "kept": os.environ.get("ASHARD_TEST_KEPT"),
        "cwd": os.getcwd(),
        "nowhere": "/nowhere/at/all" in sys.path,
        "filters": len(warnings.filters),
        "handlers": len(logging.root.handlers),
        "level": logging.root.level,
        "sigterm": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
        "draw": random.random(),
        "pid": os.getpid(),
    }


_REUSED: dict[str, Any] = {}  # objects a task returns again and again, changed in place


def reused_buffer(shard: Shard, kind: str) -> Any:
    """Shard `shard.id` written into one object kept across calls and returned: an
    array (`"small"`, or `"large"`: over 1 MiB, which leaves by shared memory), a
    list, or a dict holding the array."""
    if kind == "list":
        kept = _REUSED.setdefault(kind, [0])
        kept[0] = shard.id
        return kept
    size = (1 << 18) if kind == "large" else 4
    array = _REUSED.setdefault(kind, np.zeros(size))
    array[0] = shard.id
    return {"a": array} if kind == "nested" else array


def reused_list(x: int) -> list[int]:
    """`[x]`, in one list kept across items and returned each time."""
    kept = _REUSED.setdefault("item", [0])
    kept[0] = x
    return kept


async def reused_buffer_async(shard: Shard, kind: str) -> Any:
    return reused_buffer(shard, kind)


def settings_after(shard: Shard) -> Any:
    """Shard 0 changes settings later shards compute or write under (importing numpy and
    decimal itself, as a shard's own code does); shard 1 reports them (run them in order
    on one worker)."""
    import decimal
    import gc
    import locale
    import socket

    if shard.id == 0:
        decimal.getcontext().prec = 3
        decimal.getcontext().traps[decimal.Inexact] = True
        np.seterr(all="raise")
        np.set_printoptions(precision=2)
        os.umask(0o077)
        socket.setdefaulttimeout(0.5)
        os.environ["TZ"] = "Asia/Tokyo"
        time.tzset()
        gc.disable()
        locale.setlocale(locale.LC_ALL, "C.UTF-8" if locale_ctype() == "C" else "C")
        return None
    mask = os.umask(0o022)
    os.umask(mask)
    return {
        "third": str(decimal.Decimal(1) / decimal.Decimal(3)),
        "divide": np.geterr()["divide"],
        "printed": str(np.array([1 / 3])),
        "umask": mask,
        "timeout": socket.getdefaulttimeout(),
        "zone": time.tzname,
        "gc": gc.isenabled(),
        "ctype": locale_ctype(),
    }


def locale_ctype(_: Any = None) -> str:
    import locale

    return locale.setlocale(locale.LC_CTYPE)


def state_after(shard: Shard, where: str) -> Any:
    """Shard 0 changes the state; shard 1 reports it (run them in order on one worker)."""
    if shard.id == 0:
        return change_process_state(shard, where)
    return process_state()


_LEFT_OPEN: list[Any] = []  # files a shard leaves open on purpose


def leave_things_behind(shard: Shard, directory: str) -> int:
    """Shard 0 leaves a non-daemon thread, a child process and an open file."""
    import subprocess
    import threading

    if shard.id == 0:
        stop = os.path.join(directory, "stop")
        threading.Thread(
            target=lambda: [time.sleep(0.01) for _ in iter(lambda: os.path.exists(stop), True)],
            name="left-behind",
        ).start()
        child = subprocess.Popen(["sleep", "30"])
        append_line(os.path.join(directory, "child"), f"{child.pid}\n")
        _LEFT_OPEN.append(open(os.path.join(directory, "open-file"), "w"))  # noqa: SIM115
    return os.getpid()


_LEFT_TASKS: list[Any] = []  # tasks a shard leaves pending on purpose (and keeps)


async def leave_a_task(shard: Shard) -> int:
    """Shard 0 leaves a task pending on the worker's loop; it counts while it runs."""
    import asyncio

    async def ticking_on() -> None:
        while True:
            _TICKS[0] += 1
            await asyncio.sleep(0.001)

    if shard.id == 0:
        _LEFT_TASKS.append(asyncio.get_running_loop().create_task(ticking_on(), name="left"))
    return os.getpid()


_TICKS = [0]


def one_buffer_changed_in_place(n: int) -> Iterator[np.ndarray]:
    """Yield one array, refilled with k before it is yielded the k-th time (a reader
    that reuses its buffer)."""
    buffer = np.zeros(3)
    for k in range(n):
        buffer[:] = k
        yield buffer


def one_list_growing(n: int) -> Iterator[list[int]]:
    """Yield one list, one longer each time."""
    grown: list[int] = []
    for k in range(n):
        grown.append(k)
        yield grown


def fail_past(items: list[int], limit: int) -> int:
    if len(items) > limit:
        raise ValueError(len(items))
    return len(items)


def set_up_in_init() -> None:
    """An `init` that changes the process: its changes are the baseline."""
    os.environ["ASHARD_TEST_INIT"] = "yes"
    warnings.filterwarnings("ignore", message="ashard-test-init")


def env_of(name: str) -> str | None:
    return os.environ.get(name)


async def set_env_async(shard: Shard, name: str, victim: int = 1) -> int:
    """Shard `victim` sets `name` in its worker's environment."""
    import asyncio

    if shard.id == victim:
        os.environ[name] = "1"
    await asyncio.sleep(0.3)
    return shard.id


def set_env(name: str, value: str) -> str:
    os.environ[name] = value
    return value


# -- tracing (test_tracing.py) -------------------------------------------------------------


def otel_setup() -> None:
    """A worker's `otel_setup`: a tracer provider that writes every span it ends, as a
    JSON line, to the file named by $ASHARD_TEST_SPANS (at once: a killed worker loses
    only the span it had open)."""
    import json

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    path = os.environ["ASHARD_TEST_SPANS"]

    class LineExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            for span in spans:
                ctx, parent = span.get_span_context(), span.parent
                line = {
                    "name": span.name,
                    "trace_id": ctx.trace_id,
                    "span_id": ctx.span_id,
                    "parent_id": parent.span_id if parent is not None else None,
                    "attributes": dict(span.attributes or {}),
                    "pid": os.getpid(),
                }
                append_line(path, json.dumps(line) + "\n")
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(LineExporter()))
    trace.set_tracer_provider(provider)


def otel_loaded(_: Any = None) -> bool:
    return "opentelemetry" in sys.modules


# -- async def shards (test_async_shards.py) -------------------------------------------------


async def nap(shard: Shard, seconds: float = 0.5) -> int:
    import asyncio

    await asyncio.sleep(seconds)
    return shard.id


async def nap_trio(shard: Shard, seconds: float = 0.2) -> int:
    import trio

    await trio.sleep(seconds)
    return shard.id


async def nap_item(x: int) -> int:
    import asyncio

    await asyncio.sleep(0.01)
    return x * 2


async def nap_span(shard: Shard, fail: int = -1) -> tuple[int, float, float]:
    """Where and when it ran (monotonic: one clock for the machine); shard `fail` raises."""
    import asyncio

    t0 = time.monotonic()
    await asyncio.sleep(0.2)
    if shard.id == fail:
        raise ValueError(f"shard {fail} fails")
    return os.getpid(), t0, time.monotonic()


def most_at_once(spans: list[tuple[int, float, float]]) -> int:
    """The most spans of one process that overlapped."""
    most = 0
    for pid in {s[0] for s in spans}:
        edges = sorted([(t0, 1) for p, t0, _ in spans if p == pid]
                       + [(t1, -1) for p, _, t1 in spans if p == pid])  # fmt: skip
        running = 0
        for _, step in edges:
            running += step
            most = max(most, running)
    return most


async def print_async(shard: Shard, tag: str) -> int:
    """Two lines, with other shards' in between when several run at once."""
    import asyncio

    print(f"{tag} {shard.id} first", flush=True)
    await asyncio.sleep(0.01)
    print(f"{tag} {shard.id} second", flush=True)
    return shard.id


async def nap_with_finally(shard: Shard, directory: str) -> int:
    import asyncio

    try:
        await asyncio.sleep(30)
    finally:
        append_line(os.path.join(directory, f"finally-{shard.id}"), "ran\n")
    return shard.id


async def block_the_loop(shard: Shard) -> int:
    time.sleep(30)  # noqa: ASYNC251 (on purpose: the whole loop stops here)
    return shard.id


async def raise_custom_async(shard: Shard) -> None:
    import asyncio

    await asyncio.sleep(0)
    raise CustomError(shard.id)


async def misbehave_on_the_loop(shard: Shard, how: str, victim: int = 1) -> int:
    """Shard `victim` raises asyncio's `CancelledError` of its own ("cancel"), or stops
    its worker's event loop ("stop"); every shard then returns its id."""
    import asyncio

    if shard.id == victim:
        if how == "cancel":
            raise asyncio.CancelledError("raised by fn, not a cancellation")
        asyncio.get_running_loop().stop()
    await asyncio.sleep(0.01)
    return shard.id


async def draw_async(shard: Shard) -> float:
    import asyncio

    await asyncio.sleep(0.01)
    assert shard.rng is not None
    return float(shard.rng.random())


def draw_sync(shard: Shard) -> float:
    assert shard.rng is not None
    return float(shard.rng.random())


def _lines(path: str) -> int:
    with open(path) as f:
        return len(f.read().splitlines())


async def all_in_flight_then_die(shard: Shard, log: str, count: int) -> tuple[int, int]:
    """Log the run; the first run of shard 0 waits until `count` runs started, then
    SIGKILLs its worker with all of them in flight."""
    import asyncio

    append_line(log, f"{shard.id} {shard.attempt}\n")
    if shard.id == 0 and shard.attempt == 1:
        while _lines(log) < count:  # noqa: ASYNC110 (other shards write it)
            await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    await asyncio.sleep(0.05)
    return shard.id, shard.attempt


async def block_briefly(shard: Shard, victim: int = 1, seconds: float = 1.3) -> int:
    """Shard `victim` holds its worker's loop for `seconds` (blocking code in async def)."""
    import asyncio

    await asyncio.sleep(0)
    if shard.id == victim:
        time.sleep(seconds)  # noqa: ASYNC251 (on purpose)
    return shard.id


async def write_rows_async(shard: Shard, rows: Any, fail: int = -1) -> int:
    """Two writes with other shards' in between (when several are in flight); shard
    `fail` raises after its writes."""
    import asyncio

    await asyncio.sleep(0)
    rows.write({"id": [shard.id]})
    await asyncio.sleep(0.01)
    rows.write({"id": [shard.id]})
    if shard.id == fail:
        raise ValueError(f"shard {fail} fails after writing")
    return shard.id


async def fill_async(shard: Shard, out: Any) -> int:
    import asyncio

    await asyncio.sleep(0)
    out[shard.id] = shard.id * 2
    return shard.id


async def table_async(shard: Shard) -> Any:
    import asyncio

    await asyncio.sleep(0)
    return {"id": [shard.id]}


async def write_borrowed_async(shard: Shard, X: np.ndarray) -> float:
    """Shard 1 writes X[0] at once; the others look at it later (while shard 1 is still
    in flight, when they run together)."""
    import asyncio

    if shard.id == 1:
        X[0] = 99.0
        await asyncio.sleep(0.1)
    else:
        await asyncio.sleep(0.05)
    return float(X[0])


def doze(seconds: float) -> float:
    """Sleep `seconds`; return them."""
    time.sleep(seconds)
    return seconds


def spin_for_shard(shard: Shard, delays: list[float]) -> int:
    """Keep the CPU busy ``delays[shard.id]`` seconds; return the shard's id."""
    end = time.perf_counter() + delays[shard.id]
    while time.perf_counter() < end:
        pass
    return shard.id


def thread_nices() -> list[int]:
    """The nice value of every thread of this process (Linux keeps one per thread)."""
    nices = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as f:
            nices.append(int(f.read().rsplit(")", 1)[1].split()[16]))
    return nices


def start_idle_thread() -> None:
    """An `init` that leaves a daemon thread waiting for good."""
    import threading

    threading.Thread(target=threading.Event().wait, daemon=True).start()


def say_then_wait(flag: str, line: str) -> str:
    """A call's `print_then_wait`: print `line` (raw, to fd 1), wait for file `flag`."""
    os.write(1, f"{line}\n".encode())
    wait_for_file(flag, 300)
    return line


def print_then_wait(shard: Shard, flag: str, line: str) -> int:
    """Print `line` (raw, to fd 1), then wait until file `flag` exists (300 s at most)."""
    os.write(1, f"{line}\n".encode())
    wait_for_file(flag, 300)
    return shard.id


def _late_writer(out: np.ndarray, idx: Any, after: float) -> Callable[[], None]:
    def late() -> None:
        out[idx] = -2  # under way
        time.sleep(after)
        out[idx] = -1

    return late


def overrun_leaving_a_writer(shard: Shard, out: np.ndarray, after: float) -> int:
    """Shard 0's first attempt starts a thread that writes -2 over its slice of `out`
    (under way), then -1 `after` seconds later, and runs past any timeout; every
    attempt that finishes writes the shard's id there."""
    if shard.id == 0 and shard.attempt == 1:
        import threading

        threading.Thread(target=_late_writer(out, shard.idx, after), daemon=True).start()
        time.sleep(60)
    out[shard.idx] = shard.id
    return shard.id


async def overrun_awaiting_a_writer(shard: Shard, out: np.ndarray, after: float) -> int:
    """`overrun_leaving_a_writer` in async code: the first attempt awaits the late
    writer through `asyncio.to_thread`, cancelled at the timeout (the thread is not)."""
    if shard.id == 0 and shard.attempt == 1:
        import asyncio

        await asyncio.to_thread(_late_writer(out, shard.idx, after))
    out[shard.idx] = shard.id
    return shard.id


async def sum_in_a_thread(shard: Shard) -> int:
    """The shard's indices summed through `asyncio.to_thread`."""
    import asyncio

    return await asyncio.to_thread(lambda: int(sum(shard.idx)))


LATE_WRITERS = [overrun_leaving_a_writer, overrun_awaiting_a_writer]
"""Shards whose stopped first attempt leaves a thread that writes late (plain, async)."""


@contextlib.asynccontextmanager
async def late_writer_setup() -> AsyncIterator[tuple[Any, int, Any]]:
    """For the `LATE_WRITERS` tests (the parent's side): a started one-worker pool, its
    worker's pid and a 4-slot int64 out= buffer, for a minute at most (the buffer is
    closed after)."""
    import anyio

    import ashard

    buf = ashard.buffer("int64", 4)
    try:
        with anyio.fail_after(60):
            async with ashard.Pool(1) as pool:
                await pool.call(abs, -1)
                yield pool, pool.pids[0], buf
    finally:
        buf.close()

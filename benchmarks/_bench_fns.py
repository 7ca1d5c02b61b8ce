"""Functions the benchmarks run on worker processes.

They live in their own importable module (not in the script's ``__main__``) so that every
pool under test can reach them by name: fork- and forkserver-based pools, spawned
interpreters (ashard, anyio, loky, Dask, Ray).
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ashard import Shard


def noop(x: Any = None) -> Any:
    """Do nothing; return the argument (so results can be checked)."""
    return x


def spin(loops: int) -> int:
    """A pure-Python busy loop of `loops` iterations."""
    acc = 0
    for i in range(loops):
        acc += i & 7
    return acc


def busy(loops: int) -> float:
    """Spin `loops` iterations; return the CPU seconds this thread spent doing it."""
    start = time.thread_time()
    spin(loops)
    return time.thread_time() - start


def busy_shard(shard: Shard, loops: int) -> float:
    """`busy(loops)` once per index of the shard; return the summed CPU seconds."""
    return sum(busy(loops) for _ in shard.idx)


def echo_serve(fd: int) -> None:
    """Echo every message received on the socket `fd` until it is closed."""
    with socket.socket(fileno=fd) as sock:
        while data := sock.recv(4096):
            sock.sendall(data)


TASKS = 20
"""Tasks of the shared-input benchmark: task k sums the strided slice X[k::TASKS]."""
_X: Any = None


def set_x(X: Any) -> None:
    """Pool initializer: keep the array for `strided_sum`."""
    global _X
    _X = X


def strided_sum(k: int) -> float:
    return float(_X[k::TASKS].sum())


def strided_sum_of(X: Any, k: int) -> float:
    return float(X[k::TASKS].sum())


def strided_shard(shard: Shard, X: Any) -> float:
    return float(X[shard.id :: TASKS].sum())


# -- the benchmark suite (benchmarks/suite.py) -------------------------------------------


async def anoop(x: Any = None) -> Any:
    """`noop` as a coroutine, for peers that run coroutines (aiomultiprocess)."""
    return x


async def abusy(loops: int) -> float:
    return busy(loops)


def stride_sum(X: Any, k: int, tasks: int) -> float:
    """Task k of the broadcast workload: sum the strided slice X[k::tasks]."""
    return float(X[k::tasks].sum())


def stride_sum_global(k: int, tasks: int) -> float:
    """`stride_sum` over the array a pool initializer (or fork) left in `_X`."""
    return float(_X[k::tasks].sum())


def stride_shard(shard: Shard, X: Any, tasks: int) -> float:
    return float(X[shard.id :: tasks].sum())


def sleep_or_die(k: int, victim: int, marker: str, seconds: float = 0.05) -> tuple[int, float]:
    """Sleep `seconds`; task `victim` SIGKILLs its own worker the first time it runs (it
    records the kill time in `marker`). Returns (k, wall-clock time it finished)."""
    import os
    import signal

    if k == victim:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.write(fd, repr(time.time()).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(seconds)
    return k, time.time()


async def asleep_or_die(k: int, victim: int, marker: str) -> tuple[int, float]:
    return sleep_or_die(k, victim, marker)


def apply(pair: tuple[Any, tuple[Any, ...]]) -> Any:
    """``fn(*args)`` for a ``(fn, args)`` pair: a starmap over a plain map."""
    fn, args = pair
    return fn(*args)


def inc(x: int) -> int:
    """``x + 1``: the tiniest useful work (`bench_caller.py`'s map)."""
    return x + 1


def nbytes(x: Any) -> int:
    """The size of an array argument, in bytes."""
    return int(x.nbytes)


def make_bytes(size: int) -> bytes:
    return b"y" * size


def make_array(size: int) -> Any:
    import numpy as np

    return np.ones(size, dtype=np.uint8)


def borrowed_len(shard: Shard, x: Any) -> int:
    return len(x)


def shard_bytes(shard: Shard, size: int) -> bytes:
    return b"r" * size


def shard_id(shard: Shard) -> int:
    """The shard's id (`bench_caller.py`'s stream of one-item shards)."""
    return shard.id


def items_len(shard: Shard) -> int:
    """How many items the shard was given."""
    return len(shard.items)


def borrowed_sum(shard: Shard, x: Any) -> float:
    """A strided sum over the borrowed array `x`: it touches the pages the shard reads."""
    return float(x[shard.id :: 4096].sum())


def stamp_sleep(x: Any, seconds: float) -> tuple[int, float]:
    """Sleep `seconds`; return this process's pid and the wall-clock time it started."""
    import os

    started = time.time()
    time.sleep(seconds)
    return os.getpid(), started


def spike_mib(x: Any, mib: int, seconds: float = 0.5) -> Any:
    """Hold `mib` MiB (touched) for `seconds`, let it go; return x."""
    block = bytearray(mib << 20)
    block[::4096] = b"\x01" * len(block[::4096])
    time.sleep(seconds)
    del block
    return x

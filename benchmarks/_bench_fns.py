"""Functions that `bench_core.py` runs on worker processes.

They live in their own importable module (not in the script's ``__main__``) so that every
pool under test can reach them by name: fork- and forkserver-based pools, spawned
interpreters (ashard, anyio), and pebble.
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

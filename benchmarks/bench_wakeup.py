"""How much a worker's per-message work costs on the wall clock of a round trip.

Run ``python benchmarks/bench_wakeup.py``. A child process answers each one-byte message
after spinning for a set time; the parent awaits the answer through
``anyio.wait_readable`` (as ashard's supervisor does) and, for comparison, with a
blocking ``recv``. On an idle machine with real cores the round trip grows by about the
child's work; where it grows by more, waking and sharing CPUs is what costs. This
explains the call-latency figure in RESULTS.md.
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import time

import anyio

CHILD = """
import socket, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
work = float(sys.argv[2])
while data := sock.recv(4096):
    start = time.perf_counter()
    while time.perf_counter() - start < work:
        pass
    sock.sendall(data)
"""
ROUND_TRIPS = 4000
WARMUP = 300


async def async_round_trips(sock: socket.socket, n: int) -> list[float]:
    sock.setblocking(False)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        sock.send(b"x")
        await anyio.wait_readable(sock)
        sock.recv(64)
        times.append(time.perf_counter() - start)
    return times


def blocking_round_trips(sock: socket.socket, n: int) -> list[float]:
    sock.setblocking(True)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        sock.send(b"x")
        sock.recv(64)
        times.append(time.perf_counter() - start)
    return times


def measure(work_s: float) -> tuple[float, float]:
    """Median async and blocking round trips, in µs, to a child doing `work_s` per message."""
    ours, theirs = socket.socketpair()
    cmd = [sys.executable, "-c", CHILD, str(theirs.fileno()), str(work_s)]
    child = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),))
    theirs.close()
    try:
        blocking_round_trips(ours, WARMUP)
        async_times = anyio.run(async_round_trips, ours, ROUND_TRIPS)
        blocking_times = blocking_round_trips(ours, ROUND_TRIPS)
    finally:
        ours.close()
        child.wait(timeout=10)
    return statistics.median(async_times) * 1e6, statistics.median(blocking_times) * 1e6


def main() -> None:
    print("| child's work per message | async round trip | blocking round trip |")
    print("|---:|---:|---:|")
    for work_us in (0, 15, 30, 60):
        async_us, blocking_us = measure(work_us / 1e6)
        print(f"| {work_us} µs | {async_us:.0f} µs | {blocking_us:.0f} µs |")


if __name__ == "__main__":
    main()

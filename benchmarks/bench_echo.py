"""One call at a time against the floor: an asyncio socketpair echo to a child process.

Issue 23 asks for call latency within 2 x the floor that any design on this machine pays:
a round trip over a Unix socketpair to another process, driven by asyncio. Both run in
the same interpreter, interleaved in rounds, one request in flight at a time:

* ``echo``: the child reads a length-prefixed frame and writes it back (no pickling);
  the parent sends with ``sock_sendall`` and waits with ``sock_recv``.
* ``ashard``: ``await pool.call(noop, 1)`` on a warm one-worker pool.

    python benchmarks/bench_echo.py [--calls 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_fns as fns

ECHO = r"""
import os, socket, struct, sys
sock = socket.socket(fileno=int(sys.argv[1]))
while True:
    head = sock.recv(4, socket.MSG_WAITALL)
    if len(head) < 4:
        break
    body = sock.recv(struct.unpack("<I", head)[0], socket.MSG_WAITALL)
    sock.sendall(head + body)
"""


async def echo_round(calls: int) -> list[float]:
    parent, child = socket.socketpair()
    proc = subprocess.Popen(  # noqa: ASYNC220 (before the timing: blocking is fine)
        [sys.executable, "-c", ECHO, str(child.fileno())], pass_fds=[child.fileno()]
    )
    child.close()
    parent.setblocking(False)
    loop = asyncio.get_running_loop()
    frame = struct.pack("<I", 64) + os.urandom(64)
    times = []
    try:
        for k in range(calls + 100):
            t0 = time.perf_counter()
            await loop.sock_sendall(parent, frame)
            got = b""
            while len(got) < len(frame):
                got += await loop.sock_recv(parent, len(frame) - len(got))
            if k >= 100:  # the first ones warm up
                times.append(time.perf_counter() - t0)
    finally:
        parent.close()
        proc.wait(10)
    return times


async def ashard_round(calls: int) -> list[float]:
    import ashard

    times = []
    async with ashard.Pool(1) as pool:
        for k in range(calls + 100):
            t0 = time.perf_counter()
            await pool.call(fns.noop, 1)
            if k >= 100:
                times.append(time.perf_counter() - t0)
    return times


async def main(calls: int, rounds: int) -> None:
    medians: dict[str, list[float]] = {"echo": [], "ashard": []}
    p99s: dict[str, list[float]] = {"echo": [], "ashard": []}
    for r in range(rounds):
        order = ["echo", "ashard"] if r % 2 == 0 else ["ashard", "echo"]
        for who in order:
            times = sorted(await (echo_round if who == "echo" else ashard_round)(calls))
            medians[who].append(times[len(times) // 2])
            p99s[who].append(times[int(len(times) * 0.99)])
    print(
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, asyncio; one request "
        f"in flight; {calls:,} per round, medians over {rounds} rounds.\n"
    )
    print("| who | median µs | p99 µs | median / echo |")
    print("|---|---:|---:|---:|")
    floor = statistics.median(medians["echo"])
    for who in ("echo", "ashard"):
        med = statistics.median(medians[who])
        p99 = statistics.median(p99s[who])
        print(f"| {who} | {med * 1e6:.0f} | {p99 * 1e6:.0f} | {med / floor:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.rounds))

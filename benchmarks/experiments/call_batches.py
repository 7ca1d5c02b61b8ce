"""How much caller CPU a call costs when K calls per worker go out in one send and their
answers come back together: the real workers and protocol, the scheduler bypassed.

It reaches into ashard's internals: an experiment for the design of issue 23's next step
(calls outstanding several at a time per worker), not a benchmark of the public API.

    python benchmarks/experiments/call_batches.py
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import anyio

import _bench_fns as fns
import ashard
from ashard._framing import encode_many
from ashard._protocol import CALL
from ashard._reports import receive


async def drive(w: Any, count: int, batch: int, seqs: Any) -> None:
    """`count` calls on worker `w`, `batch` of them per send, their answers awaited."""
    done = 0
    while done < count:
        k = min(batch, count - done)
        msgs = [(CALL, next(seqs), fns.noop, (1,), {}, None) for _ in range(k)]
        await w.channel.send(encode_many(msgs))
        got = 0
        while got < k:
            got += len(await receive(w, wait_first=True))
        done += k


async def main() -> None:
    async with ashard.Pool(2) as pool:
        backend: Any = await pool.backend()
        for _ in range(4):
            await pool.call(fns.noop, 1)
        token = object()
        workers = [await backend.workers.acquire(token) for _ in range(2)]
        seqs = iter(range(1 << 40))
        n = 20_000
        for batch in (1, 2, 4, 8, 16):
            c0, t0, th0 = os.times(), time.perf_counter(), time.thread_time()
            async with anyio.create_task_group() as tg:
                for w in workers:
                    tg.start_soon(drive, w, n // 2, batch, seqs)
            c1, t1, th1 = os.times(), time.perf_counter(), time.thread_time()
            cpu = (c1.user - c0.user) + (c1.system - c0.system)
            print(
                f"calls per send {batch:2d}: {n / (t1 - t0):8,.0f} calls/s, process CPU "
                f"{cpu / n * 1e6:5.1f} µs per call, loop thread {(th1 - th0) / n * 1e6:5.1f}"
            )
        for w in workers:
            backend.workers.release(w, token)


anyio.run(main)

"""Faults, measured: the crash matrix, the hard memory limit, memory under long runs, and
how fast Ctrl-C stops an awaited call (beside ProcessPoolExecutor and anyio.to_process).

``python benchmarks/bench_faults.py [--only matrix,overshoot,memory,interrupt]``
prints Markdown. It reuses the misbehaving functions of the tests (tests/workloads.py);
the interrupt cases run each caller in a process of its own, and read the time of the
interrupt and of its effect on the same clock (CLOCK_MONOTONIC).
"""

from __future__ import annotations

import argparse
import functools
import gc
import queue
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import psutil

import ashard

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
import workloads  # noqa: E402

MiB = 1 << 20
PHASES = ["starting", "loading", "mid-shard", "sending"]
KINDS = ["sigkill", "exit", "segfault", "hang-python", "hang-c", "hostile", "memory"]


# -- the crash matrix ---------------------------------------------------------------------


async def matrix_cell(phase: str, kind: str, tmp: Path) -> str:
    armed = str(tmp / f"armed-{phase}-{kind}")
    if phase == "starting":
        init = functools.partial(workloads.misbehave_once, armed, kind)
        pool = ashard.Pool(2, init=init, max_tasks=1, mem_cap="150MB")
    else:
        pool = ashard.Pool(2, mem_cap="150MB")
    fn: Any = workloads.shard_times_ten
    borrow = None
    if phase == "loading":
        borrow = {"tripwire": workloads.UnpicklesBadlyOnce(armed, kind)}
    elif phase == "mid-shard":
        fn = functools.partial(workloads.shard_misbehaving_once, armed=armed, how=kind)
    elif phase == "sending":
        fn = functools.partial(workloads.shard_result_pickling_badly_once, armed=armed, how=kind)
    async with pool:
        await anyio.Path(armed).touch()
        t0 = time.perf_counter()
        retried = None
        results = {}
        async with pool.shard_stream(
            ashard.shards(4, block_size=1), fn, borrow=borrow, timeout=2.0, max_retries=2
        ) as stream:
            async for done in stream:
                results[done.shard.id] = done.value
                if done.attempts > 1:
                    retried = time.perf_counter() - t0
        took = time.perf_counter() - t0
    ok = [results[i] for i in range(4)] == [0, 10, 20, 30]
    where = f"retried result at {retried:.2f} s" if retried is not None else "no shard re-ran"
    return f"{'ok' if ok else 'WRONG'}: {where}, call {took:.2f} s"


async def crash_matrix() -> list[str]:
    import ashard._handle

    ashard._handle.START_TIMEOUT = 3.0  # a worker hanging while it starts: 3 s, not 60
    rows = ["| phase | " + " | ".join(KINDS) + " |", "|---" * (len(KINDS) + 1) + "|"]
    with tempfile.TemporaryDirectory() as tmp:
        for phase in PHASES:
            cells = [await matrix_cell(phase, kind, Path(tmp)) for kind in KINDS]
            rows.append(f"| {phase} | " + " | ".join(cells) + " |")
    return rows


# -- the hard memory limit ----------------------------------------------------------------


def runaway(shard: ashard.Shard, how: str) -> None:
    hoard = []
    while True:  # touched pages, as fast as it can
        if how == "numpy":
            hoard.append(np.ones(16 * MiB, dtype=np.uint8))
        else:
            hoard.append(b"\x01" * (16 * MiB))


async def overshoot(how: str, runs: int = 3) -> list[float]:
    """Peak private memory of a runaway worker over the hard limit (300 MB x 1.5),
    sampled from outside every 0.5 ms."""
    ratios = []
    async with ashard.Pool(1, mem_cap="300MB") as pool:
        for _ in range(runs):
            proc = psutil.Process(pool.pids[0])
            peak = [0]
            stop = threading.Event()

            def sample(
                proc: psutil.Process = proc, peak: list[int] = peak, stop: threading.Event = stop
            ) -> None:
                while not stop.wait(0.0005):
                    try:
                        info = proc.memory_info()
                    except psutil.Error:
                        return
                    peak[0] = max(peak[0], info.rss - info.shared)

            sampler = threading.Thread(target=sample)
            sampler.start()
            await pool.shard_map(1, runaway, borrow={"how": how}, max_retries=0, errors="collect")
            stop.set()
            await anyio.to_thread.run_sync(sampler.join)
            ratios.append(peak[0] / (300e6 * 1.5))
    return ratios


async def hard_limit() -> list[str]:
    rows = ["| allocator | peak / hard limit (3 runs) |", "|---|---|"]
    for how in ("numpy", "bytes"):
        ratios = await overshoot(how)
        rows.append(f"| {how} (16 MiB blocks) | {', '.join(f'{r:.2f}' for r in ratios)} |")
    return rows


# -- memory under long runs ---------------------------------------------------------------


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def times_thousand(shard: ashard.Shard) -> int:
    return shard.id * 1000


def kilobyte(shard: ashard.Shard) -> bytes:
    return bytes(1024)


async def long_runs() -> list[str]:
    rows = ["| run | parent RSS growth | time |", "|---|---:|---:|"]
    async with ashard.Pool(2) as pool:
        await pool.map(abs, range(10_000))
        for n, fn, ordered in ((200_000, times_thousand, False), (50_000, kilobyte, True)):
            gc.collect()
            base, peak, t0 = rss(), 0, time.perf_counter()
            async with pool.shard_stream(ashard.shards(n, block_size=1), fn, ordered=ordered) as s:
                async for i, _ in _enumerate(s):
                    if i % 5000 == 0:
                        peak = max(peak, rss())
            what = f"shard_stream of {n:,} shards ({fn.__name__}, ordered={ordered}), dropped"
            rows.append(f"| {what} | {(peak - base) / MiB:.1f} MiB | "
                        f"{time.perf_counter() - t0:.1f} s |")  # fmt: skip
        gc.collect()
        base, t0 = rss(), time.perf_counter()
        out = await pool.map(abs, range(-1_000_000, 0))
        grown = rss() - base
        kept = sys.getsizeof(out) + len(out) * sys.getsizeof(1_000_000)
        rows.append(f"| map of 1,000,000 ints | {grown / MiB:.1f} MiB ({(grown - kept) / MiB:.1f}"
                    f" beyond the result list) | {time.perf_counter() - t0:.1f} s |")  # fmt: skip
    return rows


async def _enumerate(stream: Any) -> Any:
    i = 0
    async for item in stream:
        yield i, item
        i += 1


# -- interrupts ---------------------------------------------------------------------------

CALLER = """
    import sys, time, anyio
    sys.path.insert(0, {tests!r})
    import workloads
    ENGINE, BACKEND = {engine!r}, {backend!r}

    async def long():
        args = ({started!r}, {finished!r}, 5.0)
        if ENGINE == "ashard":
            import ashard
            return await ashard.call(workloads.touch_sleep_touch, *args)
        if ENGINE == "anyio.to_process":
            return await anyio.to_process.run_sync(workloads.touch_sleep_touch, *args)
        import asyncio, concurrent.futures
        loop = asyncio.get_running_loop()
        with concurrent.futures.ProcessPoolExecutor(1) as ex:
            return await loop.run_in_executor(ex, workloads.touch_sleep_touch, *args)

    try:
        anyio.run(long, backend=BACKEND)
    except KeyboardInterrupt:
        print(f"interrupted at {{time.monotonic():.4f}}", flush=True)
"""


def script_interrupt(engine: str, backend: str, tmp: Path) -> str:
    started, finished = tmp / f"s-{engine}-{backend}", tmp / f"f-{engine}-{backend}"
    code = textwrap.dedent(CALLER).format(tests=str(TESTS), engine=engine, backend=backend,
                                          started=str(started), finished=str(finished))  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    while not started.exists():
        time.sleep(0.01)
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    exited = time.monotonic() - sent
    line = next((x for x in out.splitlines() if x.startswith("interrupted at ")), None)
    if line:
        noticed = f"{float(line.split()[-1]) - sent:.2f} s"
    else:  # it ended some other way: say how
        last = (err.strip().splitlines() or ["no output"])[-1].strip(" |")
        noticed = f"no KeyboardInterrupt ({last[:60]})"
    time.sleep(5.0)
    work = "stopped" if not finished.exists() else "ran to its end"
    return f"{noticed} (exit {exited:.2f} s; work {work})"


def kernel_interrupt(engine: str, tmp: Path) -> str:
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(TESTS))
    started, finished = tmp / f"ks-{engine}", tmp / f"kf-{engine}"
    call = {
        "ashard": "await ashard.call(workloads.touch_sleep_touch, *args)",
        "anyio.to_process": "await anyio.to_process.run_sync(workloads.touch_sleep_touch, *args)",
        "ppe run_in_executor": "await asyncio.get_running_loop().run_in_executor("
        "ex, workloads.touch_sleep_touch, *args)",
    }[engine]
    try:
        setup = ("import asyncio, time, anyio, ashard, workloads, concurrent.futures\n"
                 "ex = concurrent.futures.ProcessPoolExecutor(1)\n"
                 f"args = ({str(started)!r}, {str(finished)!r}, 5.0)")  # fmt: skip
        _cell(kc, kc.execute(setup))
        msg_id = kc.execute(f"try:\n    {call}\nfinally:\n    print(f'{{time.monotonic():.4f}}')")
        while not started.exists():
            time.sleep(0.01)
        time.sleep(0.5)
        sent = time.monotonic()
        km.interrupt_kernel()
        output = _cell(kc, msg_id)
        noticed = float(output.split()[0]) - sent if output.strip() else float("nan")
        time.sleep(5.0)
        work = "stopped" if not finished.exists() else "ran to its end"
        _cell(kc, kc.execute("ex.shutdown(cancel_futures=True)"))
        return f"{noticed:.2f} s (work {work})"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _cell(kc: Any, msg_id: str) -> str:
    output = []
    while True:
        try:
            msg = kc.get_iopub_msg(timeout=60)
        except queue.Empty:
            return "".join(output)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            output.append(msg["content"]["text"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return "".join(output)


def interrupts() -> list[str]:
    engines = ["ashard", "ppe run_in_executor", "anyio.to_process"]
    rows = ["| where | " + " | ".join(engines) + " |", "|---" * 4 + "|"]
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("asyncio", "trio"):
            cells = [
                "n/a (asyncio only)" if e.startswith("ppe") and backend == "trio"
                else script_interrupt(e.split()[0], backend, Path(tmp))
                for e in engines
            ]  # fmt: skip
            rows.append(f"| script, {backend} | " + " | ".join(cells) + " |")
        cells = [kernel_interrupt(e, Path(tmp)) for e in engines]
        rows.append("| Jupyter kernel (interrupt_kernel) | " + " | ".join(cells) + " |")
    return rows


SECTIONS = {
    "matrix": ("Crash matrix: outcome, time to the retried result, whole call (4 shards, "
               "timeout 2 s, max_retries 2)", lambda: anyio.run(crash_matrix)),
    "overshoot": ("Hard memory limit: mem_cap 300 MB, hard limit 1.5x",
                  lambda: anyio.run(hard_limit)),
    "memory": ("Parent memory under long runs", lambda: anyio.run(long_runs)),
    "interrupt": ("Ctrl-C during an awaited 5 s call: time from SIGINT to the caller seeing it",
                  interrupts),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS))
    args = parser.parse_args()
    print(f"ashard {ashard.__file__}, {psutil.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    for name in args.only.split(","):
        title, run = SECTIONS[name]
        t0 = time.perf_counter()
        rows = run()
        print(f"\n### {title}\n", *rows, f"\n({time.perf_counter() - t0:.0f} s)", sep="\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()

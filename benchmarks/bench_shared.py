"""Shared inputs: one large array read by every shard, ashard and its peers side by side.

Run ``python benchmarks/bench_shared.py [--mb 400] [--reps 3]``.

Workload: a float64 array of ``--mb`` MB; 20 tasks on 2 workers, task k sums the strided
slice ``X[k::20]`` (every task touches every page). Each peer runs in a fresh
interpreter, once per repetition. Memory: the orchestrator samples the machine's memory
in use (MemTotal - MemAvailable, shared memory included) every 5 ms while the timed
region runs, relative to just before the interpreter started (so the original array,
interpreters and every copy count). It also sums PSS over the process tree (taken only
when two consecutive sums agree: a page's share moves while workers map a segment):
the peak, and the peak minus the sum when the timed region starts (the memory the
call itself adds, with interpreters and the original array already counted).

Timed region ("handing over the array to results, sharing included"):

ashard (auto-share)        ``await pool.shard_map(20, fn, borrow={"X": X})`` on a warm Pool(2)
ashard (pre-shared)        the same with ``ashard.share(X)`` made before the timer starts
ashard (Buffer)            the same with X built in an ``ashard.buffer`` from the start
PPE forkserver+initializer ``ProcessPoolExecutor(2, forkserver, initializer=X)`` + map:
                           the array reaches workers through the initializer, so worker
                           start is inside the timer (no warm pool can receive new data)
loky + initializer         the same with ``loky.ProcessPoolExecutor``
joblib                     ``Parallel(n_jobs=2)`` (warm) with automatic memmapping of X
Ray                        ``ray.put(X)`` + 20 tasks; ``ray.init`` reported apart
Dask                       ``client.scatter(X, broadcast=True)`` + 20 tasks on a LocalCluster
fork-inherited (reference) a fork-context Pool created after X exists, X a global

Also measured in the child: copying X into fresh memory (``np.empty``: page faults) and
into already-touched memory, and filling a memfd with and without MAP_POPULATE.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from _bench_fns import TASKS, set_x, strided_shard, strided_sum, strided_sum_of  # noqa: E402
from workloads.broadcast import memory_in_use  # noqa: E402

WORKERS = 2
PEERS = {
    "ashard": "ashard shard_map, borrow (auto-share)",
    "ashard-shared": "ashard shard_map, borrow=share(X) made beforehand",
    "ashard-buffer": "ashard shard_map, X built in an ashard.buffer",
    "ppe-forkserver": "ProcessPoolExecutor forkserver + initializer",
    "loky": "loky ProcessPoolExecutor + initializer",
    "joblib": "joblib Parallel (auto memmapping)",
    "ray": "Ray, ray.put",
    "dask": "Dask, scatter(broadcast=True)",
    "fork": "fork-context Pool, X inherited (reference)",
}


def make_array(mb: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(0).random(mb * 1_000_000 // 8)


def mark(what: str) -> None:
    print(what, flush=True)


# -- children: one peer per fresh interpreter ------------------------------------------


def run_ashard(X: np.ndarray[Any, Any], how: str) -> float:
    import anyio

    import ashard

    async def main() -> float:
        async with ashard.Pool(WORKERS) as pool:
            layout = ashard.shards(TASKS, block_size=1)
            await pool.shard_map(layout, strided_shard, borrow={"X": np.zeros(TASKS)})  # warm
            borrowed: Any = X
            if how == "shared":
                borrowed = ashard.share(X)
            elif how == "buffer":
                borrowed = ashard.buffer(X.dtype, X.shape)
                borrowed.array[...] = X
            mark("START")
            start = time.perf_counter()
            res = await pool.shard_map(layout, strided_shard, borrow={"X": borrowed})
            took = time.perf_counter() - start
            mark("END")
            check(res.results, X)
            if how != "auto":
                borrowed.close()
            return took

    return anyio.run(main)


def run_executor(X: np.ndarray[Any, Any], kind: str) -> float:
    import multiprocessing

    mark("START")
    start = time.perf_counter()
    if kind == "loky":
        import loky

        ex: Any = loky.ProcessPoolExecutor(WORKERS, initializer=set_x, initargs=(X,))
    else:
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("forkserver")
        ex = ProcessPoolExecutor(WORKERS, mp_context=ctx, initializer=set_x, initargs=(X,))
    results = list(ex.map(strided_sum, range(TASKS)))
    took = time.perf_counter() - start
    mark("END")
    ex.shutdown()
    check(results, X)
    return took


def run_joblib(X: np.ndarray[Any, Any]) -> float:
    from joblib import Parallel, delayed

    with Parallel(n_jobs=WORKERS) as parallel:
        parallel(delayed(strided_sum_of)(np.zeros(TASKS), k) for k in range(4))  # warm
        mark("START")
        start = time.perf_counter()
        results = parallel(delayed(strided_sum_of)(X, k) for k in range(TASKS))
        took = time.perf_counter() - start
        mark("END")
    check(results, X)
    return took


def run_ray(X: np.ndarray[Any, Any]) -> float:
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=WORKERS, include_dashboard=False, logging_level="ERROR")
    print(json.dumps({"init_s": time.perf_counter() - t0}), flush=True)
    task = ray.remote(strided_sum_of)
    ray.get([task.remote(np.zeros(TASKS), k) for k in range(4)])  # warm
    mark("START")
    start = time.perf_counter()
    ref = ray.put(X)
    results = ray.get([task.remote(ref, k) for k in range(TASKS)])
    took = time.perf_counter() - start
    mark("END")
    ray.shutdown()
    check(results, X)
    return took


def run_dask(X: np.ndarray[Any, Any]) -> float:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True) as cluster,
        Client(cluster) as client,
    ):
        client.gather([client.submit(strided_sum_of, np.zeros(TASKS), k) for k in range(4)])
        mark("START")
        start = time.perf_counter()
        ref = client.scatter(X, broadcast=True)
        futures = [client.submit(strided_sum_of, ref, k, pure=False) for k in range(TASKS)]
        results = client.gather(futures)
        took = time.perf_counter() - start
        mark("END")
    check(results, X)
    return took


def run_fork(X: np.ndarray[Any, Any]) -> float:
    import multiprocessing

    set_x(X)
    mark("START")
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
        results = pool.map(strided_sum, range(TASKS))
    took = time.perf_counter() - start
    mark("END")
    check(results, X)
    return took


def check(results: list[float], X: np.ndarray[Any, Any]) -> None:
    expected = [float(X[k::TASKS].sum()) for k in range(TASKS)]
    if not np.allclose(results, expected):
        raise AssertionError("wrong results")


def copy_speeds(X: np.ndarray[Any, Any]) -> dict[str, float]:
    """GB/s of copying X into fresh memory, into touched memory, and into a memfd."""
    from ashard._shm import Segment

    gb = X.nbytes / 1e9
    out: dict[str, float] = {}
    start = time.perf_counter()
    fresh = np.empty_like(X)
    np.copyto(fresh, X)
    out["fresh_memory_GBps"] = gb / (time.perf_counter() - start)
    start = time.perf_counter()
    np.copyto(fresh, X)
    out["touched_memory_GBps"] = gb / (time.perf_counter() - start)
    del fresh
    for populate in (False, True):
        start = time.perf_counter()
        seg = Segment(X.nbytes, populate=populate)
        assert seg.mmap is not None
        np.copyto(np.frombuffer(seg.mmap, X.dtype), X)
        key = "memfd_populated_GBps" if populate else "memfd_lazy_GBps"
        out[key] = gb / (time.perf_counter() - start)
        seg.close()
    return out


def child(peer: str, mb: int) -> None:
    X = make_array(mb)
    runners = {
        "ashard": lambda: run_ashard(X, "auto"),
        "ashard-shared": lambda: run_ashard(X, "shared"),
        "ashard-buffer": lambda: run_ashard(X, "buffer"),
        "ppe-forkserver": lambda: run_executor(X, "forkserver"),
        "loky": lambda: run_executor(X, "loky"),
        "joblib": lambda: run_joblib(X),
        "ray": lambda: run_ray(X),
        "dask": lambda: run_dask(X),
        "fork": lambda: run_fork(X),
    }
    took = runners[peer]()
    extra = copy_speeds(X) if peer == "ashard" else {}
    print(json.dumps({"wall_s": took, **extra}), flush=True)


# -- orchestrator ----------------------------------------------------------------------


def tree_pss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_full_info().pss
    return total


def stable_pss(proc: psutil.Process) -> int | None:
    """Summed PSS of the tree, or None while it is changing (two reads disagree by >1%):
    a page's share moves while workers map a segment, and reads of one process after
    another would count it more than once."""
    first = tree_pss(proc)
    second = tree_pss(proc)
    return second if abs(second - first) <= 0.01 * max(first, 1) else None


def measure(peer: str, mb: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", peer, "--mb", str(mb)]
    time.sleep(1.0)  # let the previous run's memory be freed before the baseline
    baseline = memory_in_use()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=BENCH_DIR)
    ps = psutil.Process(proc.pid)
    timing = threading.Event()
    done = threading.Event()
    peak = [0]
    peak_pss = [0]
    start_pss = [0]

    def sample() -> None:
        while not done.is_set():
            if timing.is_set():
                peak[0] = max(peak[0], memory_in_use() - baseline)
                peak_pss[0] = max(peak_pss[0], stable_pss(ps) or 0)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result: dict[str, Any] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.strip()
        if line == "START":
            for _ in range(100):
                start_pss[0] = stable_pss(ps) or 0
                if start_pss[0]:
                    break
            timing.set()
        elif line == "END":
            peak[0] = max(peak[0], memory_in_use() - baseline)
            timing.clear()
        elif line.startswith("{"):
            result.update(json.loads(line))
    done.set()
    if proc.wait() != 0:
        raise RuntimeError(f"{peer} exited with {proc.returncode}")
    result["peak_mem_x"] = peak[0] / (mb * 1e6)
    result["peak_pss_x"] = peak_pss[0] / (mb * 1e6)
    result["added_pss_x"] = (peak_pss[0] - start_pss[0]) / (mb * 1e6)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=400)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=sorted(PEERS))
    parser.add_argument("--child", choices=sorted(PEERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.mb)
        return
    print(f"# shared input: {args.mb} MB float64, {TASKS} strided-sum tasks, {WORKERS} workers")
    print(f"- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, cpu_count={os.cpu_count()}")
    print(f"- median of {args.reps} runs, each in a fresh interpreter\n")
    print(
        "| peer | wall s | peak PSS / array | PSS added by the call / array"
        " | peak machine memory / array | notes |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for peer in args.only or PEERS:
        try:
            runs = [measure(peer, args.mb) for _ in range(args.reps)]
        except Exception as exc:
            print(f"| {PEERS[peer]} | error | | | | {exc} |", flush=True)
            continue
        wall = statistics.median(r["wall_s"] for r in runs)
        mem = statistics.median(r["peak_mem_x"] for r in runs)
        pss = statistics.median(r["peak_pss_x"] for r in runs)
        added = statistics.median(r["added_pss_x"] for r in runs)
        notes = []
        if "init_s" in runs[0]:
            notes.append(f"ray.init {statistics.median(r['init_s'] for r in runs):.1f} s")
        for key in ("fresh_memory_GBps", "touched_memory_GBps", "memfd_lazy_GBps"):
            if key in runs[0]:
                notes.append(f"{key} {statistics.median(r[key] for r in runs):.2f}")
        if "memfd_populated_GBps" in runs[0]:
            value = statistics.median(r["memfd_populated_GBps"] for r in runs)
            notes.append(f"memfd_populated_GBps {value:.2f}")
        print(
            f"| {PEERS[peer]} | {wall:.3f} | {pss:.2f} | {added:.2f} | {mem:.2f}"
            f" | {'; '.join(notes)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""ashard on a Dask cluster beside plain Dask, on the same cluster, in one run.

``python benchmarks/bench_dask.py [--rounds 3] [--quick] [--record]``

Cases (medians over ``--rounds``; the cases alternate ashard / Dask):

tiny       ``pool.map(noop, range(100_000))`` on a pool with ``cluster=`` vs Dask's
           ``client.map(noop, range(N), pure=False)`` + ``gather`` (N = 5,000: at 1-2 ms
           a task, 100,000 would take minutes): per-item cost, µs.
cpu        40 tasks of ~50 ms of pure-Python work (calibrated here), 2 Dask workers:
           efficiency = ideal time (sum of task CPU / workers) / wall.
broadcast  a 400 MB float64 array read by 20 tasks (strided sums): ashard ``borrow=``
           vs ``client.scatter(X, broadcast=True)`` + ``client.map``. Wall time from
           holding the array to holding the 20 sums, and the cluster's peak memory
           above its idle level: the sum of PSS (shared pages counted once) over every
           process under this one (Dask's workers and ashard's workers), sampled every
           20 ms. Each side on a fresh cluster.
killed     40 tasks of ``time.sleep(0.2)`` on 2 Dask workers of 2 threads each
           (``dask scheduler`` / ``dask worker`` processes, no nanny); 1 s in, one Dask
           worker and everything under it gets SIGKILL: time until every result is in,
           beside the same run with nothing killed.

The clusters are LocalCluster(n_workers=2, threads_per_worker=1, processes=True) except
for ``killed``. ashard runs ``workers=`` its default (one ashard worker per Dask thread).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.append(str(ROOT / "tests"))  # daskcluster (after benchmarks/: its workloads wins)

import numpy as np  # noqa: E402
import psutil  # noqa: E402

import _bench_fns as fns  # noqa: E402
import ashard  # noqa: E402

START, END = "<!-- bench_dask:start -->", "<!-- bench_dask:end -->"


def local_cluster(n_workers: int = 2, threads: int = 1) -> Any:
    from distributed import LocalCluster

    return LocalCluster(n_workers=n_workers, threads_per_worker=threads, processes=True,
                        dashboard_address=None)  # fmt: skip


def pss_below() -> int:
    """The summed PSS of every process under this one, bytes."""
    total = 0
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_full_info().pss
    return total


class PeakSampler:
    """Samples `pss_below()` every 20 ms in a thread: `.peak` above the first reading,
    `.level` the median of the samples in the second half of the run (what stays)."""

    @property
    def level(self) -> int:
        half = self.samples[len(self.samples) // 2 :]
        return int(statistics.median(half)) if half else self.peak

    def __init__(self) -> None:
        self.base = pss_below()
        self.peak = 0
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.samples.append(pss_below() - self.base)
            self.peak = max(self.peak, self.samples[-1])

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, pss_below() - self.base)


def calibrate(seconds: float) -> int:
    """Loops of `spin` that take about `seconds` of CPU here (the suite's own count)."""
    from workloads.cpu import calibrate as suite_calibrate

    return suite_calibrate(seconds)


# -- cases ----------------------------------------------------------------------------


def ashard_tiny(cluster: Any, n: int) -> float:
    async def run() -> float:
        async with ashard.Pool(cluster=cluster) as pool:
            await pool.map(fns.noop, range(1000))  # warm: functions loaded on the nodes
            t0 = time.perf_counter()
            out = await pool.map(fns.noop, range(n))
            took = time.perf_counter() - t0
            assert out[-1] == n - 1
            return took / n * 1e6

    return asyncio.run(run())


def dask_tiny(cluster: Any, n: int) -> float:
    from distributed import Client

    with Client(cluster, set_as_default=False) as client:
        client.gather(client.map(fns.noop, range(100), pure=False))
        t0 = time.perf_counter()
        out = client.gather(client.map(fns.noop, range(n), pure=False))
        took = time.perf_counter() - t0
        assert out[-1] == n - 1
        return took / n * 1e6


def ashard_cpu(cluster: Any, loops: int) -> float:
    async def run() -> float:
        async with ashard.Pool(cluster=cluster) as pool:
            await pool.map(fns.busy, [1000] * 4)
            t0 = time.perf_counter()
            cpu = await pool.map(fns.busy, [loops] * 40)
            wall = time.perf_counter() - t0
            return sum(cpu) / 2 / wall

    return asyncio.run(run())


def dask_cpu(cluster: Any, loops: int) -> float:
    from distributed import Client

    with Client(cluster, set_as_default=False) as client:
        client.gather(client.map(fns.busy, [1000] * 4, pure=False))
        t0 = time.perf_counter()
        cpu = client.gather(client.map(fns.busy, [loops] * 40, pure=False))
        wall = time.perf_counter() - t0
        return float(sum(cpu) / 2 / wall)


def ashard_broadcast(X: np.ndarray, tasks: int, nodes: int = 2) -> tuple[float, int, int]:
    async def run(cluster: Any) -> tuple[float, int, int]:
        async with ashard.Pool(cluster=cluster) as pool:
            await pool.map(fns.noop, range(4))
            with PeakSampler() as peak:
                t0 = time.perf_counter()
                res = await pool.shard_map(
                    ashard.shards(tasks, block_size=1), fns.stride_shard,
                    borrow={"X": X, "tasks": tasks},
                )  # fmt: skip
                wall = time.perf_counter() - t0
            assert len(res.results) == tasks
            return wall, peak.peak, peak.level

    with local_cluster(nodes, 2 // nodes) as cluster:
        return asyncio.run(run(cluster))


def dask_broadcast(X: np.ndarray, tasks: int) -> tuple[float, int, int]:
    from distributed import Client

    with local_cluster() as cluster, Client(cluster, set_as_default=False) as client:
        client.gather(client.map(fns.noop, range(4), pure=False))
        with PeakSampler() as peak:
            t0 = time.perf_counter()
            future = client.scatter(X, broadcast=True)
            out = client.gather(client.map(fns.stride_sum, [future] * tasks, range(tasks),
                                           [tasks] * tasks, pure=False))  # fmt: skip
            wall = time.perf_counter() - t0
        assert len(out) == tasks
        del future
        return wall, peak.peak, peak.level


def killed(side: str, kill: bool, tmp: Path) -> float:
    from daskcluster import CliCluster

    path = os.environ.get("PYTHONPATH")  # the Dask workers unpickle `_bench_fns` too
    os.environ["PYTHONPATH"] = str(ROOT / "benchmarks") + (os.pathsep + path if path else "")
    tmp.mkdir(parents=True, exist_ok=True)
    with CliCluster(tmp, workers=2, nthreads=2) as cluster:
        timer = threading.Timer(1.0, cluster.kill_worker, (0,)) if kill else None
        if side == "ashard":

            async def run() -> float:
                async with ashard.Pool(cluster=cluster.address) as pool:
                    await pool.map(fns.noop, range(8))
                    t0 = time.perf_counter()
                    if timer is not None:
                        timer.start()
                    out = await pool.map(time.sleep, [0.2] * 40, chunk_size=1, max_retries=3)
                    assert len(out) == 40
                    return time.perf_counter() - t0

            return asyncio.run(run())
        from distributed import Client

        with Client(cluster.address, set_as_default=False) as client:
            client.gather(client.map(fns.noop, range(8), pure=False))
            t0 = time.perf_counter()
            if timer is not None:
                timer.start()
            out = client.gather(client.map(time.sleep, [0.2] * 40, pure=False))
            assert len(out) == 40
            return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--only", default="tiny,cpu,broadcast,killed")
    args = parser.parse_args()
    only = set(args.only.split(","))
    n_ashard, n_dask = (20_000, 1_000) if args.quick else (100_000, 5_000)
    mb = 100 if args.quick else 400
    rows: list[str] = []
    t_start = time.perf_counter()
    import distributed

    if only & {"tiny", "cpu"}:
        loops = calibrate(0.05)
        with local_cluster() as cluster:
            if "tiny" in only:
                a = [ashard_tiny(cluster, n_ashard) for _ in range(args.rounds)]
                d = [dask_tiny(cluster, n_dask) for _ in range(args.rounds)]
                ma, md = statistics.median(a), statistics.median(d)
                rows.append(f"| tiny | per-item µs ({n_ashard:,} items / {n_dask:,} tasks) | "
                            f"{ma:.2f} | {md:.1f} | {md / ma:.0f}x lower | >= 10x |")  # fmt: skip
            if "cpu" in only:
                a = [ashard_cpu(cluster, loops) for _ in range(args.rounds)]
                d = [dask_cpu(cluster, loops) for _ in range(args.rounds)]
                rows.append(f"| cpu | efficiency, 40 x 50 ms on 2 workers | "
                            f"{statistics.median(a):.3f} | {statistics.median(d):.3f} | | "
                            ">= 0.95 |")  # fmt: skip
    if "broadcast" in only:
        X = np.random.default_rng(0).random(mb * 2**20 // 8)
        cases = {
            "2 nodes": lambda: ashard_broadcast(X, 20),
            "1 node": lambda: ashard_broadcast(X, 20, 1),
            "dask": lambda: dask_broadcast(X, 20),
        }
        got: dict[str, list[tuple[float, int, int]]] = {k: [] for k in cases}
        for _ in range(args.rounds):
            for name, run in cases.items():
                got[name].append(run())
        med = {k: [statistics.median(r[i] for r in v) for i in range(3)] for k, v in got.items()}
        a, one, d = med["2 nodes"], med["1 node"], med["dask"]
        copies = X.nbytes
        rows.append(f"| broadcast | wall s, {mb} MB read by 20 tasks, 2 Dask workers x 1 thread "
                    f"| {a[0]:.2f} | {d[0]:.2f} | {a[0] / d[0]:.2f} | below Dask |")  # fmt: skip
        rows.append(f"| broadcast | copies of the array held in the cluster, peak / during the "
                    f"run (2 nodes) | {a[1] / copies:.2f} / {a[2] / copies:.2f} | "
                    f"{d[1] / copies:.2f} / {d[2] / copies:.2f} | | one per node |")  # fmt: skip
        rows.append(f"| broadcast | one machine as one node (ashard: 1 Dask worker x 2 ashard "
                    f"workers; Dask: 2 x 1): wall s | {one[0]:.2f} | {d[0]:.2f} | "
                    f"{one[0] / d[0]:.2f} | below Dask |")  # fmt: skip
        rows.append(f"| broadcast | one machine as one node: copies, peak / during the run | "
                    f"{one[1] / copies:.2f} / {one[2] / copies:.2f} | {d[1] / copies:.2f} / "
                    f"{d[2] / copies:.2f} | | one per node |")  # fmt: skip
    if "killed" in only:
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-dask-{os.getpid()}"
        res: dict[tuple[str, bool], list[float]] = {}
        for r in range(args.rounds):
            for side in ("ashard", "dask"):
                for kill in (False, True):
                    took = killed(side, kill, tmp / f"{r}{side}{kill}")
                    res.setdefault((side, kill), []).append(took)
        for kill in (False, True):
            what = "one Dask worker SIGKILLed at 1 s" if kill else "nothing killed"
            a = statistics.median(res[("ashard", kill)])
            d = statistics.median(res[("dask", kill)])
            rows.append(f"| killed | s until all 40 x 0.2 s results, {what} | {a:.2f} | "
                        f"{d:.2f} | {a / d:.2f} | |")  # fmt: skip
    lines = [
        "## ashard on Dask beside plain Dask (`benchmarks/bench_dask.py`)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, distributed {distributed.__version__}; medians "
        f"of {args.rounds} rounds; whole run {time.perf_counter() - t_start:.0f} s. "
        "2 Dask workers (LocalCluster processes, 1 thread each; `killed`: dask scheduler/"
        "worker processes with 2 threads each).",
        "",
        "| case | metric | ashard on Dask | plain Dask | ashard / Dask | target |",
        "|---|---|---:|---:|---:|---|",
        *rows,
    ]
    text = "\n".join(lines)
    print(text)
    if args.record:
        import suite

        suite.record(text + "\n", START, END, append=True)


if __name__ == "__main__":
    main()

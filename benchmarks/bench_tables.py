"""Tables, large results and reductions: the caller's memory and time, ashard beside peers.

What the caller (the coordinator) holds while shards make tables, write them, return one
large array or are reduced, and how long it takes.

``python benchmarks/bench_tables.py [--quick] [--only memory,throughput,large,reduce]
[--rounds 3] [--shards 100000] [--record]``

Every case runs alone in a fresh interpreter (``--child``), one after another, with a pause
of ``--pause`` seconds before each (pages freed in the last seconds are faulted in faster
than fresh ones), under a time limit (``--case-timeout``: the case's process group is
killed, and whatever it left behind). A case that fails is reported as ``error: ...`` and
the run goes on. Figures are medians over ``--rounds`` fresh interpreters for the cheap
groups (throughput, large, reduce); the memory group runs each case once.

Memory: the caller's peak RSS growth over the timed region, from the kernel's high-water
mark: VmHWM is reset (``echo 5 > /proc/self/clear_refs``) when the region starts, and the
growth is VmHWM at its end minus VmRSS at its start; "held" is VmRSS at the end minus VmRSS
at the start. (Where the reset is refused, a thread samples VmRSS every millisecond
instead; the header says which ran.) RSS counts the pages of shared memory the caller has
touched (a result handed over in a shared segment, Ray's zero-copy objects) like its own.
Only the caller's process is measured: workers, Ray's daemons and Dask's workers are not;
Dask's scheduler runs inside the caller (LocalCluster) and counts.

Groups:

memory      ``--shards`` shards (default 100,000; ``--quick`` 2,000), each making a 1,000-row
            table (int64 id, float64 x, a 3-character string), on 2 workers. Timed: the
            call until the caller can count the rows. ashard ``results="table"`` + the
            rows counted from ``res.refs`` (``res.dataset().count_rows()`` measured
            apart); ashard gather (``results="memory"``) +
            ``pa.concat_tables(res.results)``; ashard ``table_sink`` (workers write
            ``rows.write(table)``) + rows from ``sink.refs``; Dask LocalCluster
            (2 processes x 1 thread) ``client.map`` + ``gather`` + concat; joblib
            ``Parallel(n_jobs=2)`` + concat. Closing the sink / result (removing the
            files) is timed apart.
throughput  rows/s written: ``--tp-shards`` shards of ``--tp-rows`` rows; workers write
            through ``table_sink(format="parquet" | "arrow")``, vs the same workers
            returning tables (``shard_stream``) and the caller writing them as they arrive
            with ``pq.ParquetWriter`` / ``pa.ipc.new_file`` into one file; and the same
            shards making the tables and returning only their row count (the reference:
            no writing, no transfer).
large       one shard returns a ``--mb`` MB float64 array (``np.ones``). Hand-off: from the
            moment the worker's function returns (it stamps ``time.monotonic()`` -- the
            system-wide CLOCK_MONOTONIC -- into a file just before returning) to the
            caller holding the array; also the whole call minus the build time the
            function measured itself. ashard ``call`` and ``shard_map(1, ...)``,
            ProcessPoolExecutor (forkserver) ``submit().result()`` and
            ``loop.run_in_executor``, loky, Ray ``ray.get`` (``ray.init(num_cpus=2)``
            reported apart). The caller then reads the whole array (``arr.sum()``, "read
            s") before the peak is taken, so memory mapped without a copy counts once it
            is touched. Peak growth is given in units of the array (1.0x = one copy).
            Beside it: ``np.ones`` of that size in a fresh process, and again right after
            freeing it (the page-fault cost that every build and every copy pays).
reduce      ``--reduce-shards`` one-item shards (default 1,000,000), ``fn`` returns
            ``shard.id * 2``: ``shard_reduce(..., operator.add)`` vs ``shard_map`` +
            ``sum(res.results)``; shards/s and the caller's peak RSS growth.

``--record`` writes the tables into benchmarks/RESULTS.md between
``<!-- bench_tables:start -->`` and ``<!-- bench_tables:end -->`` (appended if absent);
``--json PATH`` also writes every round's raw figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import operator
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    import ashard

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
LOGS = BENCH_DIR / "results" / "logs"
START, END = "<!-- bench_tables:start -->", "<!-- bench_tables:end -->"
WORKERS = 2
ROWS = 1_000  # rows per shard in the memory group
MB = 1e6

Row = dict[str, Any]

# -- what workers run (imported by name from this module, never pickled by value) ------------

_STRINGS: dict[int, Any] = {}


def strings(rows: int) -> pa.Array:
    """A string column of `rows` 3-character values, made once per process."""
    if rows not in _STRINGS:
        import pyarrow as pa

        _STRINGS[rows] = pa.array([f"k{i % 97:02d}" for i in range(rows)])
    return _STRINGS[rows]


def make_table(k: int, rows: int = ROWS) -> pa.Table:
    """Table number `k`: ids k*rows .. (k+1)*rows-1, x = id / 2, a short string."""
    import numpy as np
    import pyarrow as pa

    ids = np.arange(k * rows, (k + 1) * rows, dtype=np.int64)
    return pa.table({"id": ids, "x": ids * 0.5, "s": strings(rows)})


def table_shard(shard: ashard.Shard, rows: int = ROWS) -> pa.Table:
    return make_table(shard.id, rows)


def sink_shard(shard: ashard.Shard, rows: Any, n_rows: int = ROWS) -> None:
    rows.write(make_table(shard.id, n_rows))


def count_shard(shard: ashard.Shard, rows: int = ROWS) -> int:
    return int(make_table(shard.id, rows).num_rows)


def make_big(n: int, stamp: str | None) -> np.ndarray[Any, Any]:
    """`n` float64 ones; writes {"build_s", "returned"} (CLOCK_MONOTONIC) to `stamp`."""
    import numpy as np

    t0 = time.monotonic()
    arr = np.ones(n)
    build = time.monotonic() - t0
    if stamp is not None:
        with open(stamp, "w") as f:
            f.write(json.dumps({"build_s": build, "returned": time.monotonic()}))
    return arr


def big_shard(shard: ashard.Shard, n: int, stamp: str | None) -> np.ndarray[Any, Any]:
    return make_big(n, stamp)


def double_id(shard: ashard.Shard) -> int:
    return shard.id * 2


# -- the caller's memory -----------------------------------------------------------------------


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) << 10
    raise KeyError(key)


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") <= _status_kb("VmRSS") + (1 << 20)


class CallerMemory:
    """Peak RSS growth of this process over a region: VmHWM after a reset, or sampled."""

    method = "VmHWM"

    def __enter__(self) -> CallerMemory:
        gc.collect()
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self.base = _status_kb("VmRSS")
        self._peak = self.base
        self.laps: Row = {}
        if not _reset_hwm():
            CallerMemory.method = "VmRSS sampled every 1 ms"
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        self._t0 = self._last = time.perf_counter()
        return self

    def lap(self, name: str) -> None:
        """Record `name`_s (seconds since the previous lap) and `name`_rss_mb (RSS growth
        now)."""
        now = time.perf_counter()
        self.laps[f"{name}_s"] = now - self._last
        self.laps[f"{name}_rss_mb"] = (_status_kb("VmRSS") - self.base) / MB
        self._last = now

    def row(self) -> Row:
        """wall_s (enter to exit), peak_mb, held_mb and the laps."""
        return {"wall_s": self.wall, "peak_mb": self.peak / MB, "held_mb": self.held / MB,
                **self.laps}  # fmt: skip

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.wait(0.001):
            with open("/proc/self/statm") as f:
                self._peak = max(self._peak, int(f.read().split()[1]) * page)

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self.peak = max(self._peak, _status_kb("VmRSS")) - self.base
        else:
            self.peak = _status_kb("VmHWM") - self.base
        self.held = _status_kb("VmRSS") - self.base


# -- memory: 100,000 shards of 1,000-row tables ---------------------------------------------


def _tables_expected(shards: int) -> int:
    return shards * ROWS


def _dataset_count(dataset: Any) -> Row:
    """What counting the rows through the lazy pyarrow Dataset costs the caller, apart
    (pyarrow keeps every fragment's file metadata)."""
    with CallerMemory() as mem:
        dataset().count_rows()
    return {"ds_count_s": mem.wall, "ds_count_peak_mb": mem.peak / MB}


async def _ashard_tables(how: str, shards: int, tmp: Path) -> Row:
    import pyarrow as pa

    import ashard

    layout = ashard.shards(shards, block_size=1)
    warm = ashard.shards(4, block_size=1)
    t0 = time.perf_counter()
    async with ashard.Pool(WORKERS) as pool:
        await pool.shard_map(warm, table_shard)  # workers up, pyarrow imported
        start_s = time.perf_counter() - t0
        row: Row = {"start_s": start_s}
        if how == "table":
            with await pool.shard_map(warm, table_shard, results="table") as res:
                res.dataset().count_rows()
            with CallerMemory() as mem:
                res = await pool.shard_map(layout, table_shard, results="table")
                mem.lap("call")
                rows = sum(ref.rows for ref in res.refs if ref is not None)
                mem.lap("count")
            row.update(_dataset_count(res.dataset))
            t = time.perf_counter()
            res.close()
            row["close_s"] = time.perf_counter() - t
        elif how == "gather":
            with CallerMemory() as mem:
                res = await pool.shard_map(layout, table_shard)
                mem.lap("call")
                rows = pa.concat_tables(res.results).num_rows
                mem.lap("concat")
        else:  # sink
            with ashard.table_sink(tmp / "warm") as sink:
                await pool.shard_map(warm, sink_shard, out={"rows": sink})
                sink.dataset().count_rows()
            with CallerMemory() as mem:
                sink = ashard.table_sink()
                await pool.shard_map(layout, sink_shard, out={"rows": sink})
                mem.lap("call")
                rows = sum(ref.rows for ref in sink.refs)
                mem.lap("count")
            row.update(_dataset_count(sink.dataset))
            t = time.perf_counter()
            sink.close()
            row["close_s"] = time.perf_counter() - t
        row["crashed"] = pool.stats.crashed
    return {**row, **mem.row(), "rows": rows}


def mem_dask(shards: int) -> Row:
    import pyarrow as pa
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    with (
        LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True,
                     dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        client.gather(client.map(make_table, range(4), pure=False))
        start_s = time.perf_counter() - t0
        with CallerMemory() as mem:
            futures = client.map(make_table, range(shards), pure=False)
            tables = client.gather(futures)
            mem.lap("call")
            rows = pa.concat_tables(tables).num_rows
            mem.lap("concat")
        del futures
    return {**mem.row(), "rows": rows, "start_s": start_s}


def mem_joblib(shards: int) -> Row:
    import pyarrow as pa
    from joblib import Parallel, delayed

    t0 = time.perf_counter()
    with Parallel(n_jobs=WORKERS) as parallel:
        parallel(delayed(make_table)(i) for i in range(4))
        start_s = time.perf_counter() - t0
        with CallerMemory() as mem:
            tables = parallel(delayed(make_table)(i) for i in range(shards))
            mem.lap("call")
            rows = pa.concat_tables(tables).num_rows
            mem.lap("concat")
    return {**mem.row(), "rows": rows, "start_s": start_s}


# -- throughput: rows/s written --------------------------------------------------------------


async def _throughput(how: str, shards: int, rows: int, tmp: Path) -> Row:
    import pyarrow as pa
    import pyarrow.ipc
    import pyarrow.parquet as pq

    import ashard

    layout = ashard.shards(shards, block_size=1)
    warm = ashard.shards(2, block_size=1)
    schema = make_table(0, rows).schema
    out: Row = {}
    async with ashard.Pool(WORKERS) as pool:
        count = functools.partial(count_shard, rows=rows)
        await pool.shard_map(warm, count)
        if how == "build-only":
            t = time.perf_counter()
            res = await pool.shard_map(layout, count)
            wall = time.perf_counter() - t
            written, nbytes = sum(res.results), 0
        elif how.startswith("sink-"):
            fmt: Literal["parquet", "arrow"] = "parquet" if how == "sink-parquet" else "arrow"
            write = functools.partial(sink_shard, n_rows=rows)
            with ashard.table_sink(tmp / "warm", format=fmt) as sink:
                await pool.shard_map(warm, write, out={"rows": sink})
            sink = ashard.table_sink(tmp / "sink", format=fmt)
            t = time.perf_counter()
            await pool.shard_map(layout, write, out={"rows": sink})
            wall = time.perf_counter() - t
            written = sum(ref.rows for ref in sink.refs)
            nbytes = sum(ref.bytes for ref in sink.refs)
            sink.close()
        else:  # caller-parquet, caller-arrow
            make = functools.partial(table_shard, rows=rows)
            await pool.shard_map(warm, make)
            path = tmp / f"out.{how.removeprefix('caller-')}"
            written = 0
            t = time.perf_counter()
            async with pool.shard_stream(layout, make) as stream:
                if how == "caller-parquet":
                    with pq.ParquetWriter(path, schema) as pw:
                        async for done in stream:
                            pw.write_table(done.value)
                            written += done.value.num_rows
                else:
                    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, schema) as aw:
                        async for done in stream:
                            aw.write_table(done.value)
                            written += done.value.num_rows
            wall = time.perf_counter() - t
            nbytes = path.stat().st_size
        out["crashed"] = pool.stats.crashed
    if written != shards * rows:
        raise AssertionError(f"{written} rows written, expected {shards * rows}")
    out.update(wall_s=wall, rows=written, file_mb=nbytes / MB, mrows_per_s=written / wall / 1e6,
               mb_per_s=nbytes / wall / MB)  # fmt: skip
    return out


# -- large: one 400 MB result ----------------------------------------------------------------


def _handoff(arr: np.ndarray[Any, Any], stamp: Path, t_start: float, t_end: float) -> Row:
    info = json.loads(stamp.read_text())
    return {"handoff_s": t_end - info["returned"], "call_s": t_end - t_start,
            "call_minus_build_s": t_end - t_start - info["build_s"],
            "build_s": info["build_s"]}  # fmt: skip


def _read(arr: np.ndarray[Any, Any], n: int) -> float:
    t = time.perf_counter()
    total = float(arr.sum())
    took = time.perf_counter() - t
    if total != n:
        raise AssertionError(f"sum {total}, expected {n}")
    return took


def large_fresh_pages(n: int) -> Row:
    import numpy as np

    t = time.perf_counter()
    arr = np.ones(n)
    fresh = time.perf_counter() - t
    del arr
    t = time.perf_counter()
    arr = np.ones(n)
    again = time.perf_counter() - t
    del arr
    return {"fresh_s": fresh, "again_s": again, "fresh_gbps": n * 8 / fresh / 1e9,
            "again_gbps": n * 8 / again / 1e9}  # fmt: skip


def _large_timed(get: Callable[[str], np.ndarray[Any, Any]], n: int, tmp: Path) -> Row:
    stamp = tmp / "stamp.json"
    with CallerMemory() as mem:
        t_start = time.monotonic()
        arr = get(str(stamp))
        t_end = time.monotonic()
        read_s = _read(arr, n)
    row = _handoff(arr, stamp, t_start, t_end)
    row.update(read_s=read_s, peak_x=mem.peak / (n * 8), held_x=mem.held / (n * 8),
               writeable=bool(arr.flags.writeable))  # fmt: skip
    return row


async def _large_ashard(how: str, n: int, tmp: Path) -> Row:
    import ashard

    await ashard.shard_map(1, functools.partial(big_shard, n=1000, stamp=None), workers=WORKERS)
    await ashard.call(make_big, 1000, None)  # the default pool, sized WORKERS, is warm
    stamp = tmp / "stamp.json"
    with CallerMemory() as mem:
        t_start = time.monotonic()
        if how == "call":
            arr = await ashard.call(make_big, n, str(stamp))
        else:
            res = await ashard.shard_map(1, functools.partial(big_shard, n=n, stamp=str(stamp)))
            arr = res.results[0]
            del res
        t_end = time.monotonic()
        read_s = _read(arr, n)
    row = _handoff(arr, stamp, t_start, t_end)
    row.update(read_s=read_s, peak_x=mem.peak / (n * 8), held_x=mem.held / (n * 8),
               writeable=bool(arr.flags.writeable))  # fmt: skip
    del arr
    row["crashed"] = ashard.default_pool().stats.crashed
    await ashard.shutdown()
    return row


def large_ppe(n: int, tmp: Path, asyncio_loop: bool) -> Row:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(WORKERS, mp_context=ctx) as ex:
        if not asyncio_loop:
            ex.submit(make_big, 1000, None).result()
            return _large_timed(lambda s: ex.submit(make_big, n, s).result(), n, tmp)

        async def main() -> Row:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(ex, make_big, 1000, None)
            stamp = tmp / "stamp.json"
            with CallerMemory() as mem:
                t_start = time.monotonic()
                arr = await loop.run_in_executor(ex, make_big, n, str(stamp))
                t_end = time.monotonic()
                read_s = _read(arr, n)
            row = _handoff(arr, stamp, t_start, t_end)
            row.update(read_s=read_s, peak_x=mem.peak / (n * 8), held_x=mem.held / (n * 8),
                       writeable=bool(arr.flags.writeable))  # fmt: skip
            return row

        return asyncio.run(main())


def large_loky(n: int, tmp: Path) -> Row:
    import loky

    ex = loky.get_reusable_executor(max_workers=WORKERS)
    ex.submit(make_big, 1000, None).result()
    row = _large_timed(lambda s: ex.submit(make_big, n, s).result(), n, tmp)
    ex.shutdown()
    return row


def large_ray(n: int, tmp: Path) -> Row:
    import ray

    t = time.perf_counter()
    ray.init(num_cpus=WORKERS, include_dashboard=False, logging_level="ERROR")
    init_s = time.perf_counter() - t
    try:
        remote = ray.remote(make_big)
        ray.get(remote.remote(1000, None))
        row = _large_timed(lambda s: ray.get(remote.remote(n, s)), n, tmp)
    finally:
        ray.shutdown()
    return {**row, "init_s": init_s}


# -- reduce: 1,000,000 small shards ----------------------------------------------------------


async def _reduce(how: str, shards: int) -> Row:
    import ashard

    layout = ashard.shards(shards, block_size=1)
    async with ashard.Pool(WORKERS) as pool:
        await pool.shard_map(ashard.shards(1000, block_size=1), double_id)  # warm
        with CallerMemory() as mem:
            t = time.perf_counter()
            if how == "reduce":
                red = await ashard.shard_reduce(layout, double_id, operator.add, pool=pool)
                total = red.value
            else:
                res = await pool.shard_map(layout, double_id)
                total = sum(res.results)
            wall = time.perf_counter() - t
        crashed = pool.stats.crashed
    if total != shards * (shards - 1):
        raise AssertionError(f"total {total}, expected {shards * (shards - 1)}")
    return {"wall_s": wall, "shards_per_s": shards / wall, "peak_mb": mem.peak / MB,
            "held_mb": mem.held / MB, "crashed": crashed}  # fmt: skip


# -- the cases -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    shards: int
    tp_shards: int
    tp_rows: int
    mb: int
    reduce_shards: int

    @property
    def n(self) -> int:
        return self.mb * 1_000_000 // 8


CaseFn = Callable[[Sizes, Path], Row]

CASES: dict[str, dict[str, tuple[str, CaseFn]]] = {
    "memory": {
        "ashard-table": ('ashard shard_map(results="table") + rows from res.refs',
                         lambda s, t: asyncio.run(_ashard_tables("table", s.shards, t))),
        "ashard-gather": ("ashard shard_map (results in memory) + pa.concat_tables",
                          lambda s, t: asyncio.run(_ashard_tables("gather", s.shards, t))),
        "ashard-sink": ("ashard table_sink (workers write) + rows from sink.refs",
                        lambda s, t: asyncio.run(_ashard_tables("sink", s.shards, t))),
        "dask": ("Dask LocalCluster: client.map + gather + pa.concat_tables",
                 lambda s, t: mem_dask(s.shards)),
        "joblib": ("joblib Parallel(n_jobs=2) + pa.concat_tables",
                   lambda s, t: mem_joblib(s.shards)),
    },
    "throughput": {
        "build-only": ("workers make the tables, return the row count (reference)",
                       lambda s, t: asyncio.run(_throughput("build-only", s.tp_shards,
                                                            s.tp_rows, t))),
        "sink-parquet": ('ashard table_sink(format="parquet"), workers write',
                         lambda s, t: asyncio.run(_throughput("sink-parquet", s.tp_shards,
                                                              s.tp_rows, t))),
        "caller-parquet": ("workers return tables, caller writes pq.ParquetWriter",
                           lambda s, t: asyncio.run(_throughput("caller-parquet", s.tp_shards,
                                                                s.tp_rows, t))),
        "sink-arrow": ('ashard table_sink(format="arrow"), workers write',
                       lambda s, t: asyncio.run(_throughput("sink-arrow", s.tp_shards,
                                                            s.tp_rows, t))),
        "caller-arrow": ("workers return tables, caller writes pa.ipc.new_file",
                         lambda s, t: asyncio.run(_throughput("caller-arrow", s.tp_shards,
                                                              s.tp_rows, t))),
    },
    "large": {
        "fresh-pages": ("np.ones in a fresh process (reference)",
                        lambda s, t: large_fresh_pages(s.n)),
        "ashard-call": ("ashard call", lambda s, t: asyncio.run(_large_ashard("call", s.n, t))),
        "ashard-shard_map": ("ashard shard_map(1, ...)",
                             lambda s, t: asyncio.run(_large_ashard("map", s.n, t))),
        "ppe": ("ProcessPoolExecutor (forkserver) submit().result()",
                lambda s, t: large_ppe(s.n, t, asyncio_loop=False)),
        "ppe-asyncio": ("ProcessPoolExecutor (forkserver) loop.run_in_executor",
                        lambda s, t: large_ppe(s.n, t, asyncio_loop=True)),
        "loky": ("loky get_reusable_executor submit().result()", lambda s, t: large_loky(s.n, t)),
        "ray": ("Ray ray.get", lambda s, t: large_ray(s.n, t)),
    },
    "reduce": {
        "ashard-reduce": ("ashard shard_reduce(..., operator.add)",
                          lambda s, t: asyncio.run(_reduce("reduce", s.reduce_shards))),
        "ashard-map-sum": ("ashard shard_map + sum(res.results)",
                           lambda s, t: asyncio.run(_reduce("map", s.reduce_shards))),
    },
}  # fmt: skip
REPEATED = {"throughput", "large", "reduce"}  # groups that take --rounds


def child(group: str, case: str, sizes: Sizes, tmp_root: str | None) -> None:
    out: Row
    try:
        with tempfile.TemporaryDirectory(prefix="bench_tables-", dir=tmp_root) as tmp:
            out = CASES[group][case][1](sizes, Path(tmp))
        out["memory_method"] = CallerMemory.method
    except BaseException as exc:
        traceback.print_exc()
        text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
        out = {"error": text[:200]}
    print("RESULT " + json.dumps(out, default=str), flush=True)
    sys.stderr.flush()
    os._exit(0)  # whatever a peer left running is reaped by the orchestrator


# -- the orchestrator ------------------------------------------------------------------------


def run_case(group: str, case: str, args: argparse.Namespace, sizes: Sizes, k: int) -> Row:
    sys.path.insert(0, str(BENCH_DIR))
    import suite  # become_subreaper, kill_leftovers, shm bookkeeping: as the suite does

    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", group, case,
           "--shards", str(sizes.shards), "--tp-shards", str(sizes.tp_shards),
           "--tp-rows", str(sizes.tp_rows), "--mb", str(sizes.mb),
           "--reduce-shards", str(sizes.reduce_shards)]  # fmt: skip
    if args.tmp:
        cmd += ["--tmp", args.tmp]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")]))
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"bench_tables-{group}-{case}-{k}.log"
    shm_before = suite.shm_entries()
    time.sleep(args.pause)
    t0 = time.perf_counter()
    with open(log, "w") as err, tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=BENCH_DIR, env=env, stdout=out, stderr=err,
                                start_new_session=True)  # fmt: skip
        try:
            proc.wait(timeout=args.case_timeout)
            result: Row = {"error": f"exited with {proc.returncode} without a result ({log})"}
        except subprocess.TimeoutExpired:
            result = {"error": f"no result within {args.case_timeout:.0f} s (killed)"}
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        for line in out.read().splitlines():
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT ") :])
    suite.remove_new_shm(shm_before)
    suite.kill_leftovers()
    result["case_s"] = time.perf_counter() - t0
    return result


def median_row(runs: list[Row]) -> Row:
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": runs[0]["error"], "runs": 0}
    out = dict(good[0])
    for key, value in good[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in good if key in r)
    out["crashed"] = sum(r.get("crashed", 0) for r in good)  # in all runs, not a median
    out["runs"] = len(good)
    if len(good) < len(runs):
        failed = next(r["error"] for r in runs if "error" in r)
        out["failed"] = f"{len(runs) - len(good)} of {len(runs)} runs failed ({failed})"
    return out


def _notes(row: Row, *extra: str) -> str:
    """The notes cell: `extra`, worker crashes, failed runs, the number of runs."""
    notes = [e for e in extra if e]
    if row.get("crashed"):
        notes.append(f"**{row['crashed']} worker crash(es)** (see results/logs)")
    if row.get("failed"):
        notes.append(row["failed"])
    notes.append(f"runs {row['runs']}")
    return "; ".join(notes)


def _f(row: Row, key: str, fmt: str) -> str:
    value = row.get(key)
    return "" if value is None else fmt.format(value)


def _ratio(row: Row, ref: Row | None, key: str) -> str:
    mine, theirs = row.get(key), (ref or {}).get(key)
    if isinstance(mine, int | float) and isinstance(theirs, int | float) and theirs:
        return f"{mine / theirs:.2f}"
    return "-"


def _error_row(label: str, row: Row, cells: int) -> str:
    return f"| {label} | error: {row['error']} |" + " |" * (cells - 1)


def table_memory(rows: dict[str, Row], sizes: Sizes) -> list[str]:
    data_mb = sizes.shards * ROWS * (8 + 8 + 4 + 3) / MB  # id, x, string offsets + bytes
    ref = rows.get("ashard-table")
    lines = [f"{sizes.shards:,} shards x {ROWS:,} rows (int64, float64, 3-char string; "
             f"{data_mb:,.0f} MB of Arrow data in all), {WORKERS} workers; one run per case.",
             "",
             "| case | wall s | caller peak RSS growth MB | held after MB | peak / data "
             "| rows | ratio to results=\"table\" (wall / peak) | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for case, (label, _) in CASES["memory"].items():
        if case not in rows:
            continue
        row = rows[case]
        if "error" in row:
            lines.append(_error_row(label, row, 7))
            continue
        after = next(k[:-2] for k in ("count_s", "concat_s") if k in row)
        notes = [f"call {row['call_s']:.2f} s (RSS after it +{row['call_rss_mb']:,.0f} MB), "
                 f"{after} {row[after + '_s']:.2f} s",
                 f"pool/cluster start {row['start_s']:.1f} s" if "start_s" in row else "",
                 f"close {row['close_s']:.1f} s" if "close_s" in row else "",
                 f"then dataset().count_rows(): {row['ds_count_s']:.1f} s, peak "
                 f"+{row['ds_count_peak_mb']:,.0f} MB (pyarrow's fragment metadata)"
                 if "ds_count_s" in row else ""]  # fmt: skip
        if row.get("rows") != sizes.shards * ROWS:
            notes.append(f"WRONG row count (expected {sizes.shards * ROWS:,})")
        peak_x = row["peak_mb"] / data_mb if data_mb else 0.0
        lines.append(
            f"| {label} | {row['wall_s']:.2f} | {row['peak_mb']:,.0f} | {row['held_mb']:,.0f} "
            f"| {peak_x:.2f} | {row['rows']:,} | {_ratio(row, ref, 'wall_s')} / "
            f"{_ratio(row, ref, 'peak_mb')} | {_notes(row, *notes)} |"
        )
    return lines


def table_throughput(rows: dict[str, Row], sizes: Sizes) -> list[str]:
    lines = [f"{sizes.tp_shards:,} shards x {sizes.tp_rows:,} rows "
             f"({sizes.tp_shards * sizes.tp_rows:,} rows), {WORKERS} workers; medians.",
             "",
             "| case | M rows/s | file MB/s | wall s | file MB | ratio to caller-writes "
             "(rows/s) | notes |",
             "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for case, (label, _) in CASES["throughput"].items():
        if case not in rows:
            continue
        row = rows[case]
        if "error" in row:
            lines.append(_error_row(label, row, 6))
            continue
        ref = rows.get(case.replace("sink-", "caller-")) if case.startswith("sink-") else None
        ratio = _ratio(row, ref, "mrows_per_s") if ref else ""
        files = f"{row['mb_per_s']:.0f} | {row['wall_s']:.2f} | {row['file_mb']:.0f}"
        if case == "build-only":
            files = f" | {row['wall_s']:.2f} | "
        lines.append(f"| {label} | {row['mrows_per_s']:.2f} | {files} | {ratio} | {_notes(row)} |")
    return lines


def table_large(rows: dict[str, Row], sizes: Sizes) -> list[str]:
    ref = rows.get("ashard-call")
    lines = [f"One {sizes.mb} MB float64 array returned by one shard; medians.", "",
             "| case | hand-off s (fn returned -> caller holds it) | call s - build s "
             "| build s (in the worker) | read s | caller peak / array | held / array "
             "| ratio to ashard call (hand-off) | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for case, (label, _) in CASES["large"].items():
        if case not in rows:
            continue
        row = rows[case]
        if "error" in row:
            lines.append(_error_row(label, row, 8))
            continue
        if case == "fresh-pages":
            lines.append(
                f"| {label} | | | {row['fresh_s']:.3f} | | | | | fresh pages "
                f"{row['fresh_gbps']:.2f} GB/s; again right after freeing {row['again_s']:.3f} s"
                f" ({row['again_gbps']:.2f} GB/s); {_notes(row)} |"
            )
            continue
        notes = ["" if row.get("writeable", True) else "read-only array",
                 f"ray.init {row['init_s']:.1f} s" if "init_s" in row else ""]  # fmt: skip
        lines.append(
            f"| {label} | {row['handoff_s']:.3f} | {row['call_minus_build_s']:.3f} "
            f"| {row['build_s']:.3f} | {row['read_s']:.3f} | {row['peak_x']:.2f}x "
            f"| {row['held_x']:.2f}x | {_ratio(row, ref, 'handoff_s')} | {_notes(row, *notes)} |"
        )
    return lines


def table_reduce(rows: dict[str, Row], sizes: Sizes) -> list[str]:
    ref = rows.get("ashard-map-sum")
    lines = [f"{sizes.reduce_shards:,} one-item shards, fn returns shard.id * 2, {WORKERS} "
             "workers; medians.", "",
             "| case | wall s | shards/s | caller peak RSS growth MB | held after MB "
             "| throughput ratio to shard_map + sum | notes |",
             "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for case, (label, _) in CASES["reduce"].items():
        if case not in rows:
            continue
        row = rows[case]
        if "error" in row:
            lines.append(_error_row(label, row, 6))
            continue
        lines.append(
            f"| {label} | {row['wall_s']:.2f} | {row['shards_per_s']:,.0f} "
            f"| {row['peak_mb']:.1f} | {row['held_mb']:.1f} "
            f"| {_ratio(row, ref, 'shards_per_s')} | {_notes(row)} |"
        )
    return lines


TITLES: dict[str, tuple[str, Callable[[dict[str, Row], Sizes], list[str]]]] = {
    "memory": ("Coordinator memory: many shards of small tables", table_memory),
    "throughput": ("Table throughput: rows written per second", table_throughput),
    "large": ("Large results: one array from a worker to the caller", table_large),
    "reduce": ("shard_reduce vs shard_map + sum", table_reduce),
}


def versions() -> str:
    from importlib import metadata

    names = ["ashard", "numpy", "pyarrow", "pandas", "dask", "distributed", "joblib", "loky",
             "ray"]  # fmt: skip
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def selected(only: str | None) -> Iterator[tuple[str, str]]:
    """(group, case) pairs: `only` lists groups or group.case names, comma-separated."""
    wanted = [w.strip() for w in (only or ",".join(CASES)).split(",") if w.strip()]
    for group, cases in CASES.items():
        for case in cases:
            if group in wanted or f"{group}.{case}" in wanted:
                yield group, case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="groups (memory,throughput,large,reduce) or group.case")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per repeated case")
    parser.add_argument("--shards", type=int, help="memory group (default 100,000)")
    parser.add_argument("--tp-shards", type=int, help="throughput shards (default 200)")
    parser.add_argument("--tp-rows", type=int, help="rows per throughput shard (50,000)")
    parser.add_argument("--mb", type=int, help="large result size in MB (default 400)")
    parser.add_argument("--reduce-shards", type=int, help="reduce group (default 1,000,000)")
    parser.add_argument("--pause", type=float, default=3.0, help="seconds before each case")
    parser.add_argument("--case-timeout", type=float, default=1800.0)
    parser.add_argument("--tmp", help="where cases write their files (default: $TMPDIR)")
    parser.add_argument("--record", action="store_true", help="write into RESULTS.md")
    parser.add_argument("--json", type=Path, help="write every round's figures here")
    parser.add_argument("--child", nargs=2, metavar=("GROUP", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    q = args.quick
    sizes = Sizes(
        shards=args.shards or (2_000 if q else 100_000),
        tp_shards=args.tp_shards or (20 if q else 200),
        tp_rows=args.tp_rows or 50_000,
        mb=args.mb or (100 if q else 400),
        reduce_shards=args.reduce_shards or (20_000 if q else 1_000_000),
    )
    if args.child:
        import bench_tables  # workers find the functions under this module's name

        group, case = args.child
        bench_tables.child(group, case, sizes, args.tmp)
        return
    pairs = list(selected(args.only))
    if not pairs:
        parser.error(f"--only {args.only!r} names no group or case")
    sys.path.insert(0, str(BENCH_DIR))
    import report

    m = report.machine()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    doc = [f"Run {when} on {m['cpu']}, {m['cpu_count']} CPUs, {m['memory_gib']} GiB, "
           f"{m['platform']}, Python {m['python']}.", f"Versions: {versions()}.",
           f"Command: `python benchmarks/bench_tables.py {' '.join(sys.argv[1:])}`."]  # fmt: skip
    print("\n".join(doc), flush=True)
    t_all = time.perf_counter()
    raw: dict[str, dict[str, list[Row]]] = {}
    method = CallerMemory.method
    for group in dict.fromkeys(g for g, _ in pairs):
        rounds = args.rounds if group in REPEATED else 1
        merged: dict[str, Row] = {}
        for g, case in pairs:
            if g != group:
                continue
            runs = [run_case(group, case, args, sizes, k) for k in range(rounds)]
            raw.setdefault(group, {})[case] = runs
            merged[case] = median_row(runs)
            method = merged[case].get("memory_method", method)
            state = merged[case].get("error") or f"{merged[case]['case_s']:.0f} s per run"
            print(f"  {group}.{case}: {state}", file=sys.stderr, flush=True)
        title, render = TITLES[group]
        section = [f"\n### {title}\n", *render(merged, sizes)]
        print("\n".join(section), flush=True)
        doc += section
    doc.append(f"\nCaller memory from {method}. Whole run: {time.perf_counter() - t_all:.0f} s.")
    print(doc[-1])
    if args.json:
        args.json.write_text(json.dumps({"sizes": sizes.__dict__, "runs": raw}, indent=1) + "\n")
    if args.record:
        import suite

        suite.RESULTS_MD = RESULTS_MD
        text = "## Tables, large results and reductions (`benchmarks/bench_tables.py`)\n\n"
        suite.record(text + "\n".join(doc) + "\n", START, END, append=True)
        print(f"written: {RESULTS_MD}")


if __name__ == "__main__":
    main()

"""Memory and elasticity (issue 24): a memory budget against out-of-memory kills, and
how an elastic pool follows its load.

* ``memory``: in a memory cgroup limited to `--limit` MB (made for the run, root only),
  8 shards that each hold 55 % of it for 0.5 s, 2 workers: ashard without a budget
  (the kernel kills workers; ashard retries), ashard with ``mem_budget="auto"`` and
  ``footprint=`` (shards wait for room instead), `ProcessPoolExecutor`, loky and joblib
  on the same work (how they fail).

* ``burst``: a fresh interpreter submits a burst of 4·W shards of 0.3 s; the time from
  the submit to the moment every one of the W workers has started a shard. ashard
  elastic (``Pool(W, min_workers=0)``, nothing started before), ashard with a pool
  made and not entered (workers on demand), ashard warm (entered first), beside
  forkserver ``ProcessPoolExecutor`` and loky, each made just before the burst.
* ``bursty``: 8 bursts of 4·W shards of 0.1 s, separated by gaps of 0.3 s and 3 s in
  turn; worker starts, wall time, and the mean live workers (sampled every 50 ms), for
  an elastic pool (``min_workers=0, idle_timeout=1``) and a fixed one (``Pool(W)``).

    python benchmarks/bench_memory.py [--workers 2] [--rounds 3] [--limit 2000] [--record]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
START, END = "<!-- bench_memory:start -->", "<!-- bench_memory:end -->"

PRELUDE = """
import functools, json, sys, time
sys.path.insert(0, {bench!r})
import _bench_fns as fns
W = {w}
BURST_FN = functools.partial(fns.stamp_sleep, seconds=0.3)
BURSTY_FN = functools.partial(fns.stamp_sleep, seconds=0.1)
N = 4 * W

def all_busy(t0, stamps):
    first = {{}}
    for pid, t in stamps:
        first[pid] = min(t, first.get(pid, t))
    assert len(first) == W, first
    return max(first.values()) - t0
"""
BURST = {
    "ashard elastic (min_workers=0)": """
        import anyio, ashard
        async def main():
            async with ashard.Pool(W, min_workers=0) as pool:
                t0 = time.time()
                out = await pool.map(BURST_FN, range(N), chunk_size=1)
                return all_busy(t0, out)
        print(json.dumps({"busy": anyio.run(main)}))
    """,
    "ashard Pool(W), not entered": """
        import anyio, ashard
        async def main():
            pool = ashard.Pool(W)
            try:
                t0 = time.time()
                out = await pool.map(BURST_FN, range(N), chunk_size=1)
                return all_busy(t0, out)
            finally:
                await pool.aclose()
        print(json.dumps({"busy": anyio.run(main)}))
    """,
    "ashard Pool(W), entered (warm)": """
        import anyio, ashard
        async def main():
            async with ashard.Pool(W) as pool:
                t0 = time.time()
                out = await pool.map(BURST_FN, range(N), chunk_size=1)
                return all_busy(t0, out)
        print(json.dumps({"busy": anyio.run(main)}))
    """,
    "ProcessPoolExecutor (forkserver)": """
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        if __name__ == "__main__":
            with ProcessPoolExecutor(W, mp_context=mp.get_context("forkserver")) as ex:
                t0 = time.time()
                out = list(ex.map(fns.stamp_sleep, range(N), [0.3] * N))
            print(json.dumps({"busy": all_busy(t0, out)}))
    """,
    "loky": """
        from joblib.externals.loky import get_reusable_executor
        ex = get_reusable_executor(W)
        t0 = time.time()
        out = list(ex.map(fns.stamp_sleep, range(N), [0.3] * N))
        print(json.dumps({"busy": all_busy(t0, out)}))
        ex.shutdown()
    """,
}
BURSTY = """
    import anyio, ashard
    async def main():
        alive = []
        async with ashard.Pool(W, **{options}) as pool:
            async def sample():
                while True:
                    alive.append(pool.stats.alive)
                    await anyio.sleep(0.05)
            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                tg.start_soon(sample)
                for burst in range(8):
                    await pool.map(BURSTY_FN, range(N), chunk_size=1)
                    await anyio.sleep(0.3 if burst % 2 == 0 else 3.0)
                tg.cancel_scope.cancel()
            wall = time.perf_counter() - t0
            return {{"starts": pool.stats.started, "wall": wall,
                    "alive": sum(alive) / len(alive)}}
    print(json.dumps(anyio.run(main)))
"""
SHARE = 0.55
"""Each shard of the memory case holds this share of the cgroup's limit: two never fit."""
MEMORY_PRELUDE = """
import json, os, sys, time
sys.path.insert(0, {bench!r})
open({procs!r}, "w").write(str(os.getpid()))
import _bench_fns as fns
MIB, N = {mib}, 8
"""
PEER = """
def run(done):
    {run}

if __name__ == "__main__":
    t0 = time.perf_counter()
    done, outcome = [], "all done"
    try:
        run(done)
    except Exception as exc:
        outcome = type(exc).__name__
    print(json.dumps({{"ok": len(done), "killed": None, "retries": 0,
                      "wall": time.perf_counter() - t0, "outcome": outcome}}))
"""
MEMORY = {
    "ashard, no budget": """
        import anyio, ashard
        async def main():
            async with ashard.Pool(2) as pool:
                t0 = time.perf_counter()
                res = await pool.shard_map(ashard.shards(N, block_size=1),
                                           lambda s: fns.spike_mib(s.id, MIB), max_retries=3,
                                           errors="collect")
                wall = time.perf_counter() - t0
                oom = sum(1 for f in res.failures if getattr(f, "oom", False))
                return {"ok": N - len(res.failures), "killed": pool.stats.crashed,
                        "retries": res.diagnostics.retries, "wall": wall,
                        "outcome": f"{len(res.failures)} failed ({oom} named oom)"}
        print(json.dumps(anyio.run(main)))
    """,
    "ashard, mem_budget='auto', footprint": """
        import anyio, ashard
        async def main():
            async with ashard.Pool(2, mem_budget="auto") as pool:
                t0 = time.perf_counter()
                res = await pool.shard_map(ashard.shards(N, block_size=1),
                                           lambda s: fns.spike_mib(s.id, MIB), max_retries=3,
                                           errors="collect", footprint=(MIB + 30) << 20)
                wall = time.perf_counter() - t0
                m = res.diagnostics.memory
                return {"ok": N - len(res.failures), "killed": pool.stats.crashed,
                        "retries": res.diagnostics.retries, "wall": wall,
                        "outcome": f"budget {m.budget >> 20} MiB ({m.budget_source}), "
                                   f"{m.admission_waits} waits"}
        print(json.dumps(anyio.run(main)))
    """,
    "ProcessPoolExecutor": PEER.format(
        run="""
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(2) as ex:
        for f in [ex.submit(fns.spike_mib, i, MIB) for i in range(N)]:
            f.result()
            done.append(1)
    """
    ),
    "loky (joblib.externals.loky)": PEER.format(
        run="""
    from joblib.externals.loky import get_reusable_executor
    ex = get_reusable_executor(2)
    for f in [ex.submit(fns.spike_mib, i, MIB) for i in range(N)]:
        f.result()
        done.append(1)
    """
    ),
    "joblib": PEER.format(
        run="""
    from joblib import Parallel, delayed
    done += Parallel(n_jobs=2)(delayed(fns.spike_mib)(i, MIB) for i in range(N))
    """
    ),
}
BURSTY_CASES = {
    "ashard elastic (min_workers=0, idle_timeout=1)": {"min_workers": 0, "idle_timeout": 1.0},
    "ashard fixed (Pool(W))": {},
}


def run(code: str, w: int) -> dict[str, float]:
    script = PRELUDE.format(bench=str(ROOT / "benchmarks"), w=w) + textwrap.dedent(code)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    row: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return row


def memory_group(limit_mb: int) -> Path | None:
    """A memory cgroup limited to `limit_mb` (swap included), or None where none can be made."""
    import uuid

    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    name = f"ashard-bench-{uuid.uuid4().hex[:8]}"
    if v2.exists() and "memory" in v2.read_text():
        group, limits = Path("/sys/fs/cgroup") / name, ["memory.max", "memory.swap.max"]
    elif Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists():
        group = Path("/sys/fs/cgroup/memory") / name
        limits = ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
    else:
        return None
    try:
        group.mkdir()
        for i, file in enumerate(limits):
            if (group / file).exists():
                (group / file).write_text(str(limit_mb * 10**6 if i == 0 or "memsw" in file else 0))
    except OSError:
        return None
    return group


def run_memory(code: str, group: Path, limit_mb: int) -> dict[str, object]:
    mib = int(SHARE * limit_mb * 10**6) >> 20
    procs = str(group / "cgroup.procs")
    prelude = MEMORY_PRELUDE.format(bench=str(ROOT / "benchmarks"), procs=procs, mib=mib)
    out = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    if out.returncode != 0 or not out.stdout.strip():
        return {"ok": 0, "killed": None, "retries": 0, "wall": float("nan"),
                "outcome": f"the caller died (exit {out.returncode})"}  # fmt: skip
    row: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return row


def _median_of(runs: list[dict[str, object]], key: str) -> str:
    values = [float(r[key]) for r in runs if isinstance(r[key], int | float)]  # type: ignore[arg-type]
    return "—" if not values else f"{statistics.median(values):g}"


def memory_table(rounds: int, limit_mb: int) -> list[str]:
    group = memory_group(limit_mb)
    if group is None:
        return ["", "Memory: no memory cgroup could be made here (root and cgroups needed)."]
    rows: dict[str, list[dict[str, object]]] = {name: [] for name in MEMORY}
    try:
        for _ in range(rounds):
            for name, code in MEMORY.items():
                rows[name].append(run_memory(code, group, limit_mb))
    finally:
        for _ in range(100):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    mib = int(SHARE * limit_mb * 10**6) >> 20
    lines = [
        "",
        f"8 shards holding {mib} MiB each ({SHARE:.0%} of a {limit_mb} MB memory cgroup, swap "
        f"off) for 0.5 s, 2 workers; medians of {rounds} runs (outcome: the last run's):",
        "",
        "| who | shards done | workers killed | retries | wall s | outcome |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, runs in rows.items():
        med = functools.partial(_median_of, runs)
        wall = [float(r["wall"]) for r in runs]  # type: ignore[arg-type]
        lines.append(f"| {name} | {med('ok')} | {med('killed')} | {med('retries')} | "
                     f"{statistics.median(wall):.2f} | {runs[-1]['outcome']} |")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--limit", type=int, default=2000, help="MB of the memory cgroup")
    parser.add_argument("--cases", default="memory,burst,bursty")
    args = parser.parse_args()
    cases = set(args.cases.split(","))
    w = args.workers
    burst: dict[str, list[float]] = {name: [] for name in BURST}
    bursty: dict[str, list[dict[str, float]]] = {name: [] for name in BURSTY_CASES}
    for _ in range(args.rounds):
        for name, code in BURST.items() if "burst" in cases else ():
            burst[name].append(run(code, w)["busy"])
        for name, options in BURSTY_CASES.items() if "bursty" in cases else ():
            bursty[name].append(run(BURSTY.format(options=repr(options)), w))
    lines = [
        "## Memory and elastic pools (`benchmarks/bench_memory.py`)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; W = {w} workers; "
        f"medians of {args.rounds} fresh interpreters per case, cases interleaved.",
    ]
    if "memory" in cases:
        lines += memory_table(args.rounds, args.limit)
    if "burst" in cases:
        lines += burst_table(burst, w)
    if "bursty" in cases:
        lines += bursty_table(bursty, w)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.record:
        import suite  # the one place that writes RESULTS.md between markers

        suite.record(text, START, END, append=True)


def burst_table(burst: dict[str, list[float]], w: int) -> list[str]:
    lines = [
        "",
        f"A burst of {4 * w} shards of 0.3 s: seconds from the submit until every worker"
        " has started a shard.",
        "",
        "| who | all workers busy s | min-max |",
        "|---|---:|---|",
    ]
    for name, times in burst.items():
        lines.append(f"| {name} | {statistics.median(times):.3f} | "
                     f"{min(times):.3f}-{max(times):.3f} |")  # fmt: skip
    return lines


def bursty_table(bursty: dict[str, list[dict[str, float]]], w: int) -> list[str]:
    lines = [
        "",
        f"8 bursts of {4 * w} shards of 0.1 s, gaps of 0.3 s and 3 s in turn:",
        "",
        "| pool | worker starts | wall s | mean live workers |",
        "|---|---:|---:|---:|",
    ]
    for name, rows in bursty.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        lines.append(f"| {name} | {med['starts']:.0f} | {med['wall']:.2f} | "
                     f"{med['alive']:.2f} |")  # fmt: skip
    return lines


if __name__ == "__main__":
    main()

"""Scaling: ashard and its peers with 1, 2, 4 ... N workers (issue 23).

Each (case, who, workers) runs alone in a fresh interpreter, started by this script (this
same file, with ``--child``). A 1 ms ticker task runs on the caller's event loop during
the measured work and records how late each tick is; the caller's own CPU time (user +
system of this process, not its workers: `os.times`' figures, read by `getrusage`) is
read around it. Every pool is started and warmed up first. Peers run in the same run; a
peer whose calls block runs them in a thread (`anyio.to_thread`), so the loop can tick.

Cases, at full scale (``--quick``: a twentieth), for W workers:

* ``calls``: 20,000 ``await pool.call(inc, k)`` from 4·W tasks; peers:
  `anyio.to_process.run_sync` (a limiter of W) and a `ProcessPoolExecutor` through
  `loop.run_in_executor` (asyncio only).
* ``tasks``: ``await pool.map(inc, range(50,000), chunk_size=1)``; peers, chunks of 1:
  `multiprocessing.Pool.map`, `ProcessPoolExecutor.map`, loky's reusable executor and
  joblib ``Parallel(batch_size=1)``.
* ``items``: ``await pool.map(inc, range(2,000,000))`` (ashard chooses the chunks);
  peers: `Pool.map` (its default chunks), `ProcessPoolExecutor.map` and loky (chunks of
  len / 4·W), joblib ``Parallel(batch_size="auto")``.
* ``broadcast``: a `shard_map` of W shards, each summing a strided slice of a borrowed
  1 GB float64 array: first use, again (the array unchanged), and after ``X *= 3`` (the
  sums are checked every time); peers: joblib ``Parallel(max_nbytes="1M")`` (memmapping)
  in one ``with`` block, and a fork `multiprocessing.Pool` whose workers read the array
  they inherited (again only: its first use is the fork; after the change it is stale).

`multiprocessing.Pool` and `ProcessPoolExecutor` start their workers by forkserver (but
the broadcast's fork Pool); joblib is left out at W = 1, where it runs in the caller.

Reported per row: the rate (or seconds), the caller's CPU per unit of work (µs) and as a
share of the wall time, the loop's lateness p99 / max (ms). Medians over ``--rounds``
interpreters. A case that fails or runs past ``--timeout`` is a row saying so.

    python benchmarks/bench_scale.py [--workers 1,2,4] [--cases calls,tasks,items,broadcast]
        [--rounds 1] [--backend asyncio|trio] [--quick] [--timeout 300] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import anyio

import _bench_fns as fns  # the script's folder is on sys.path

HERE = Path(__file__).resolve().parent

SIZE = {"calls": 20_000, "tasks": 50_000, "items": 2_000_000, "broadcast": 1e9}  # bytes
UNIT = {"calls": "call", "tasks": "task", "items": "item", "broadcast": "call"}
WHO = {
    "calls": ("ashard", "anyio.to_process", "ProcessPoolExecutor"),
    "tasks": ("ashard", "mp.Pool", "ProcessPoolExecutor", "loky", "joblib"),
    "items": ("ashard", "mp.Pool", "ProcessPoolExecutor", "loky", "joblib"),
    "broadcast": ("ashard", "joblib", "fork mp.Pool"),
}
STRIDE = 4096  # `borrowed_sum` reads x[shard.id :: 4096]

# -- the child: one case in its own interpreter ------------------------------------------


def own_cpu() -> float:
    """User + system CPU seconds of this process (all its threads, not its children):
    `os.times`' figures, read with `getrusage` for microseconds rather than 10 ms ticks."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


async def timed(run: Callable[[], Awaitable[Any]]) -> tuple[float, float, list[float], Any]:
    """Run `run()` beside a 1 ms ticker: (wall s, caller CPU s, tick lateness s, value)."""
    late: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while True:
            await anyio.sleep(0.001)
            now = time.perf_counter()
            late.append(max(0.0, now - last - 0.001))
            last = now

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.sleep(0.05)
        late.clear()
        t0, c0 = time.perf_counter(), own_cpu()
        value = await run()
        c1, t1 = own_cpu(), time.perf_counter()
        tg.cancel_scope.cancel()
    return t1 - t0, c1 - c0, late, value


def figures(units: int, wall: float, cpu: float, late: list[float]) -> dict[str, Any]:
    late = sorted(late)
    n = len(late)
    return {
        "units": units, "wall_s": wall, "cpu_s": cpu, "rate_per_s": units / wall,
        "cpu_us_per_unit": cpu / units * 1e6, "cpu_share_pct": 100 * cpu / wall,
        "p99_ms": late[min(n - 1, int(n * 0.99))] * 1e3 if n else 0.0,
        "max_ms": late[-1] * 1e3 if n else 0.0,
    }  # fmt: skip


async def concurrently(call: Callable[[int], Awaitable[Any]], n: int, tasks: int) -> int:
    """`call(k)` for k in range(n) from `tasks` tasks; checks every result is k + 1."""

    async def caller(start: int, count: int) -> None:
        for k in range(start, start + count):
            if await call(k) != k + 1:
                raise AssertionError(f"call({k}) gave a wrong result")

    async with anyio.create_task_group() as tg:
        start = 0
        for i in range(tasks):
            count = n // tasks + (i < n % tasks)
            tg.start_soon(caller, start, count)
            start += count
    return n


async def run_calls(stack: contextlib.AsyncExitStack, who: str, w: int, n: int) -> dict:
    import ashard

    call: Callable[[int], Awaitable[Any]]
    if who == "ashard":
        pool = await stack.enter_async_context(ashard.Pool(w))
        call = lambda k: pool.call(fns.inc, k)
    elif who == "anyio.to_process":
        from anyio import to_process

        limiter = anyio.CapacityLimiter(w)
        call = lambda k: to_process.run_sync(fns.inc, k, limiter=limiter)
    else:
        import asyncio
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("forkserver")
        ex = stack.enter_context(ProcessPoolExecutor(w, mp_context=ctx))
        loop = asyncio.get_running_loop()
        call = lambda k: loop.run_in_executor(ex, fns.inc, k)
    for _ in range(2):  # warm: every worker started and used
        await concurrently(call, 8 * w, 4 * w)
    wall, cpu, late, units = await timed(lambda: concurrently(call, n, 4 * w))
    return figures(units, wall, cpu, late)


async def run_map(stack: contextlib.AsyncExitStack, case: str, who: str, w: int, n: int) -> dict:
    import ashard

    ones = case == "tasks"
    chunk = lambda m: 1 if ones else max(1, m // (4 * w))
    blocking: Callable[[int], list[Any]] | None = None
    if who == "ashard":
        pool = await stack.enter_async_context(ashard.Pool(w))
        options: dict[str, Any] = {"chunk_size": 1} if ones else {}
        mapper = lambda m: pool.map(fns.inc, range(m), **options)
        await concurrently(lambda k: pool.call(fns.inc, k), 8 * w, 4 * w)
    elif who == "mp.Pool":
        import multiprocessing

        mp = stack.enter_context(multiprocessing.get_context("forkserver").Pool(w))
        blocking = lambda m: mp.map(fns.inc, range(m), chunksize=1 if ones else None)
    elif who == "ProcessPoolExecutor":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("forkserver")
        ex = stack.enter_context(ProcessPoolExecutor(w, mp_context=ctx))
        blocking = lambda m: list(ex.map(fns.inc, range(m), chunksize=chunk(m)))
    elif who == "loky":
        try:
            from loky import get_reusable_executor
        except ImportError:
            from joblib.externals.loky import get_reusable_executor
        lex = get_reusable_executor(max_workers=w)
        blocking = lambda m: list(lex.map(fns.inc, range(m), chunksize=chunk(m)))
    else:
        from joblib import Parallel, delayed

        par = Parallel(n_jobs=w, batch_size=1 if ones else "auto")
        blocking = lambda m: par(delayed(fns.inc)(i) for i in range(m))
    if blocking is not None:
        mapper = lambda m: anyio.to_thread.run_sync(blocking, m)
    for _ in range(2):  # warm
        await mapper(100 * w)

    kept: list[Any] = []  # freed after the measurement: freeing them is the user's cost

    async def run() -> int:
        out = await mapper(n)
        if len(out) != n or out[-1] != n:
            raise AssertionError("the map gave wrong results")
        kept.append(out)
        return n

    wall, cpu, late, units = await timed(run)
    kept.clear()
    return figures(units, wall, cpu, late)


async def run_broadcast(stack: contextlib.AsyncExitStack, who: str, w: int, scale: float) -> dict:
    import numpy as np

    import ashard

    X = np.random.default_rng(0).random(int(SIZE["broadcast"] * scale) // 8)
    once: Callable[[], Awaitable[float]]
    if who == "ashard":
        pool = await stack.enter_async_context(ashard.Pool(w))
        await pool.map(fns.inc, range(100 * w), chunk_size=1)

        async def once() -> float:
            res = await pool.shard_map(w, fns.borrowed_sum, borrow={"x": X})
            if not res.ok:
                raise RuntimeError(f"shard_map failed: {res.failures[:1]}")
            return float(sum(res.results))
    elif who == "joblib":
        from joblib import Parallel, delayed

        par = stack.enter_context(Parallel(n_jobs=w, max_nbytes="1M"))
        par(delayed(fns.inc)(i) for i in range(4 * w))
        job = lambda: par(delayed(fns.stride_sum)(X, k, STRIDE) for k in range(w))

        async def once() -> float:
            return float(sum(await anyio.to_thread.run_sync(job)))
    else:  # forked before any thread starts: the workers inherit X (copy-on-write)
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        mp = stack.enter_context(ctx.Pool(w, initializer=fns.set_x, initargs=(X,)))
        args = [(k, STRIDE) for k in range(w)]

        async def once() -> float:
            got = await anyio.to_thread.run_sync(mp.starmap, fns.stride_sum_global, args)
            return float(sum(got))

    out: dict[str, Any] = {}
    walls, cpus, lates, right = [], [], [], {}
    for phase in ("first", "again", "after"):
        if phase == "after":
            X *= 3  # in place: same object, same address, new values
        want = sum(float(X[k::STRIDE].sum()) for k in range(w))
        if phase == "first" and who == "fork mp.Pool":
            got, out["first_s"] = await once(), None
        else:
            wall, cpu, late, got = await timed(once)
            walls.append(wall)
            cpus.append(cpu)
            lates += late
            out[f"{phase}_s"] = wall
        right[phase] = math.isclose(got, want, rel_tol=1e-9)
        if not right[phase] and (who == "ashard" or phase != "after"):  # peers: stale
            print(f"ERROR: {who}, {phase}: sum {got!r}, expected {want!r}", file=sys.stderr)
    return {**figures(len(walls), sum(walls), sum(cpus), lates), **out, "right": right}


async def child_main(spec: dict[str, Any]) -> dict[str, Any]:
    case, who, w, scale = spec["case"], spec["who"], spec["workers"], spec["scale"]
    async with contextlib.AsyncExitStack() as stack:
        if case == "broadcast":
            return await run_broadcast(stack, who, w, scale)
        n = int(SIZE[case] * scale)
        if case == "calls":
            return await run_calls(stack, who, w, n)
        return await run_map(stack, case, who, w, n)


def child(spec: dict[str, Any]) -> None:
    import traceback

    try:
        out = anyio.run(child_main, spec, backend=spec["backend"])
    except BaseException as exc:
        traceback.print_exc()
        out = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    print("RESULT " + json.dumps(out), flush=True)
    # A normal exit lets loky and joblib remove their semaphores and memmapping folders;
    # one that hangs is cut short, and the parent kills what is left of the group.
    watchdog = threading.Timer(20, os._exit, (0,))
    watchdog.daemon = True
    watchdog.start()
    sys.exit(0)


# -- the parent ----------------------------------------------------------------------------


def run_case(spec: dict[str, Any], limit: float) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    # Files, not pipes: processes a peer leaves behind must not hold the parent up.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=out, stderr=err,
                                start_new_session=True)  # fmt: skip
        result: dict[str, Any]
        try:
            proc.wait(timeout=limit)
            result = {"error": f"exited with {proc.returncode} without a result"}
            for _ in range(40):  # up to 2 s for its helpers (resource trackers) to finish
                os.killpg(proc.pid, 0)
                time.sleep(0.05)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            result = {"error": f"timeout ({limit:g} s)"}
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        err.seek(0)
        for line in out.read().splitlines():
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT ") :])
        if "error" in result:
            sys.stderr.write(err.read()[-3000:])
    return result


def available(case: str, who: str, backend: str, workers: int) -> str | None:
    """Why `who` cannot run here (None: it can)."""
    if who == "joblib" and workers == 1:
        return "with n_jobs=1 it runs in the caller's process"
    joblib = find_spec("joblib")
    if who in ("loky", "joblib") and not joblib and (who == "joblib" or not find_spec("loky")):
        return f"{who} is not installed"
    if case == "calls" and who == "ProcessPoolExecutor" and backend != "asyncio":
        return "run_in_executor needs asyncio"
    return None


def merge(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds that gave figures; an error when none did."""
    good = [r for r in rows if "error" not in r]
    if not good:
        return rows[0]
    med: dict[str, Any] = {}
    for key, value in good[0].items():
        if key == "right":
            med[key] = {p: all(r[key][p] for r in good) for p in value}
        elif isinstance(value, (int, float)):
            med[key] = statistics.median(r[key] for r in good)
        else:
            med[key] = value
    return med


def table(case: str, rows: list[tuple[int, str, dict[str, Any]]]) -> list[str]:
    unit = UNIT[case]
    lines = [f"### {case}", ""]
    if case == "broadcast":
        lines += [
            f"| W | who | first s | again s | after change s | right (first/again/after) "
            f"| caller CPU µs per {unit} | caller CPU share | lateness p99 ms | max ms |",
            "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
    else:
        lines += [
            f"| W | who | {unit}s/s | caller CPU µs per {unit} | caller CPU share "
            "| lateness p99 ms | max ms |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
    for w, who, m in rows:
        if "error" in m:
            lines.append(f"| {w} | {who} | {m['error'][:120].replace('|', '/')} |")
            continue
        tail = (f"{m['cpu_us_per_unit']:,.2f} | {m['cpu_share_pct']:.0f}% | "
                f"{m['p99_ms']:.2f} | {m['max_ms']:.2f} |")  # fmt: skip
        if case == "broadcast":
            secs = [("—" if m[p] is None else f"{m[p]:.3f}") for p in ("first_s", "again_s")]
            right = "/".join("yes" if m["right"][p] else "NO" for p in ("first", "again", "after"))
            lines.append(f"| {w} | {who} | {' | '.join(secs)} | {m['after_s']:.3f} | {right} "
                         f"| {tail}")  # fmt: skip
        else:
            lines.append(f"| {w} | {who} | {m['rate_per_s']:,.0f} | {tail}")
    return [*lines, ""]


def default_workers() -> list[int]:
    n, w, out = os.cpu_count() or 1, 1, []
    while w < n:
        out.append(w)
        w *= 2
    return [*out, n]


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default=",".join(map(str, default_workers())))
    parser.add_argument("--cases", default=",".join(WHO))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument("--quick", action="store_true", help="a twentieth of the work")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per case")
    parser.add_argument("--out", help="also write PATH.md (the tables) and PATH.json (raw)")
    args = parser.parse_args()
    scale = 0.05 if args.quick else 1.0
    workers = [int(w) for w in args.workers.split(",") if w]
    cases = [c for c in args.cases.split(",") if c]
    if unknown := set(cases) - set(WHO):
        parser.error(f"unknown cases: {', '.join(sorted(unknown))} (known: {', '.join(WHO)})")
    raw: list[dict[str, Any]] = []
    skipped: dict[str, set[str]] = {}
    for r in range(args.rounds):
        for case in cases:
            for w in workers:
                order = WHO[case] if r % 2 == 0 else tuple(reversed(WHO[case]))
                for who in order:
                    if why := available(case, who, args.backend, w):
                        skipped.setdefault(case, set()).add(f"{who} ({why})")
                        continue
                    spec = {"case": case, "who": who, "workers": w, "scale": scale,
                            "backend": args.backend}  # fmt: skip
                    got = run_case(spec, args.timeout)
                    raw.append({**spec, "round": r + 1, "result": got})
                    print(f"round {r + 1} {case:9} W={w:<3} {who:20} {json.dumps(got)}",
                          file=sys.stderr)  # fmt: skip
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    quick = " (--quick: a twentieth of the work)" if args.quick else ""
    lines = [
        f"Run {now} on {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {args.backend}; "
        f"medians of {args.rounds} interpreter(s) per row{quick}.",
        "",
    ]
    for case in cases:
        by: dict[tuple[int, str], list[dict[str, Any]]] = {}
        for x in raw:
            if x["case"] == case:
                by.setdefault((x["workers"], x["who"]), []).append(x["result"])
        rows = [(w, who, merge(by[w, who])) for w in workers for who in WHO[case] if (w, who) in by]
        lines += table(case, rows)
        if case == "broadcast":
            lines += ["right: each call's sum matched the array as it was then; NO after the "
                      "change: the workers read a stale copy.", ""]  # fmt: skip
        if case in skipped:
            lines += [f"Skipped: {', '.join(sorted(skipped[case]))}.", ""]
        for w, who, m in rows:
            if who == "ashard" and "right" in m and not all(m["right"].values()):
                lines += [f"ERROR: ashard's broadcast sums were wrong with W={w}: {m['right']}", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        base = Path(args.out)
        base = base.with_suffix("") if base.suffix in (".md", ".json") else base
        base.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{base}.md").write_text(text + "\n")
        Path(f"{base}.json").write_text(json.dumps({"header": lines[0], "runs": raw}, indent=1))


if __name__ == "__main__":
    main()

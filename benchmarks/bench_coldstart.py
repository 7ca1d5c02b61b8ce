"""Cold start: a fresh interpreter, from nothing to the first result of a trivial call.

Each case runs in an interpreter of its own (``python -c``), started by this script,
and reports times measured inside it from its first line: ``import`` of the library,
then the first result of ``abs(-1)`` run in a worker process, then (ashard) the whole
pool ready. Cases: ashard (``await ashard.call`` under asyncio, and ``ashard.sync.call``),
``anyio.to_process.run_sync``, ``ProcessPoolExecutor`` with forkserver and with spawn.
Medians over ``--rounds`` interpreters per case, the cases interleaved. Also prints the
ten slowest imports of a worker (``python -X importtime -m ashard._worker``).

    python benchmarks/bench_coldstart.py [--rounds 7] [--record]
"""

from __future__ import annotations

import argparse
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
START, END = "<!-- bench_coldstart:start -->", "<!-- bench_coldstart:end -->"

PRELUDE = "import time; t0 = time.perf_counter(); import json\n"
CASES = {
    "ashard call (asyncio)": """
        import asyncio
        import ashard
        t1 = time.perf_counter()
        async def main():
            v = await ashard.call(abs, -1)
            t2 = time.perf_counter()
            await ashard.default_pool().start()  # the rest of the pool, for the record
            t3 = time.perf_counter()
            await ashard.shutdown()
            return v, t2, t3
        v, t2, t3 = asyncio.run(main())
        print(json.dumps({"import": t1 - t0, "first": t2 - t0, "full": t3 - t0}))
    """,
    "ashard.sync.call": """
        import ashard.sync
        t1 = time.perf_counter()
        v = ashard.sync.call(abs, -1)
        t2 = time.perf_counter()
        ashard.sync.shutdown()
        print(json.dumps({"import": t1 - t0, "first": t2 - t0}))
    """,
    "anyio.to_process.run_sync": """
        import anyio, anyio.to_process
        t1 = time.perf_counter()
        async def main():
            v = await anyio.to_process.run_sync(abs, -1)
            return v, time.perf_counter()
        v, t2 = anyio.run(main)
        print(json.dumps({"import": t1 - t0, "first": t2 - t0}))
    """,
    "ProcessPoolExecutor (forkserver)": """
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        t1 = time.perf_counter()
        if __name__ == "__main__":
            with ProcessPoolExecutor(2, mp_context=mp.get_context("forkserver")) as ex:
                v = ex.submit(abs, -1).result()
                t2 = time.perf_counter()
            print(json.dumps({"import": t1 - t0, "first": t2 - t0}))
    """,
    "ProcessPoolExecutor (spawn)": """
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        t1 = time.perf_counter()
        if __name__ == "__main__":
            with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as ex:
                v = ex.submit(abs, -1).result()
                t2 = time.perf_counter()
            print(json.dumps({"import": t1 - t0, "first": t2 - t0}))
    """,
}


def run_case(code: str) -> dict[str, float]:
    script = PRELUDE + textwrap.dedent(code)
    t_outer = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)  # fmt: skip
    wall = time.perf_counter() - t_outer
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    row: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    row["process"] = wall
    return row


def worker_imports() -> list[tuple[int, str]]:
    """The slowest imports (cumulative µs) of a worker process started by hand."""
    code = "import runpy, sys; sys.argv = ['x']; import ashard._worker.loop"
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)  # fmt: skip
    rows = []
    for line in out.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    return sorted(rows, reverse=True)[:10]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    # Bytecode up front, as an install makes it: no interpreter pays for compiling a
    # module edited since its last import (under PYTHONDONTWRITEBYTECODE, every one would).
    import ashard

    package = Path(ashard.__file__).parent
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, code in CASES.items():
            rows[name].append(run_case(code))
            time.sleep(0.2)
    lines = [
        "## Cold start: fresh interpreter to the first result (`benchmarks/bench_coldstart.py`)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.processor()}"
        f" ({os.cpu_count()} CPUs), Python {platform.python_version()}; medians of "
        f"{args.rounds} interpreters per case, cases interleaved. Seconds from the "
        "interpreter's first line.",
        "",
        "| case | import s | first result s | whole pool ready s | process s | "
        "first result / anyio.to_process |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    ref = statistics.median(r["first"] for r in rows["anyio.to_process.run_sync"])
    for name, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        full = f"{med['full']:.3f}" if "full" in med else ""
        lines.append(f"| {name} | {med['import']:.3f} | {med['first']:.3f} | {full} | "
                     f"{med['process']:.3f} | {med['first'] / ref:.2f} |")  # fmt: skip
    lines += ["", "Slowest imports of a worker (`-X importtime`, cumulative µs):", ""]
    lines += [f"- {us:,} µs {name.strip()}" for us, name in worker_imports()]
    text = "\n".join(lines)
    print(text)
    if args.record:
        import suite  # the one place that writes RESULTS.md between markers

        suite.record(text + "\n", START, END, append=True)


if __name__ == "__main__":
    main()

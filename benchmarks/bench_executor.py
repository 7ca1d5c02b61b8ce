"""The drop-ins: `ashard.Executor` beside ProcessPoolExecutor (fork, forkserver) and
loky, and joblib's `Parallel` on the "ashard" backend beside "loky", in one run.

``python benchmarks/bench_executor.py [--rounds 3] [--quick] [--record]``

Every case runs in a fresh interpreter (``--child``), 2 workers, cases interleaved;
medians over ``--rounds``.

round trip   ``executor.submit(noop).result()`` one at a time on a warm executor:
             median and p99 µs over 2,000 calls.
map          ``list(executor.map(noop, range(100_000), chunksize=c))``, c = 1 and
             c = 1,000: µs per item.
cpu          40 tasks of ~50 ms of pure-Python work: efficiency = task CPU / 2 / wall.
joblib       ``Parallel(n_jobs=2)(delayed(noop)(i) for i in range(100_000))``: wall s;
             and a scikit-learn ``GridSearchCV`` (LogisticRegression, 8 values of C,
             5-fold, 2,000 x 20 samples): wall s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

START, END = "<!-- bench_executor:start -->", "<!-- bench_executor:end -->"
EXECUTORS = ["ashard", "ppe-fork", "ppe-forkserver", "loky"]


def make_executor(kind: str) -> Any:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    if kind == "ashard":
        import ashard

        return ashard.Executor(2)
    if kind == "loky":
        from joblib.externals.loky import get_reusable_executor

        return get_reusable_executor(max_workers=2)
    return ProcessPoolExecutor(2, mp_context=mp.get_context(kind.removeprefix("ppe-")))


def child(case: str, kind: str, quick: bool) -> dict[str, float]:
    import _bench_fns as fns

    if case == "joblib":
        import joblib

        if kind == "ashard":
            import ashard

            ashard.register_joblib()
        n = 20_000 if quick else 100_000
        with joblib.parallel_config(backend=kind, n_jobs=2):
            joblib.Parallel()(joblib.delayed(fns.noop)(i) for i in range(100))
            t0 = time.perf_counter()
            joblib.Parallel()(joblib.delayed(fns.noop)(i) for i in range(n))
            tiny = time.perf_counter() - t0
            from sklearn.datasets import make_classification
            from sklearn.linear_model import LogisticRegression
            from sklearn.model_selection import GridSearchCV

            X, y = make_classification(n_samples=2000, n_features=20, random_state=0)
            grid = {"C": [0.001, 0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0]}
            t0 = time.perf_counter()
            GridSearchCV(LogisticRegression(max_iter=1000), grid, cv=5).fit(X, y)
            search = time.perf_counter() - t0
        return {"tiny_s": tiny, "grid_s": search}
    ex = make_executor(kind)
    try:
        list(ex.map(fns.noop, range(50)))  # warm
        if case == "roundtrip":
            times = []
            for _ in range(300 if quick else 2000):
                t0 = time.perf_counter()
                ex.submit(fns.noop, 1).result()
                times.append(time.perf_counter() - t0)
            times.sort()
            return {"median_us": statistics.median(times) * 1e6,
                    "p99_us": times[int(len(times) * 0.99)] * 1e6}  # fmt: skip
        if case == "map":
            n = 20_000 if quick else 100_000
            out = {}
            for c in (1, 1000):
                t0 = time.perf_counter()
                got = list(ex.map(fns.noop, range(n), chunksize=c))
                out[f"chunk{c}_us"] = (time.perf_counter() - t0) / n * 1e6
                assert got[-1] == n - 1
            return out
        if case == "cpu":
            loops = int(os.environ["BENCH_LOOPS"])
            t0 = time.perf_counter()
            cpu = list(ex.map(fns.busy, [loops] * 40))
            wall = time.perf_counter() - t0
            return {"efficiency": sum(cpu) / 2 / wall}
    finally:
        ex.shutdown(wait=True)
    raise ValueError(case)


def calibrate(seconds: float) -> int:
    """Loops of `spin` that take about `seconds` of CPU here (the suite's own count)."""
    from workloads.cpu import calibrate as suite_calibrate

    return suite_calibrate(seconds)


def run(case: str, kind: str, quick: bool, env: dict[str, str]) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", case, kind] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{case} {kind}: {out.stderr[-2000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--child", nargs=2)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.quick)))
        return
    env = dict(os.environ, BENCH_LOOPS=str(calibrate(0.05)))
    t_start = time.perf_counter()
    got: dict[tuple[str, str], list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        for case in ("roundtrip", "map", "cpu"):
            for kind in EXECUTORS:
                got.setdefault((case, kind), []).append(run(case, kind, args.quick, env))
        for kind in ("ashard", "loky"):
            got.setdefault(("joblib", kind), []).append(run("joblib", kind, args.quick, env))

    def med(case: str, kind: str, key: str) -> float:
        return statistics.median(r[key] for r in got[(case, kind)])

    rows = []
    metrics = [("roundtrip", "median_us", "submit + result, median µs", "{:.0f}"),
               ("roundtrip", "p99_us", "submit + result, p99 µs", "{:.0f}"),
               ("map", "chunk1_us", "map, chunksize=1, µs per item", "{:.1f}"),
               ("map", "chunk1000_us", "map, chunksize=1000, µs per item", "{:.2f}"),
               ("cpu", "efficiency", "40 x 50 ms, efficiency", "{:.3f}")]  # fmt: skip
    for case, key, label, fmt in metrics:
        cells = [fmt.format(med(case, k, key)) for k in EXECUTORS]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    jrows = []
    for key, label in (("tiny_s", "Parallel over 100,000 tiny tasks, s"),
                       ("grid_s", "GridSearchCV (8 x 5 fits), s")):  # fmt: skip
        a, lo = med("joblib", "ashard", key), med("joblib", "loky", key)
        jrows.append(f"| {label} | {a:.2f} | {lo:.2f} | {a / lo:.2f} |")
    lines = [
        "## Drop-ins: `ashard.Executor` and the joblib backend (`benchmarks/bench_executor.py`)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; 2 workers; each case in a fresh interpreter, "
        f"medians of {args.rounds} rounds; whole run {time.perf_counter() - t_start:.0f} s.",
        "",
        "| metric | ashard.Executor | ProcessPoolExecutor (fork) | ProcessPoolExecutor "
        "(forkserver) | loky |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        '| joblib, n_jobs=2 | backend "ashard" | backend "loky" | ashard / loky |',
        "|---|---:|---:|---:|",
        *jrows,
    ]
    text = "\n".join(lines)
    print(text)
    if args.record:
        import suite

        suite.record(text + "\n", START, END, append=True)


if __name__ == "__main__":
    main()

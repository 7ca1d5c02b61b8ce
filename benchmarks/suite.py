"""The benchmark suite: every workload, every peer, one run, one machine.

``python benchmarks/suite.py [--quick] [--only tiny,latency] [--peers ashard,mp-pool]
[--record]`` (or ``python -m ashard bench ...``). Each (workload, peer) case runs in its
own interpreter (`case.py`) under a time limit: a peer that hangs is reported as a
hang and killed with everything it started. Cases run one after another, so peers never
compete for the CPUs. Writes ``latest.md`` (every table, the machine, the targets), ``suite.json``,
``<workload>.png`` and per-case logs to ``--out`` (default: a directory under the
system's temporary directory); ``--record`` writes them to ``benchmarks/results/`` and
puts ``latest.md`` into ``benchmarks/RESULTS.md``. Peers whose library is not installed
are named and skipped (``pip install -e '.[bench]'`` installs them all).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import peers  # noqa: E402
import report  # noqa: E402
from workloads import WORKLOADS, Config  # noqa: E402

RESULTS_MD = BENCH_DIR / "RESULTS.md"
START, END = "<!-- suite:start -->", "<!-- suite:end -->"


def become_subreaper() -> None:
    """Orphans of a case (daemons a peer left) become our children, so they can be
    found and killed."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER


def kill_leftovers() -> int:
    import psutil

    left = psutil.Process().children(recursive=True)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=5)
    return len(left)


def shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def remove_new_shm(before: set[str]) -> None:
    """Remove what appeared in /dev/shm during a case: a peer killed with its case
    (joblib's memmapping folders, multiprocessing semaphores) cannot clean up itself.
    Cases run one at a time, so whatever is new is theirs."""
    import shutil

    for name in shm_entries() - before:
        path = os.path.join("/dev/shm", name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)


def run_case(
    workload: str, peer: str, quick: bool, limit: float, log: Path, pythonpath: Sequence[str] = ()
) -> dict[str, Any]:
    """Run one case in its own interpreter; `pythonpath` goes first after the benchmarks
    (compare.py puts the ashard source tree under test there)."""
    cmd = [sys.executable, str(BENCH_DIR / "case.py"), workload, peer] + (["--quick"] * quick)
    env = dict(os.environ)
    path = [str(BENCH_DIR), *pythonpath, env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
    out_path = log.with_suffix(".out")
    shm_before = shm_entries()
    # Files, not pipes: processes a peer leaves behind must not hold the suite up.
    with open(log, "w") as err, open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=BENCH_DIR, env=env, stdout=out, stderr=err,
                                start_new_session=True)  # fmt: skip
        try:
            proc.wait(timeout=limit)
            result: dict[str, Any] = {
                "error": f"exited with {proc.returncode} without a result (see {log.name})"
            }
        except subprocess.TimeoutExpired:
            result = {"error": f"hang: no result within {limit:.0f} s (killed)"}
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    remove_new_shm(shm_before)
    for line in out_path.read_text().splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
    out_path.unlink()
    kill_leftovers()
    return result


def merge(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of repeated runs (each in a fresh interpreter): medians per variant."""
    good = [r["rows"] for r in runs if "rows" in r]
    if not good:
        first = runs[0]
        return [{"error": first["error"]} if "error" in first else {"na": first.get("na", "?")}]
    merged = []
    for i, row in enumerate(good[0]):
        out = dict(row)
        for key, value in row.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                samples = [rows[i][key] for rows in good if i < len(rows) and key in rows[i]]
                out[key] = statistics.median(samples)
        out["runs"] = len(good)
        merged.append(out)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 repetition")
    parser.add_argument("--only", help=f"workloads, of {','.join(WORKLOADS)}")
    parser.add_argument("--peers", help=f"peers, of {','.join(peers.PEERS)}")
    parser.add_argument(
        "--out", type=Path, default=None,
        help="where tables, JSON and charts go (default: a directory under the system's "
        "temporary directory; with --record: benchmarks/results/)",
    )  # fmt: skip
    parser.add_argument(
        "--record", action="store_true",
        help="write into benchmarks/results/ and RESULTS.md (tracked files)",
    )  # fmt: skip
    parser.add_argument("--limit", type=float, help="seconds per case (default: per workload)")
    args = parser.parse_args(argv)
    workloads = args.only.split(",") if args.only else WORKLOADS
    names = args.peers.split(",") if args.peers else list(peers.PEERS)
    for bad in [w for w in workloads if w not in WORKLOADS] + [
        p for p in names if p not in peers.PEERS
    ]:
        parser.error(f"unknown workload or peer {bad!r}")
    absent = peers.missing(names)
    if absent:
        shown = ", ".join(f"{p} (needs {m})" for p, m in absent.items())
        print(f"skipped, not installed: {shown}; pip install -e '.[bench]' installs every "
              "peer", file=sys.stderr, flush=True)  # fmt: skip
        names = [n for n in names if n not in absent]
    if args.out is None:
        args.out = BENCH_DIR / "results" if args.record else _scratch()
    cfg = Config().quick() if args.quick else Config()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    become_subreaper()
    started = datetime.now(UTC)
    info = report.machine()
    doc = [
        f"Run {started:%Y-%m-%d %H:%M} UTC{' (--quick: not a measurement)' if args.quick else ''}"
        f" on {info['cpu']}, {info['cpu_count']} CPUs, {info['memory_gib']} GiB, "
        f"{info['platform']}, Python {info['python']}. {cfg.workers} workers.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".",
        "Each case ran alone in a fresh interpreter; figures are medians of "
        f"{cfg.reps} repetitions (cold start: {cfg.cold_reps} interpreters).",
    ]
    full: dict[str, Any] = {"machine": info, "config": vars(cfg), "date": started.isoformat(),
                            "quick": args.quick, "workloads": {}}  # fmt: skip
    t_suite = time.perf_counter()
    for name in workloads:
        workload = importlib.import_module(f"workloads.{name}")
        print(f"\n## {workload.TITLE}", flush=True)
        results: dict[str, list[dict[str, Any]]] = {}
        for peer in names:
            reps = cfg.cold_reps if name == "cold" else cfg.reps
            reps = 1 if workload.REPS_IN_PROCESS else reps
            t0 = time.perf_counter()
            logs = [args.out / "logs" / f"{name}-{peer}-{i}.log" for i in range(reps)]
            limit = args.limit or workload.LIMIT_S
            runs = [run_case(name, peer, args.quick, limit, log) for log in logs]
            results[peer] = merge(runs)
            print(f"  {peer:18s} {time.perf_counter() - t0:6.1f} s  {results[peer]}", flush=True)
        targets = workload.targets(results)
        md = report.table(workload, results)
        note = report.chart(workload, name, results, args.out / f"{name}.png")
        doc += [f"\n## {workload.TITLE}\n", md, ""]
        doc += [f"- target: {t}" for t in targets]
        doc += [f"\n![{name}](results/{name}.png)" if note is None else f"\n({note})"]
        print(md, *(f"- target: {t}" for t in targets), sep="\n", flush=True)
        full["workloads"][name] = {"title": workload.TITLE, "results": results, "targets": targets}
    doc.append(f"\nWhole suite: {time.perf_counter() - t_suite:.0f} s.")
    text = "\n".join(doc) + "\n"
    (args.out / "latest.md").write_text(text)
    report.write_json(args.out / "suite.json", full)
    if args.record:
        record(text)
    print(f"\nwritten: {args.out / 'latest.md'}, {args.out / 'suite.json'}")
    return 0


def _scratch() -> Path:
    """Where a run that is not recorded writes: outside the repository's tracked files."""
    import tempfile

    return Path(tempfile.gettempdir()) / "ashard-bench-results"


def record(text: str, start: str = START, end: str = END, *, append: bool = False) -> None:
    """Replace the part of RESULTS.md between the markers `start` and `end` with `text`;
    without them, put it first (or last, with `append`)."""
    current = RESULTS_MD.read_text() if RESULTS_MD.exists() else ""
    block = f"{start}\n{text}{end}"
    if start in current and end in current:
        head, rest = current.split(start, 1)
        tail = rest.split(end, 1)[1]
        RESULTS_MD.write_text(head + block + tail)
    elif append:
        RESULTS_MD.write_text(current.rstrip("\n") + "\n\n" + block + "\n")
    else:
        RESULTS_MD.write_text(block + "\n\n" + current)


if __name__ == "__main__":
    sys.exit(main())

"""ashard against ashard: the same workloads on two source trees, side by side, one run.

``python benchmarks/compare.py --base REV [--head WORKTREE_OR_REV] [--only tiny,latency,cpu]
[--rounds 5] [--quick] [--record TITLE]``

Why: a change to ashard must show "no regression beyond noise", and on a shared, noisy
machine figures from different runs do not compare. So both trees are measured in one
run: each round runs every workload's ashard case once per side, each in a fresh
interpreter (the suite's `run_case`), the order alternating between rounds (base first,
then head first, ...) so that drift hits both sides alike. Only ashard differs: its
source tree goes first on PYTHONPATH (the workers inherit it), while case.py, the
workloads and the peers always come from the checkout this script lives in. Each case
reports which ``ashard/__init__.py`` it imported, and a case from the wrong tree stops
the run.

``--base`` (and ``--head``, when it is not a directory) is a git revision, checked out
into a temporary ``git worktree`` that is removed at the end; ``--head`` defaults to this
checkout's ``src/``, uncommitted changes included. Per workload, variant and metric the
table gives the median over rounds of each side, head/base, and each side's spread
(min-max). Printed, written to ``benchmarks/results/compare.md``; ``--record TITLE``
also puts it into RESULTS.md as the section ``## TITLE`` (replacing an earlier one).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import report  # noqa: E402
import suite  # noqa: E402
from workloads import WORKLOADS, Config  # noqa: E402

ROOT = BENCH_DIR.parent
OUT = BENCH_DIR / "results"
HIGHER_IS_BETTER = {"efficiency"}


@dataclass
class Side:
    name: str  # "base" or "head"
    src: Path  # the directory holding the `ashard` package
    label: str  # what it is: commit, subject, uncommitted changes
    # (workload, variant, metric) -> one value per round that gave one
    values: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def git(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True,
                          text=True)  # fmt: skip
    return done.stdout.strip()


def describe(tree: Path) -> str:
    """`tree`'s commit and subject, and whether its src/ has uncommitted changes."""
    try:
        text = git("log", "-1", "--format=%h %s", cwd=tree)
        dirty = git("status", "--porcelain", "--", "src", cwd=tree)
    except subprocess.CalledProcessError:
        return str(tree)
    return text + (" + uncommitted changes" if dirty else "")


@contextlib.contextmanager
def worktree(rev: str, path: Path) -> Iterator[Path]:
    """A temporary, detached git worktree of `rev` at `path`."""
    git("worktree", "add", "--detach", "--quiet", str(path), rev)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                       check=False, capture_output=True)  # fmt: skip


def open_side(name: str, spec: str | None, stack: contextlib.ExitStack, tmp: Path) -> Side:
    """The source tree of `spec`: None is this checkout, a directory a checkout (or its
    src/), anything else a revision (checked out into a temporary worktree)."""
    is_dir = spec is not None and Path(spec).is_dir()
    if spec is None or is_dir:
        tree = Path(spec or ROOT).resolve()
    else:
        try:
            sha = git("rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}")
        except subprocess.CalledProcessError:
            raise SystemExit(f"{name}: {spec!r} is neither a directory nor a revision") from None
        tree = stack.enter_context(worktree(sha, tmp / name))
    src = tree / "src" if (tree / "src" / "ashard").is_dir() else tree
    if not (src / "ashard" / "__init__.py").is_file():
        raise SystemExit(f"{name}: no ashard package in {src}")
    label = describe(tree) + (f" ({src})" if is_dir else "")
    # Bytecode up front on both sides, so no case pays for compiling (cold start would).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(src)], check=True)
    return Side(name, src, label)


def metrics(workload: ModuleType) -> list[str]:
    """The figures compared: the workload's headline figure and its ratio keys."""
    return list(dict.fromkeys([workload.CHART, *workload.RATIO]))


def run_side(side: Side, name: str, workload: ModuleType, args: argparse.Namespace,
             rnd: int) -> None:  # fmt: skip
    """One case of `workload` on `side`; its figures go into `side.values`."""
    log = OUT / "logs" / f"compare-{name}-{side.name}-{rnd}.log"
    limit = args.limit or workload.LIMIT_S
    t0 = time.perf_counter()
    result = suite.run_case(name, "ashard", args.quick, limit, log, pythonpath=[str(side.src)])
    took = time.perf_counter() - t0
    imported = result.get("ashard_file")
    if imported and not Path(imported).resolve().is_relative_to(side.src.resolve()):
        raise SystemExit(f"{side.name}: the case imported {imported}, not ashard from {side.src}")
    rows = result.get("rows", [])
    if not rows or "error" in result or "na" in result:
        side.errors.append(f"{name} round {rnd}: {result.get('error') or result.get('na')}")
    for row in rows:
        if "error" in row or "na" in row:
            side.errors.append(f"{name} {row.get('variant')} round {rnd}: {row}")
            continue
        for key in metrics(workload):
            if isinstance(row.get(key), int | float):
                side.values.setdefault((name, row.get("variant", ""), key), []).append(row[key])
    print(f"  round {rnd} {name:8s} {side.name}  {took:5.1f} s  {rows or result}", flush=True)


def verdict(base: list[float], head: list[float], key: str) -> str:
    """'overlap' when the two spreads overlap, else whether head is better or worse."""
    if min(head) <= max(base) and min(base) <= max(head):
        return "overlap"
    higher = min(head) > max(base)
    return "head better" if higher == (key in HIGHER_IS_BETTER) else "HEAD WORSE"


def table(base: Side, head: Side, names: list[str]) -> str:
    lines = [
        "| workload | variant | metric | base | head | head/base | base min-max "
        "| head min-max | spreads | rounds (base/head) |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    keys = list(dict.fromkeys([*base.values, *head.values]))
    for name in names:
        workload = importlib.import_module(f"workloads.{name}")
        fmt = {k: f for k, _, f in workload.COLUMNS}
        heads = {k: h for k, h, _ in workload.COLUMNS}
        for key in [k for k in keys if k[0] == name]:
            _, variant, metric = key
            b, h = base.values.get(key, []), head.values.get(key, [])
            f = fmt.get(metric, "{:.3g}")
            cells = [f.format(statistics.median(v)) if v else "-" for v in (b, h)]
            ratio = f"{statistics.median(h) / statistics.median(b):.3f}" if b and h else "-"
            spread = [f"{f.format(min(v))}-{f.format(max(v))}" if v else "-" for v in (b, h)]
            spreads = verdict(b, h, metric) if min(len(b), len(h)) > 1 else "-"
            lines.append(
                f"| {name} | {variant} | {heads.get(metric, metric)} | {cells[0]} | {cells[1]} "
                f"| {ratio} | {spread[0]} | {spread[1]} "
                f"| {spreads} | {len(b)}/{len(h)} |"
            )
    return "\n".join(lines)


def document(base: Side, head: Side, names: list[str], args: argparse.Namespace,
             started: datetime, seconds: float) -> str:  # fmt: skip
    info = report.machine()
    cfg = Config().quick() if args.quick else Config()
    better = ", ".join(sorted(HIGHER_IS_BETTER))
    doc = [
        f"Run {started:%Y-%m-%d %H:%M} UTC{' (--quick: not a measurement)' if args.quick else ''}"
        f" on {info['cpu']}, {info['cpu_count']} CPUs, {info['memory_gib']} GiB, "
        f"{info['platform']}, Python {info['python']}. {cfg.workers} workers.",
        "",
        f"- base: {base.label}",
        f"- head: {head.label}",
        "",
        f"{args.rounds} round(s); in each, every workload's ashard case ran once per side, each "
        "alone in a fresh interpreter, base first in odd rounds and head first in even ones. "
        "base and head: medians over rounds; min-max: the spread over rounds; spreads: "
        f"whether they overlap. Lower is better, except {better}.",
        "",
        table(base, head, names),
    ]
    errors = [f"- {side.name}: {e}" for side in (base, head) for e in side.errors]
    doc += ["", "Failed cases:", *errors] if errors else []
    doc.append(f"\nWhole run: {seconds:.0f} s.")
    return "\n".join(doc) + "\n"


def stop(signum: int, _frame: Any) -> NoReturn:
    raise SystemExit(128 + signum)  # unwinds: the case is killed, the worktrees removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--head", help="checkout directory or git revision (default: this one)")
    parser.add_argument("--only", default="tiny,latency,cpu", help=f"of {','.join(WORKLOADS)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 repetition")
    parser.add_argument("--record", metavar="TITLE", help="also write into RESULTS.md")
    parser.add_argument("--limit", type=float, help="seconds per case (default: per workload)")
    args = parser.parse_args(argv)
    names = args.only.split(",")
    for bad in [w for w in names if w not in WORKLOADS]:
        parser.error(f"unknown workload {bad!r}")
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    (OUT / "logs").mkdir(parents=True, exist_ok=True)
    suite.become_subreaper()
    started, t0 = datetime.now(UTC), time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ashard-compare-")))
        base = open_side("base", args.base, stack, tmp)
        head = open_side("head", args.head, stack, tmp)
        print(f"base: {base.label}\nhead: {head.label}", flush=True)
        for rnd in range(1, args.rounds + 1):
            for name in names:
                workload = importlib.import_module(f"workloads.{name}")
                for side in (base, head) if rnd % 2 else (head, base):
                    run_side(side, name, workload, args, rnd)
    text = document(base, head, names, args, started, time.perf_counter() - t0)
    title = args.record or "ashard: base vs head"
    section = f"## {title}\n\n{text}"
    print("\n" + section, flush=True)
    (OUT / "compare.md").write_text(section)
    if args.record:
        marks = f"<!-- compare:{title}:start -->", f"<!-- compare:{title}:end -->"
        suite.record(section, *marks, append=True)
    print(f"written: {OUT / 'compare.md'}" + (f", {suite.RESULTS_MD}" if args.record else ""))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)  # the case was killed and the worktrees removed on the way out

"""Every run of a shard in a call, for `Diagnostics.shards_table()` and `timeline()`.

Rows are kept in typed columns (about 19 bytes a run), not objects, so a call of a
million shards keeps a few tens of megabytes of history rather than hundreds. Times
are seconds since the call began, on the parent's clock: a run's end is when its
report arrived (less the runs reported after it in the same report), its start the
end less the run time the worker measured; a crashed or timed-out run starts when
its worker last said something about its chunk.
"""

from __future__ import annotations

import socket
from array import array
from collections.abc import Mapping
from typing import Any

__all__ = ["OUTCOMES", "AttemptLog", "timeline_svg"]

OUTCOMES = ("ok", "failed", "timeout", "crashed", "cancelled")
OK, FAILED, TIMED_OUT, CRASHED, CANCELLED = range(5)
_COLORS = ("#4c78a8", "#e45756", "#f58518", "#b279a2", "#9d9d9d")


_HOST: list[str] = []


def _host() -> str:
    if not _HOST:
        _HOST.append(socket.gethostname())
    return _HOST[0]


class AttemptLog:
    """Runs of shards, a row per *range*: `count` consecutive positions from `first`
    that ran back to back on one worker with one outcome (a report of many tiny shards
    is one row, so recording costs the caller O(1) per report, not per shard). Run
    times per position, where the worker measured them, go to `durations` (float32)
    and `shards_table()` expands the ranges into a row per run."""

    def __init__(self) -> None:
        self.firsts = array("q")
        self.counts = array("i")
        self.attempts = array("h")
        self.pids = array("i")
        self.starts = array("d")
        self.ends = array("d")
        self.outcomes = bytearray()
        self.offsets = array("q")  # into `durations`, or -1: split the span evenly
        self.durations = array("f")
        self.host = _host()
        self.hosts: dict[int, str] = {}  # pid -> machine, for workers on other machines
        self.stacks: dict[tuple[int, int], str] = {}  # (shard, attempt) -> where it timed out
        self.rules: dict[tuple[int, int], str] = {}  # (shard, attempt) -> the on_error rule

    def __len__(self) -> int:
        return len(self.firsts)

    def add(self, pos: int, attempt: int, pid: int, start: float, end: float, outcome: int) -> None:
        """One run of one position."""
        self._row(pos, 1, attempt, pid, start, end, outcome, -1)

    def _row(
        self, first: int, count: int, attempt: int, pid: int, start: float, end: float,
        outcome: int, offset: int,
    ) -> None:  # fmt: skip
        self.firsts.append(first)
        self.counts.append(count)
        self.attempts.append(min(attempt, 32767))
        self.pids.append(pid)
        self.starts.append(max(start, 0.0))
        self.ends.append(max(end, start, 0.0))
        self.outcomes.append(outcome)
        self.offsets.append(offset)

    def add_run(self, base: int, n: int, attempt: int, pid: int, end: float, elapsed: Any) -> None:
        """`n` consecutive positions from `base` that ran back to back and were reported
        together at `end` (`elapsed`: a run time each, or their total)."""
        if not n:
            return
        if isinstance(elapsed, list) and len(elapsed) >= n:
            offset = len(self.durations)
            self.durations.extend(elapsed[:n] if len(elapsed) > n else elapsed)
            total = float(sum(elapsed[:n]))
        else:
            offset = -1
            total = float(elapsed) if elapsed else 0.0
        self._row(base, n, attempt, pid, end - total, end, OK, offset)

    def runs(self) -> list[tuple[int, int, int, float, float, int]]:
        """(shard id, attempt, pid, start, end, outcome) for every run."""
        rows = []
        for i in range(len(self.firsts)):
            first, count = self.firsts[i], self.counts[i]
            attempt, pid, outcome = self.attempts[i], self.pids[i], self.outcomes[i]
            start, end = self.starts[i], self.ends[i]
            if count == 1:
                rows.append((first, attempt, pid, start, end, outcome))
                continue
            off = self.offsets[i]
            if off >= 0:
                times = self.durations[off : off + count]
            else:
                times = array("f", [(end - start) / count]) * count
            t = start
            for k in range(count):
                took = float(times[k])
                rows.append((first + k, attempt, pid, t, t + took, outcome))
                t += took
        return rows

    def to_table(self) -> Any:
        import pyarrow as pa  # only when a table is asked for (its import is slow)

        runs = self.runs()
        columns = list(zip(*runs, strict=True)) if runs else [()] * 6
        keys = list(zip(columns[0], columns[1], strict=True))
        table = pa.table(
            {
                "shard_id": pa.array(columns[0], pa.int64()),
                "attempt": pa.array(columns[1], pa.int32()),
                "worker": pa.array(columns[2], pa.int64()),
                "host": pa.array([self.hosts.get(p, self.host) for p in columns[2]], pa.string()),
                "start": pa.array(columns[3], pa.float64()),
                "end": pa.array(columns[4], pa.float64()),
                "outcome": pa.array([OUTCOMES[o] for o in columns[5]], pa.string()),
                "stack": pa.array([self.stacks.get(key) for key in keys], pa.string()),
                "rule": pa.array([self.rules.get(key) for key in keys], pa.string()),
            }
        )
        return table.sort_by([("start", "ascending"), ("shard_id", "ascending")])


MAX_BOXES = 20_000
"""Above this many runs, the timeline merges a worker's touching successful runs."""


def timeline_svg(
    log: AttemptLog, duration: float, ended: Mapping[int, str | None], title: str
) -> str:
    """Workers x time as self-contained HTML with an SVG inside: a box per run, colored
    by outcome (a retry outlined), a cross where a worker crashed or was killed, and
    how each worker ended at the end of its lane."""
    import html  # only for a picture: not on the supervisor's import path

    pids = sorted(set(log.pids) | set(ended))
    lane, width, left, top = 22, 900, 90, 40
    height = top + lane * max(len(pids), 1) + 40
    span = max(duration, max(log.ends, default=0.0), 1e-6)
    scale = (width - left - 130) / span

    def x(t: float) -> float:
        return left + scale * t

    row = {pid: i for i, pid in enumerate(pids)}
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        "font-family='sans-serif' font-size='11'>",
        f"<text x='{left}' y='16' font-size='13'>{html.escape(title)}</text>",
    ]
    for pid, i in row.items():
        y = top + i * lane
        parts.append(f"<text x='4' y='{y + 14}'>worker {pid}</text>")
        parts.append(
            f"<line x1='{left}' x2='{x(span):.1f}' y1='{y + 10}' y2='{y + 10}' stroke='#ddd'/>"
        )
        if ended.get(pid):
            parts.append(
                f"<text x='{x(span) + 6:.1f}' y='{y + 14}'>{html.escape(str(ended[pid]))}</text>"
            )
    for pid, start, end, outcome, attempt, sid in _boxes(log):
        y = top + row[pid] * lane
        x0, x1 = x(start), x(end)
        stroke = " stroke='#000' stroke-width='1.5'" if attempt > 1 else ""
        tip = f"shard {sid}, attempt {attempt}: {OUTCOMES[outcome]} ({start:.3f}-{end:.3f} s)"
        parts.append(
            f"<rect x='{x0:.1f}' y='{y + 2}' width='{max(x1 - x0, 1.0):.1f}' height='16' "
            f"fill='{_COLORS[outcome]}'{stroke}><title>{html.escape(tip)}</title></rect>"
        )
        if outcome in (CRASHED, TIMED_OUT):
            parts.append(
                f"<text x='{x1 - 4:.1f}' y='{y + 15}' fill='#000' font-weight='bold'>x</text>"
            )
    legend_y = height - 14
    for i, name in enumerate(OUTCOMES):
        lx = left + i * 110
        parts.append(
            f"<rect x='{lx}' y='{legend_y - 10}' width='12' height='12' fill='{_COLORS[i]}'/>"
        )
        parts.append(f"<text x='{lx + 16}' y='{legend_y}'>{name}</text>")
    parts.append(
        f"<text x='{left + 5 * 110}' y='{legend_y}'>outlined: a retry; x: crash or timeout</text>"
    )
    parts.append("</svg>")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>"
        f"{html.escape(title)}</title></head><body>{''.join(parts)}</body></html>"
    )


def _boxes(log: AttemptLog) -> list[tuple[int, float, float, int, int, int]]:
    """A box per recorded range (a report of many shards is one box)."""
    rows = [
        (log.pids[i], float(log.starts[i]), float(log.ends[i]), log.outcomes[i],
         log.attempts[i], log.firsts[i])
        for i in range(len(log))
    ]  # fmt: skip
    if len(rows) <= MAX_BOXES:
        return rows
    rows.sort()
    merged: list[tuple[int, float, float, int, int, int]] = []
    gap = (max(r[2] for r in rows) or 1.0) / 2000
    for r in rows:
        last = merged[-1] if merged else None
        if (
            last is not None
            and last[0] == r[0]
            and last[3] == OK == r[3]
            and r[4] == 1
            and r[1] - last[2] <= gap
        ):
            merged[-1] = (last[0], last[1], max(last[2], r[2]), OK, 1, last[5])
        else:
            merged.append(r)
    return merged


def timeline_png(
    log: AttemptLog, duration: float, ended: Mapping[int, str | None], title: str, path: str
) -> None:
    """The timeline drawn with matplotlib into `path`."""
    try:
        import matplotlib  # optional: only for a PNG timeline

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional
    except ImportError as exc:
        raise ImportError(
            "timeline(path='....png') draws with matplotlib, which is not installed: "
            "pip install matplotlib, or give a path ending in .html"
        ) from exc
    pids = sorted(set(log.pids) | set(ended))
    row = {pid: i for i, pid in enumerate(pids)}
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(pids) + 1.5))
    for pid, start, end, outcome, attempt, _ in _boxes(log):
        ax.barh(row[pid], end - start, left=start, color=_COLORS[outcome],
                edgecolor="black" if attempt > 1 else None)  # fmt: skip
    ax.set_yticks(range(len(pids)), [f"worker {p}" for p in pids])
    ax.set_xlabel("seconds since the call began")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

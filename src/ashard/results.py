"""The records ashard hands back: `ShardResult` for `shard_map`, `ShardDone` per
streamed shard, `Diagnostics` (with a `WorkerRow` per worker) describing how a call
went, and `PoolStats`, a pool's counters."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ashard._attempts import AttemptLog, timeline_png, timeline_svg
from ashard.errors import ShardError, ShardMapError
from ashard.shards import Shard

if TYPE_CHECKING:
    from ashard._health import EndReason

__all__ = [
    "Diagnostics", "MemoryDiagnostics", "PoolStats", "ReduceResult", "ShardDone", "ShardResult",
    "WorkerRow",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class MemoryDiagnostics:
    """Memory during one call (DESIGN 2.5). `budget`: the pool's `mem_budget` in bytes
    (None: none), from `budget_source` ("given", "host", "cgroup"); `peak_reserved`: the
    most the running chunks' footprints reserved at once; `admission_waits`: times a
    chunk waited for room in the budget, `admission_wait_s` how long in all; `pauses`:
    workers paused over `mem_pause`; `recycled`: workers replaced for memory, by reason
    ("pause_timeout", "all_paused", "mem_cap", "hard_cap"); `footprint_per_shard`: bytes,
    given or learned (the largest a callable gave), or None."""

    __module__ = "ashard"

    budget: int | None = None
    budget_source: str | None = None
    peak_reserved: int = 0
    admission_waits: int = 0
    admission_wait_s: float = 0.0
    pauses: int = 0
    recycled: Mapping[str, int] = field(default_factory=dict)
    footprint_per_shard: int | None = None


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """One worker's part in a call: the shards it ran, the seconds it spent in them,
    its peak private memory (bytes) and why it ended (None while it lives): "mem_cap",
    "mem_hard", "drift", "max_tasks", "idle", "crashed", "timed out", "exited"."""

    __module__ = "ashard"

    pid: int
    shards: int
    busy: float
    peak_rss: int
    ended: EndReason | None


@dataclass(frozen=True, slots=True)
class Diagnostics:
    """How a call ran: counts, timing and the workers involved.

    `shards`: positions of the call (shards, or items of `map`). `workers`: every worker
    *process* that ran some of them (replacements of crashed or recycled workers
    included, so it can exceed the pool's size). `chunks`: messages that carried
    shards to workers (several shards each). `retries`: runs after a shard's first
    (after a crash, a timeout or a failure that `retry_errors` or an `on_error` rule
    retries), whether or not `max_retries` was charged for them; `error_retries`: those
    of them that followed a failure of `fn` (counted apart from crashes and timeouts).
    `timeouts`: runs that went past `timeout` (interrupted, or killed). `crashes`:
    workers that died while running the call's shards. `failures`: shards that failed
    for good; `skipped`: shards an `on_error` rule skipped (not failures)."""

    __module__ = "ashard"

    shards: int
    duration: float
    workers: tuple[int, ...]
    """Every worker the call ran on (a row each in `per_worker`), by pid."""
    chunks: int
    retries: int
    timeouts: int
    crashes: int
    failures: int
    cancelled: bool = False
    """The call stopped before every shard was resolved: under ``errors="raise"`` after a
    failure, on an error that ended it, or a stream left early."""
    notes: tuple[str, ...] = field(default=())
    """What ashard noticed about the call that is not a failure (DESIGN 2.7)."""
    cow_writes: tuple[tuple[int, str], ...] = field(default=())
    """Under ``cow="audit"``: (shard id, borrow name) for each shard that wrote to a
    borrowed array (privately: the write was never seen elsewhere)."""
    per_worker: tuple[WorkerRow, ...] = field(default=())
    """A row per worker that ran shards of the call, by pid."""
    memory: MemoryDiagnostics = field(default_factory=MemoryDiagnostics)
    """Budget, admission, pauses and memory recycling during the call."""
    scaling: tuple[tuple[float, int, int, str], ...] = field(default=())
    """Every worker start and stop of the pool while the call ran, in order:
    ``(seconds_into_call, workers_before, workers_after, reason)``, reason one of
    "backlog" (started for queued work), "idle" (left after `idle_timeout`), "memory"
    (replaced over `mem_cap` or its hard limit), "crash" (died, or killed past a
    timeout, and its replacement), "recycle" (replaced for `max_tasks` or growth).
    A replacement is a stop, then a start."""
    error_retries: int = 0
    """Runs after `fn` raised (retried by `retry_errors` or an `on_error` rule)."""
    skipped: int = 0
    """Shards an `on_error` rule skipped: their value is None, they are not failures."""
    hygiene: Mapping[int | None, tuple[str, ...]] = field(default_factory=dict)
    """What shards changed in their worker's process-wide state (``Pool(hygiene=...)``):
    shard id -> one-line notes, such as "os.environ['X'] was set; restored" (a chunk of
    several shards is checked as one: its notes sit under its first shard, and say
    which shards ran)."""
    autotune: tuple[tuple[float, int, str], ...] = field(default=())
    """Each size `chunk_size="auto"` chose, when it moved by a quarter or more (the
    first 1,000 such): ``(seconds_into_call,
    chunk_size, reason)``, reason one of "start", "grow", "shrink_time" (shards took
    longer), "shrink_mem" (a worker neared `mem_cap`, or the caller's `max_held_bytes`),
    "tail" (leaving work for every worker near the end)."""
    _attempts: Any = field(default=None, repr=False, compare=False)

    def shards_table(self) -> Any:
        """A `pyarrow.Table` with a row per run of a shard: `shard_id`, `attempt`,
        `worker` (pid), `host`, `start`, `end` (seconds since the call began; start is
        when it began running on the worker), `outcome` ("ok", "failed", "timeout",
        "crashed", "cancelled"), `stack` (a run that timed out: its Python stack where
        the worker stopped it; else null), `rule` (the `on_error` rule that decided
        what followed a failed run: "retry", "skip" or "raise" - "raise" too for a
        `Retry` whose attempts were spent; null where no rule matched)."""
        log = self._attempts if self._attempts is not None else AttemptLog()
        return log.to_table()

    def timeline(self, path: str | os.PathLike[str] | None = None) -> str:
        """Workers x time, every run of every shard (retries outlined, crashes and
        timeouts marked, how each worker ended at the end of its lane). No `path`:
        self-contained HTML (an SVG inside) is returned. A path: the HTML is written
        there - or a PNG, if it ends in ".png" (drawn with matplotlib, which must be
        installed) - and the path is returned."""
        log = self._attempts if self._attempts is not None else AttemptLog()
        ended = {row.pid: row.ended for row in self.per_worker}
        title = f"ashard: {self.summary()}"
        if path is None:
            return timeline_svg(log, self.duration, ended, title)
        target = os.fspath(path)
        if target.lower().endswith(".png"):
            timeline_png(log, self.duration, ended, title, target)
        else:
            with open(target, "w", encoding="utf-8") as f:
                f.write(timeline_svg(log, self.duration, ended, title))
        return target

    def summary(self) -> str:
        """One line for humans."""
        n = len(self.workers)
        skipped = f", {self.skipped} skipped" if self.skipped else ""
        return (
            f"{self.shards} shards on {n} worker process{'' if n == 1 else 'es'} in "
            f"{self.duration:.3f} s ({self.chunks} chunks, {self.retries} retries, "
            f"{self.timeouts} timeouts, {self.crashes} worker crashes, "
            f"{self.failures} failures{skipped})"
        )

    def __repr__(self) -> str:
        return f"<ashard.Diagnostics {self.summary()}>"

    def _repr_html_(self) -> str:
        rows = [
            ("shards", f"{self.shards:,}"),
            ("worker processes", f"{len(self.workers)}"),
            ("duration", f"{self.duration:.3f} s"),
            ("chunks", f"{self.chunks:,}"),
            ("retries", f"{self.retries:,}"),
            ("timeouts", f"{self.timeouts:,}"),
            ("worker crashes", f"{self.crashes:,}"),
            ("failures", f"{self.failures:,}"),
        ]
        if self.cancelled:
            rows.append(("cancelled", "yes"))
        return html_table("ashard.Diagnostics", rows)

    def table(self) -> str:
        """The per-worker rows as an aligned text table."""
        lines = [f"{'pid':>8} {'shards':>7} {'busy s':>8} {'peak MiB':>9}  ended"]
        for row in self.per_worker:
            lines.append(
                f"{row.pid:>8} {row.shards:>7} {row.busy:>8.3f} "
                f"{row.peak_rss / 2**20:>9.1f}  {row.ended or '-'}"
            )
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class ShardDone:
    """One finished shard from `shard_stream`: its value, or the error under
    ``errors="collect"``; the attempts it took, the worker pid and its run time;
    `skipped`: an `on_error` rule skipped it (value None, error None)."""

    __module__ = "ashard"

    shard: Shard
    value: Any
    error: ShardError | None
    attempts: int
    worker: int | None
    elapsed: float
    skipped: bool = False


class _Outcome:
    """What `ShardResult` and `ReduceResult` share: their permanent `failures`."""

    __slots__ = ()
    failures: list[ShardError]

    @property
    def ok(self) -> bool:
        """True when no shard failed."""
        return not self.failures

    def raise_for_failures(self) -> None:
        """Raise `ShardMapError` holding the failures, if there are any."""
        if self.failures:
            assert isinstance(self, ShardResult | ReduceResult)
            raise ShardMapError.of(self.failures, self)


@dataclass(frozen=True, slots=True)
class ShardResult(_Outcome):
    """The outcome of `shard_map`: `results` in shard order (`None` where a shard
    failed, was skipped or never ran), the permanent `failures`, the `shards` and
    `diagnostics`; `skipped`: the ids of shards an `on_error` rule skipped (not
    failures: `ok` can be True).

    Under ``results="table"`` / ``"disk"`` the values stay in files the workers wrote:
    `results` is a lazy sequence loading each on access, `refs` holds a `TableRef` /
    `ResultRef` per shard (None: failed, or returned None under "table"), `table()`
    and `dataset()` read the tables, and `close()` (or leaving ``with res:``) removes a
    temporary results directory. Under "memory" `results` is a list and `refs` empty."""

    __module__ = "ashard"

    results: Sequence[Any]
    failures: list[ShardError]
    shards: Sequence[Shard]
    diagnostics: Diagnostics
    refs: Sequence[Any] = field(default=())
    skipped: tuple[int, ...] = field(default=())
    _store: Any = field(default=None, repr=False, compare=False)
    _again: Any = field(default=None, repr=False, compare=False)  # for `retry_failed`

    def table(self, max_bytes: int = 256 * 2**20) -> Any:
        """Every shard's table as one `pyarrow.Table`, in shard order (``results="table"``).
        Raises `ashard.GatherTooLarge` if it would take more than `max_bytes` in memory,
        measured before anything is read."""
        return self._table_store("table").gather(self.refs, max_bytes)

    def dataset(self) -> Any:
        """A lazy `pyarrow.dataset.Dataset` over the shards' tables (``results="table"``)."""
        store = self._table_store("dataset")
        return store.dataset_of([ref for ref in self.refs if ref is not None])

    def _table_store(self, what: str) -> Any:
        store = self._store
        if store is None or store.format == "pickle":
            mode = "memory" if store is None else "disk"
            raise ValueError(
                f'res.{what}() needs shard_map(..., results="table"); this call used {mode!r}'
            )
        if store.closed:
            raise ValueError("this result is closed: its files were removed")
        return store

    def __getstate__(self) -> tuple[Any, ...]:
        """Pickled without what `retry_failed` holds of its call (its pool, fn, borrow):
        a result that was pickled cannot be retried."""
        return tuple(None if f.name == "_again" else getattr(self, f.name) for f in fields(self))

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for f, value in zip(fields(self), state, strict=True):
            object.__setattr__(self, f.name, value)

    def close(self) -> None:
        """Remove the temporary results directory (``results="table"`` / ``"disk"``
        without `results_path`); nothing else changes."""
        if self._store is not None and self._store.temporary:
            self._store.close()

    def __enter__(self) -> ShardResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.results)

    def __repr__(self) -> str:
        d = self.diagnostics
        state = "ok" if self.ok else f"{len(self.failures)} failed"
        if self.skipped:
            state += f", {len(self.skipped)} skipped"
        where = "" if self._store is None else f", results in {self._store.place.describe()}"
        return (
            f"<ashard.ShardResult {len(self.results):,} shards, {state}; {d.retries} retries, "
            f"{d.crashes} crashes, {d.duration:.3f} s{where}>"
        )

    def _repr_html_(self) -> str:
        d = self.diagnostics
        rows = [
            ("shards", f"{len(self.results):,}"),
            ("failures", f"{len(self.failures):,}"),
            ("skipped", f"{len(self.skipped):,}"),
            ("retries", f"{d.retries:,}"),
            ("worker crashes", f"{d.crashes:,}"),
            ("timeouts", f"{d.timeouts:,}"),
            ("workers", f"{len(d.workers)}"),
            ("duration", f"{d.duration:.3f} s"),
        ]
        if self.failures:
            rows.append(("first failure", str(self.failures[0])))
        return html_table("ashard.ShardResult", rows)


@dataclass(frozen=True, slots=True)
class ReduceResult(_Outcome):
    """The outcome of `shard_reduce`: the combined `value` (None if no shard
    succeeded and there was no `init`), the permanent `failures` (skipped under
    ``errors="collect"``), the `diagnostics` and `skipped`, the ids of shards an
    `on_error` rule skipped (left out of the value, as failures are)."""

    __module__ = "ashard"

    value: Any
    failures: list[ShardError]
    diagnostics: Diagnostics
    skipped: tuple[int, ...] = field(default=())

    def __repr__(self) -> str:
        value = repr(self.value)
        if len(value) > 60:
            value = value[:57] + "..."
        state = "ok" if self.ok else f"{len(self.failures)} failed"
        return f"<ashard.ReduceResult value={value}, {self.diagnostics.shards:,} shards, {state}>"

    def _repr_html_(self) -> str:
        value = repr(self.value)
        rows = [
            ("value", value if len(value) <= 200 else value[:197] + "..."),
            ("shards", f"{self.diagnostics.shards:,}"),
            ("failures", f"{len(self.failures):,}"),
            ("retries", f"{self.diagnostics.retries:,}"),
            ("duration", f"{self.diagnostics.duration:.3f} s"),
        ]
        return html_table("ashard.ReduceResult", rows)


@dataclass(frozen=True, slots=True)
class PoolStats:
    """Counters of a pool's life so far. `alive`: worker processes running now;
    `started`: worker processes started; `crashed`: workers that died unexpectedly;
    `timed_out`: shard and call runs that went past their timeout (interrupted in
    Python, or their worker killed); `shards_done`: shards and items finished.
    `recycled` counts workers replaced on purpose; `recycled_by` splits it by reason:
    "mem_cap" (above the cap, replaced between shards), "mem_hard" (far above it,
    killed at once), "drift", "max_tasks", "idle" (left after `idle_timeout`),
    "pause_timeout" (paused over `mem_pause` that long), "all_paused" (the largest, when
    every worker was paused)."""

    __module__ = "ashard"

    alive: int
    started: int
    crashed: int
    timed_out: int
    recycled: int
    shards_done: int
    recycled_by: Mapping[str, int] = field(default_factory=dict)
    paused: int = 0
    """Workers paused now: above ``mem_pause * mem_cap``, taking no new work."""


def html_table(title: str, rows: Sequence[tuple[str, str]]) -> str:
    """A small self-contained HTML table of (name, value) rows, for notebooks."""
    import html

    cells = "".join(
        f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th>"
        f"<td style='text-align:right'>{html.escape(v)}</td></tr>"
        for k, v in rows
    )
    caption = f"<caption style='text-align:left'><b>{html.escape(title)}</b></caption>"
    return f"<table>{caption}{cells}</table>"

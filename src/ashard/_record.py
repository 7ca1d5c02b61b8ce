"""What one call's runs were, for its `Diagnostics`: every run (`AttemptLog`), a tally
per worker, and the counts. The job (`ashard._job`) tells it what happened as reports
and losses come in; it knows nothing of which positions are resolved."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ashard._attempts import CANCELLED, CRASHED, FAILED, OK, TIMED_OUT, AttemptLog
from ashard._budget import MemoryLog
from ashard._outputs import LOCAL
from ashard._protocol import INTERRUPTED, RAISED, TIMEOUT
from ashard.results import Diagnostics, WorkerRow

if TYPE_CHECKING:
    from ashard._backend import Chunk, WorkerInfo

__all__ = ["CallRecord"]

_OUTCOME_OF = {RAISED: FAILED, TIMEOUT: TIMED_OUT, LOCAL: FAILED}


class CallRecord:
    """The runs of one call and the workers that ran them. `runs` (the job's: position
    -> its latest run, if past the first) says which run a report is about; a mapping,
    not a method of the job, so that no cycle keeps a finished call's values alive."""

    def __init__(self, runs: Mapping[int, int]) -> None:
        self.t0 = time.perf_counter()
        self.log = AttemptLog()
        self.chunks = self.retries = self.timeouts = self.crashes = 0
        self.error_retries = 0  # runs after fn raised, retried by retry_errors or a rule
        self.hygiene: dict[int | None, tuple[str, ...]] = {}  # position -> what it changed
        self.notes: list[str] = []  # what the workers remarked on (`Diagnostics.notes`)
        self.cow_writes: set[tuple[int, str]] = set()  # (shard id, borrow name), cow="audit"
        self._runs = runs
        self._pids: set[int] = set()
        self._ran_on: dict[int, WorkerInfo] = {}  # every worker the call ran on, by pid
        self._per_pid: dict[int, list[float]] = {}  # pid -> [shards, busy seconds]
        self.scaling: list[tuple[float, int, int, str]] = []
        self.memory = MemoryLog()

    def _run_of(self, pos: int) -> int:
        return self._runs.get(pos, 1)

    def now(self) -> float:
        """Seconds since the call began."""
        return time.perf_counter() - self.t0

    def reported(
        self, chunk: Chunk, base: int, n: int, errors: Sequence[Any], elapsed: Any, pid: int
    ) -> float:
        """Worker `pid` reported `n` runs from position `base` of `chunk`: one range for
        a report without errors (O(1), however many shards), a row per position
        otherwise, and a row for a run the report says was interrupted. Returns the
        seconds they took."""
        now = self.now()
        busy = _total(elapsed)
        self._pids.add(pid)
        row = self._per_pid.setdefault(pid, [0, 0.0])
        row[0] += n
        row[1] += busy
        if not errors:
            attempt = self._run_of(base) if n == 1 else 1  # ranges of many are first runs
            self.log.add_run(base, n, attempt, pid, now, elapsed)
            chunk.heard = now
            return busy
        by_k = {e[0]: e[1] for e in errors}
        for k, kind, detail in errors:
            if kind == TIMEOUT and detail[1] is not None:  # where the worker stopped it
                self.log.stacks[(base + k, self._run_of(base + k))] = detail[1]
        times = elapsed if isinstance(elapsed, list) else [(elapsed or 0.0) / max(n, 1)] * n
        t = now - float(sum(times[:n]))
        for k in range(n):
            took = float(times[k]) if k < len(times) else 0.0
            outcome = _OUTCOME_OF.get(by_k[k], FAILED) if k in by_k else OK
            self.log.add(base + k, self._run_of(base + k), pid, t, t + took, outcome)
            t += took
        if by_k.get(n) == INTERRUPTED:
            self.log.add(base + n, self._run_of(base + n), pid, max(chunk.heard, t), now,
                         CANCELLED)  # fmt: skip
        chunk.heard = now
        return busy

    def heard_from(self, pid: int) -> None:
        """Worker `pid` reported on the call (values that did not unpickle, say)."""
        self._pids.add(pid)

    def lost(self, positions: range, pid: int, since: float, timed_out: bool) -> None:
        """Worker `pid` died (or was killed past the timeout) running `positions`,
        last heard of `since` seconds into the call."""
        now = self.now()
        outcome = TIMED_OUT if timed_out else CRASHED
        for pos in positions:
            self.log.add(pos, self._run_of(pos), pid, since, now, outcome)

    def ran_on(self, worker: WorkerInfo) -> None:
        """`worker` runs (or ran) shards of the call: it gets a row in the diagnostics
        (and its machine, when it says, in `shards_table()`)."""
        self._ran_on[worker.pid] = worker
        host = getattr(worker, "host", None)
        if host is not None:
            self.log.hosts[worker.pid] = host

    def scaled(self, before: int, after: int, reason: str, ended: str | None) -> None:
        """The pool went from `before` to `after` workers, for `reason` (a stop: the
        worker ended for `ended`). Told from the health monitor's thread too."""
        if reason == "paused":
            self.memory.pauses += 1
            return
        self.scaling.append((self.now(), before, after, reason))
        self.memory.stopped(ended)

    def diagnostics(
        self,
        shards: int,
        failures: int,
        cancelled: bool,
        autotune: tuple[tuple[float, int, str], ...] = (),
        skipped: int = 0,
    ) -> Diagnostics:
        return Diagnostics(
            shards=shards,
            duration=self.now(),
            workers=tuple(sorted(self._pids | self._ran_on.keys())),
            chunks=self.chunks,
            retries=self.retries,
            timeouts=self.timeouts,
            crashes=self.crashes,
            failures=failures,
            cancelled=cancelled,
            cow_writes=tuple(sorted(self.cow_writes)),
            per_worker=tuple(self._worker_row(pid) for pid in sorted(self._ran_on)),
            memory=self.memory.report(),
            scaling=tuple(self.scaling),
            autotune=autotune,
            error_retries=self.error_retries,
            hygiene=dict(self.hygiene),
            notes=tuple(self.notes),
            skipped=skipped,
            _attempts=self.log,
        )

    def _worker_row(self, pid: int) -> WorkerRow:
        w = self._ran_on[pid]
        shards, busy = self._per_pid.get(pid, (0, 0.0))
        ended = w.end_reason
        if ended is None and not w.alive:
            ended = "exited"
        return WorkerRow(pid, int(shards), busy, w.peak_rss, ended)


def _total(elapsed: Any) -> float:
    if elapsed is None:
        return 0.0
    if isinstance(elapsed, float):
        return elapsed
    return float(sum(elapsed))

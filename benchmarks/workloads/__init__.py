"""One module per workload. Each defines:

``TITLE``, ``COLUMNS`` ((key, header, format) per figure), ``RATIO`` (the keys whose
ratio to ashard's row is shown), ``CHART`` (the key drawn in the bar chart),
``LIMIT_S`` (the time limit of one case), ``REPS_IN_PROCESS`` (False: the suite runs
the case once per repetition, each in a fresh interpreter),
``async def run(peer, cfg) -> list[dict]`` (one row per variant, run in the case
process) and ``def targets(results) -> list[str]`` (the issue's targets, checked).
"""

from __future__ import annotations

import inspect
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

WORKLOADS = ["tiny", "latency", "cpu", "broadcast", "loop_lag", "cold", "crash"]


@dataclass(frozen=True)
class Config:
    workers: int = 2
    tiny_items: int = 100_000
    chunk1_items: int = 20_000
    latency_calls: int = 1_000
    cpu_tasks: int = 40
    cpu_task_s: float = 0.05
    broadcast_bytes: int = 1 << 30
    broadcast_tasks: int = 64
    budget_s: float = 8.0  # per measurement: slow peers get fewer items
    reps: int = 3
    cold_reps: int = 5

    def quick(self) -> Config:
        return Config(
            workers=self.workers, tiny_items=10_000, chunk1_items=2_000, latency_calls=200,
            cpu_tasks=8, broadcast_bytes=64 << 20, broadcast_tasks=16, budget_s=2.0,
            reps=1, cold_reps=1,
        )  # fmt: skip


async def maybe(value: Any) -> Any:
    """Await `value` if the peer's method was a coroutine function."""
    if inspect.isawaitable(value):
        return await value
    return value


def p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def row_of(results: dict[str, list[dict[str, Any]]], peer: str, variant: str | None = None) -> Any:
    """The row of `peer` (with that variant, if given) that holds numbers, or None."""
    for row in results.get(peer, []):
        if "error" in row or "na" in row:
            continue
        if variant is None or row.get("variant") == variant:
            return row
    return None


def numeric_rows(results: dict[str, list[dict[str, Any]]], key: str) -> list[tuple[str, Any]]:
    return [
        (peer, row)
        for peer, rows in results.items()
        for row in rows
        if isinstance(row.get(key), int | float)
    ]

"""cpu: 40 pure-Python loops of ~50 ms each, one task per message - parallel efficiency
(summed task CPU time / (workers x wall time))."""

from __future__ import annotations

import time
from typing import Any

import _bench_fns as fns
from workloads import Config, maybe, median, row_of

TITLE = "cpu: 40 x 50 ms pure-Python tasks - parallel efficiency"
COLUMNS = [("efficiency", "efficiency", "{:.3f}"), ("wall_s", "wall s", "{:.3f}"),
           ("task_cpu_s", "task CPU s", "{:.3f}")]  # fmt: skip
RATIO = ["wall_s"]
CHART = "efficiency"
LIMIT_S = 180.0
REPS_IN_PROCESS = True


def calibrate(task_s: float) -> int:
    """Loops of `fns.spin` that take about `task_s` of CPU here."""
    loops = 100_000
    while True:
        t0 = time.thread_time()
        fns.spin(loops)
        took = time.thread_time() - t0
        if took > 0.02:
            return int(loops * task_s / took)
        loops *= 2


async def run(peer: Any, cfg: Config) -> list[dict[str, Any]]:
    loops = calibrate(cfg.cpu_task_s)
    await maybe(peer.start(cfg.workers))
    try:
        samples = []
        for _ in range(cfg.reps):
            t0 = time.perf_counter()
            cpu = await maybe(peer.map(fns.busy, [loops] * cfg.cpu_tasks, 1))
            wall = time.perf_counter() - t0
            if len(cpu) != cfg.cpu_tasks:
                raise AssertionError("wrong results")
            samples.append((sum(cpu) / (cfg.workers * wall), wall, sum(cpu)))
        eff, wall, cpu_s = (median(col) for col in zip(*samples, strict=True))
        return [{"variant": "map", "efficiency": eff, "wall_s": wall, "task_cpu_s": cpu_s}]
    finally:
        await maybe(peer.close())


def targets(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    ours = row_of(results, "ashard")
    if not ours:
        return []
    ok = ours["efficiency"] >= 0.95
    return [f"efficiency: ashard {ours['efficiency']:.3f} (target >= 0.95): "
            f"{'met' if ok else 'MISSED'}"]  # fmt: skip

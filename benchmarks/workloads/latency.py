"""latency: one no-op task at a time on a warm pool - round trip median and p99 (µs).

200 warm-up calls, then up to ``cfg.latency_calls`` calls (fewer for a peer that needs
more than ``cfg.budget_s``), each timed alone.
"""

from __future__ import annotations

import time
from typing import Any

import _bench_fns as fns
from workloads import Config, maybe, median, p99, row_of

TITLE = "latency: one call at a time on a warm pool - round trip µs"
COLUMNS = [("median_us", "median µs", "{:.0f}"), ("p99_us", "p99 µs", "{:.0f}"),
           ("calls", "calls", "{:,}")]  # fmt: skip
RATIO = ["median_us", "p99_us"]
CHART = "median_us"
LIMIT_S = 180.0
REPS_IN_PROCESS = True


async def run(peer: Any, cfg: Config) -> list[dict[str, Any]]:
    await maybe(peer.start(cfg.workers))
    try:
        t0 = time.perf_counter()
        for k in range(200):
            if await maybe(peer.call(fns.noop, k)) != k:
                raise AssertionError("wrong result")
        per = (time.perf_counter() - t0) / 200
        n = max(50, min(cfg.latency_calls, int(cfg.budget_s / max(per, 1e-9))))
        samples = []
        for k in range(n):
            t0 = time.perf_counter_ns()
            await maybe(peer.call(fns.noop, k))
            samples.append((time.perf_counter_ns() - t0) / 1000)
        return [{"variant": "call", "median_us": median(samples), "p99_us": p99(samples),
                 "calls": n}]  # fmt: skip
    finally:
        await maybe(peer.close())


def targets(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    ours = row_of(results, "ashard")
    others = [(p, row_of(results, p)) for p in results if p != "ashard"]
    others = [(p, r) for p, r in others if r is not None]
    if not ours or not others:
        return []
    out = []
    for key in ("median_us", "p99_us"):
        best_v, best_p = min((r[key], p) for p, r in others)
        ok = ours[key] < best_v
        out.append(
            f"{key[:-3]}: ashard {ours[key]:.0f} µs vs best peer {best_p} {best_v:.0f} µs: "
            f"{'met' if ok else 'MISSED'}"
        )
    return out

"""tiny: no-op tasks - the cost of one task, in µs per item.

Two variants per peer: the library's automatic chunking over ``cfg.tiny_items`` items
(ProcessPoolExecutor and loky, which have none, get multiprocessing.Pool's automatic
chunksize), and one task per message (``chunk 1``). A peer slow enough to need more
than ``cfg.budget_s`` for all items gets fewer (sized from a short probe); the per-item
figure is what counts. Every peer gets one untimed full-size run first (when it is
quick enough), then the median of ``cfg.reps`` timed runs.
"""

from __future__ import annotations

import time
from typing import Any

import _bench_fns as fns
from workloads import Config, maybe, median, row_of

TITLE = "tiny: map(noop, items) - µs per item"
COLUMNS = [("us_per_item", "µs per item", "{:.3f}"), ("items", "items", "{:,}")]
RATIO = ["us_per_item"]
CHART = "us_per_item"
LIMIT_S = 300.0
REPS_IN_PROCESS = True


async def _per_item(peer: Any, n_max: int, chunksize: int | None, cfg: Config) -> tuple[float, int]:
    probe = min(n_max, 500)
    t0 = time.perf_counter()
    out = await maybe(peer.map(fns.noop, list(range(probe)), chunksize))
    estimate = (time.perf_counter() - t0) / probe
    assert len(out) == probe
    n = max(probe, min(n_max, int(cfg.budget_s / max(estimate, 1e-9))))
    items = list(range(n))
    if n * estimate < cfg.budget_s / 4:
        await maybe(peer.map(fns.noop, items, chunksize))  # warm: buffers, memory, caches
    samples = []
    for _ in range(cfg.reps):
        t0 = time.perf_counter()
        out = await maybe(peer.map(fns.noop, items, chunksize))
        samples.append((time.perf_counter() - t0) / n)
        if list(out) != items:
            raise AssertionError("wrong results")
    return median(samples), n


async def run(peer: Any, cfg: Config) -> list[dict[str, Any]]:
    await maybe(peer.start(cfg.workers))
    try:
        rows = []
        if peer.auto_chunks:
            per, n = await _per_item(peer, cfg.tiny_items, None, cfg)
            rows.append({"variant": "auto chunks", "us_per_item": per * 1e6, "items": n})
        else:
            rows.append({"variant": "auto chunks", "na": "no automatic chunking: see chunk 1"})
        per, n = await _per_item(peer, cfg.chunk1_items, 1, cfg)
        rows.append({"variant": "chunk 1", "us_per_item": per * 1e6, "items": n})
        return rows
    finally:
        await maybe(peer.close())


def targets(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    out = []
    ours = row_of(results, "ashard", "auto chunks")
    mp = row_of(results, "mp-pool", "auto chunks")
    best = min(
        (r["us_per_item"], p) for p, rows in results.items() if p != "ashard" for r in rows
        if r.get("variant") == "auto chunks" and "us_per_item" in r
    ) if any(p != "ashard" for p in results) else None  # fmt: skip
    if ours and best:
        ok = ours["us_per_item"] <= best[0]
        out.append(
            f"auto chunking: ashard {ours['us_per_item']:.3f} µs/item vs best peer "
            f"{best[1]} {best[0]:.3f} (multiprocessing.Pool "
            f"{mp['us_per_item'] if mp else float('nan'):.3f}): {'met' if ok else 'MISSED'}"
        )
    ours1 = row_of(results, "ashard", "chunk 1")
    others = [
        (r["us_per_item"], p) for p, rows in results.items() if p != "ashard" for r in rows
        if r.get("variant") == "chunk 1" and "us_per_item" in r
    ]  # fmt: skip
    if ours1 and others:
        best1 = min(others)
        ok = ours1["us_per_item"] < best1[0]
        out.append(
            f"chunk 1: ashard {ours1['us_per_item']:.2f} µs/item vs best peer {best1[1]} "
            f"{best1[0]:.2f}: {'met' if ok else 'MISSED'}"
        )
    return out

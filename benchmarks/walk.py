"""One shard's walk through the parent: which ashard functions and modules a single
`shard_map` of one shard passes, and how often the path switches module.

``python benchmarks/walk.py`` (with the ashard to measure first on PYTHONPATH). The
pool is started and warmed first; then the parent's calls into ashard code are traced
(`sys.setprofile`, the event loop's thread only) for one ``shard_map(1 shard)``, five
times; the figures are of the shortest walk (a result that arrives before the parent
waits for it saves a few calls). A structural figure, not a speed one: fewer switches
mean module boundaries in the right places. Prints one JSON line.
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
from types import FrameType
from typing import Any

import anyio

import ashard


def double(shard: ashard.Shard) -> int:
    return shard.id * 2


def module_of(frame: FrameType) -> str | None:
    name = frame.f_globals.get("__name__", "")
    return name if name == "ashard" or name.startswith("ashard.") else None


async def walk(pool: ashard.Pool) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and (module := module_of(frame)) is not None:
            calls.append((module, frame.f_code.co_qualname))

    sys.setprofile(profile)
    try:
        res = await pool.shard_map(ashard.shards(1, block_size=1), double)
    finally:
        sys.setprofile(None)
    assert res.results == [0]
    return calls


async def main() -> dict[str, Any]:
    async with ashard.Pool(1) as pool:
        await pool.shard_map(ashard.shards(1, block_size=1), double)  # warm
        calls = min([await walk(pool) for _ in range(5)], key=len)
    modules = [m for m, _ in calls]
    switches = sum(1 for a, b in itertools.pairwise(modules) if a != b)
    return {
        "ashard": ashard.__file__,
        "calls": len(calls),
        "functions": len(set(calls)),
        "modules": len(set(modules)),
        "module_switches": switches,
        "thread": threading.current_thread().name,
    }


if __name__ == "__main__":
    print(json.dumps(anyio.run(main)))

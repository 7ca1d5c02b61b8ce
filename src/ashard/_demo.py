"""The workload behind `python -m ashard demo`: a Monte Carlo estimate of pi."""

from __future__ import annotations

from ashard.shards import Shard

POINTS_PER_ITEM = 20_000


def count_inside(shard: Shard) -> int:
    """Points of this shard's random stream that fall inside the unit quarter circle."""
    assert shard.rng is not None
    inside = 0
    for _ in shard.idx:
        xy = shard.rng.random((POINTS_PER_ITEM, 2))
        inside += int(((xy * xy).sum(axis=1) <= 1.0).sum())
    return inside

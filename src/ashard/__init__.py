"""ashard: async-first sharded parallel work on supervised worker processes.

    result = await ashard.shard_map(1_000_000, fn, borrow={"X": X})

The supervisor (anyio and up) is loaded on first use, so that a worker process, which
imports this package to reach `ashard._worker`, starts without it.
"""

import importlib
import typing

__version__ = "0.1.0.dev0"

__all__ = [
    "Buffer",
    "Diagnostics",
    "Pool",
    "PoolStats",
    "Shard",
    "ShardDone",
    "ShardError",
    "ShardFailed",
    "ShardMapError",
    "ShardResult",
    "ShardStream",
    "ShardTimeout",
    "Shards",
    "SharedArray",
    "SharedTable",
    "WorkerCrashed",
    "WorkerRow",
    "WorkerStartError",
    "buffer",
    "call",
    "default_pool",
    "map",
    "shard_map",
    "shard_stream",
    "shards",
    "share",
    "shutdown",
]

from ashard.errors import (
    ShardError,
    ShardFailed,
    ShardMapError,
    ShardTimeout,
    WorkerCrashed,
    WorkerStartError,
)
from ashard.results import Diagnostics, PoolStats, ShardDone, ShardResult, WorkerRow
from ashard.shards import Shard, Shards, shards

_LAZY = {
    "Buffer": "ashard.shared",
    "SharedArray": "ashard.shared",
    "SharedTable": "ashard.shared",
    "buffer": "ashard.shared",
    "share": "ashard.shared",
    "Pool": "ashard.pool",
    "ShardStream": "ashard._stream",
    "call": "ashard.api",
    "default_pool": "ashard.api",
    "map": "ashard.api",
    "shard_map": "ashard.api",
    "shard_stream": "ashard.api",
    "shutdown": "ashard.api",
}

if typing.TYPE_CHECKING:
    from ashard._stream import ShardStream
    from ashard.api import call, default_pool, map, shard_map, shard_stream, shutdown
    from ashard.pool import Pool
    from ashard.shared import Buffer, SharedArray, SharedTable, buffer, share


def __getattr__(name: str) -> typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ashard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])

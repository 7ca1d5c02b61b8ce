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
    "GatherTooLarge",
    "Pool",
    "PoolStats",
    "ReduceResult",
    "ResultRef",
    "SchemaMismatch",
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
    "TableRef",
    "TableSink",
    "WorkerCrashed",
    "WorkerRow",
    "WorkerStartError",
    "buffer",
    "call",
    "default_pool",
    "map",
    "shard_map",
    "shard_reduce",
    "shard_stream",
    "shards",
    "share",
    "shutdown",
    "table_sink",
]

from ashard.errors import (
    GatherTooLarge,
    SchemaMismatch,
    ShardError,
    ShardFailed,
    ShardMapError,
    ShardTimeout,
    WorkerCrashed,
    WorkerStartError,
)
from ashard.results import (
    Diagnostics,
    PoolStats,
    ReduceResult,
    ShardDone,
    ShardResult,
    WorkerRow,
)
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
    "shard_reduce": "ashard.api",
    "shard_stream": "ashard.api",
    "ResultRef": "ashard.tables",
    "TableRef": "ashard.tables",
    "TableSink": "ashard.tables",
    "table_sink": "ashard.tables",
    "shutdown": "ashard.api",
}

if typing.TYPE_CHECKING:
    from ashard._stream import ShardStream
    from ashard.api import (
        call,
        default_pool,
        map,
        shard_map,
        shard_reduce,
        shard_stream,
        shutdown,
    )
    from ashard.pool import Pool
    from ashard.shared import Buffer, SharedArray, SharedTable, buffer, share
    from ashard.tables import ResultRef, TableRef, TableSink, table_sink


def __getattr__(name: str) -> typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ashard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])

"""ashard: async-first sharded parallel work on supervised worker processes.

    result = await ashard.shard_map(1_000_000, fn, borrow={"X": X})

Every public name is loaded on first use, so that a worker process, which imports
this package to reach `ashard._worker`, starts without the supervisor (anyio and up)
or anything it does not need: a worker's start is part of a cold start.
"""

import importlib as _importlib
import sys as _sys
import typing as _typing

from ashard import _offloop
from ashard._version import __version__ as __version__

__all__ = [
    "Backoff",
    "Buffer",
    "Diagnostics",
    "Executor",
    "ExecutorUnpicklingError",
    "ExecutorWorkerCrashed",
    "GatherTooLarge",
    "HygieneWarning",
    "MemoryDiagnostics",
    "Pool",
    "PoolStats",
    "ReduceResult",
    "ResultRef",
    "Retry",
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
    "register_joblib",
    "retry_failed",
    "shard_map",
    "shard_reduce",
    "shard_stream",
    "shards",
    "share",
    "shutdown",
    "table_sink",
]

# Eager: the function `shards` has its module's name, and a later import of the module
# `ashard.shards` would otherwise set the package's attribute to the module.
from ashard.shards import Shard, Shards, shards

_LAZY = {
    "GatherTooLarge": "ashard.errors",
    "HygieneWarning": "ashard.errors",
    "SchemaMismatch": "ashard.errors",
    "ShardError": "ashard.errors",
    "ShardFailed": "ashard.errors",
    "ShardMapError": "ashard.errors",
    "ShardTimeout": "ashard.errors",
    "WorkerCrashed": "ashard.errors",
    "WorkerStartError": "ashard.errors",
    "Backoff": "ashard._rules",
    "Retry": "ashard._rules",
    "Diagnostics": "ashard.results",
    "MemoryDiagnostics": "ashard.results",
    "Executor": "ashard.executor",
    "ExecutorUnpicklingError": "ashard.executor",
    "ExecutorWorkerCrashed": "ashard.executor",
    "register_joblib": "ashard._joblib",
    "PoolStats": "ashard.results",
    "ReduceResult": "ashard.results",
    "ShardDone": "ashard.results",
    "ShardResult": "ashard.results",
    "WorkerRow": "ashard.results",
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
    "retry_failed": "ashard.api",
    "shard_map": "ashard.api",
    "shard_reduce": "ashard.api",
    "shard_stream": "ashard.api",
    "ResultRef": "ashard.tables",
    "TableRef": "ashard.tables",
    "TableSink": "ashard.tables",
    "table_sink": "ashard.tables",
    "shutdown": "ashard.api",
}

if _typing.TYPE_CHECKING:
    from ashard._joblib import register_joblib
    from ashard._rules import Backoff, Retry
    from ashard._stream import ShardStream
    from ashard.api import (
        call,
        default_pool,
        map,
        retry_failed,
        shard_map,
        shard_reduce,
        shard_stream,
        shutdown,
    )
    from ashard.errors import (
        GatherTooLarge,
        HygieneWarning,
        SchemaMismatch,
        ShardError,
        ShardFailed,
        ShardMapError,
        ShardTimeout,
        WorkerCrashed,
        WorkerStartError,
    )
    from ashard.executor import Executor, ExecutorUnpicklingError, ExecutorWorkerCrashed
    from ashard.pool import Pool
    from ashard.results import (
        Diagnostics,
        MemoryDiagnostics,
        PoolStats,
        ReduceResult,
        ShardDone,
        ShardResult,
        WorkerRow,
    )
    from ashard.shared import Buffer, SharedArray, SharedTable, buffer, share
    from ashard.tables import ResultRef, TableRef, TableSink, table_sink


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ashard' has no attribute {name!r}")
    if name in _offloop.STAND_INS and module not in _sys.modules and _offloop.on_a_loop():
        return _offloop.stand_in(module, name)  # not kept: the function, once loaded
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])

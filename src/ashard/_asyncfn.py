"""Is a shard function an ``async def``? Asked in the caller (to check
`shard_concurrency`) and in the worker (to run it on its event loop), without importing
`inspect` (a worker's start stays light)."""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["is_async_fn"]

_CO_COROUTINE = 0x80  # `inspect.CO_COROUTINE`


def is_async_fn(fn: Any) -> bool:
    """True for an ``async def`` function, a `functools.partial` of one, a bound method
    of one, or an object whose ``__call__`` is one."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    code = getattr(fn, "__code__", None)
    if code is None:
        call = next((k.__dict__["__call__"] for k in type(fn).__mro__ if "__call__" in k.__dict__),
                    None)  # fmt: skip
        code = getattr(call, "__code__", None)
    return code is not None and bool(code.co_flags & _CO_COROUTINE)

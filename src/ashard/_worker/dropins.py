"""Helpers that run inside a worker for the drop-in executors (light to import)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def apply_star(args: tuple[Any, ...], fn: Callable[..., Any]) -> Any:
    """``fn(*args)``: `Executor.map` as an ashard `map` over argument tuples."""
    return fn(*args)


async def apply_star_async(args: tuple[Any, ...], fn: Callable[..., Any]) -> Any:
    """``await fn(*args)``: `Executor.map` of an ``async def`` fn."""
    return await fn(*args)

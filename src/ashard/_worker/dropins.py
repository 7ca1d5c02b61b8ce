"""Helpers that run inside a worker for the drop-in executors (light to import)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def apply_chunk(fn: Callable[..., Any], chunk: Iterable[tuple[Any, ...]]) -> list[Any]:
    """``[fn(*args) for args in chunk]``: a chunk of `Executor.map` in one round trip."""
    return [fn(*args) for args in chunk]


def apply_star(args: tuple[Any, ...], fn: Callable[..., Any]) -> Any:
    """``fn(*args)``: `Executor.map` as an ashard `map` over argument tuples."""
    return fn(*args)

"""Tracebacks from workers that name the file and show the line, for functions that
travel by value.

cloudpickle renames the code of every function it pickles by value (from a script's
`__main__`, a notebook cell, a closure) to ``<dynamic-code>``, and a notebook cell's
file exists only in the parent's `linecache` (ipykernel registers each cell there):
a worker's traceback would say ``File "<dynamic-code>", line 4`` and show nothing.
`with_sources(fn)` wraps such a function so that unpickling it in the worker puts
back its code's file names and registers the lines the worker cannot read from disk;
its tracebacks then read as a local one would. Functions pickled by reference are
untouched.
"""

from __future__ import annotations

import contextlib
import functools
import linecache
import types
from collections.abc import Iterator
from typing import Any

from ashard._serialize import LRU_WRAPPER, travels_by_value

__all__ = ["with_sources"]

_DYNAMIC = "<dynamic-code>"


class _WithSources:
    """`fn`, pickled with the file names of its code and the lines of those only the
    parent has; it unpickles as `fn` itself."""

    def __init__(self, fn: Any, names: tuple[str, ...], sources: dict[str, Any]) -> None:
        self.fn = fn
        self.names = names
        self.sources = sources

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _restore, (self.fn, self.names, self.sources)


def _restore(fn: Any, names: tuple[str, ...], sources: dict[str, Any]) -> Any:
    for name, (size, _, lines, full) in sources.items():
        linecache.cache.setdefault(name, (size, None, lines, full))  # None: never re-read
    target = _function_of(fn)
    code = getattr(target, "__code__", None)
    if isinstance(code, types.CodeType) and code.co_filename == _DYNAMIC and names:
        # a nicety: whatever goes wrong, `fn` keeps its names and still runs
        with contextlib.suppress(StopIteration, ValueError, TypeError, AttributeError):
            target.__code__ = _renamed(code, iter(names))
    return fn


def _function_of(fn: Any) -> Any:
    """The function whose code `fn` runs: `fn` itself, a partial's, a bound method's (a
    method reads its function's ``__code__`` but cannot be given one), or the one a
    `functools.lru_cache` wraps."""
    target = fn.func if isinstance(fn, functools.partial) else fn
    if isinstance(target, types.MethodType):
        target = target.__func__
    return getattr(target, "__wrapped__", target) if isinstance(target, LRU_WRAPPER) else target


def _renamed(code: types.CodeType, names: Iterator[str]) -> types.CodeType:
    name = next(names)
    consts = tuple(
        _renamed(c, names) if isinstance(c, types.CodeType) else c for c in code.co_consts
    )
    return code.replace(co_filename=name, co_consts=consts)


def with_sources(fn: Any) -> Any:
    """`fn`, or a wrapper carrying what its code needs to be shown (see above)."""
    target = _function_of(fn)
    code = getattr(target, "__code__", None)
    if not isinstance(code, types.CodeType) or not travels_by_value(target):
        return fn
    names, sources = _names_and_sources(code, code.co_filename)
    return _WithSources(fn, names, sources)


@functools.lru_cache(maxsize=256)
def _names_and_sources(
    code: types.CodeType, filename: str
) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The file names of `code` and its nested code, and the lines of those only
    `linecache` holds. Keyed by `filename` too: code objects compare equal whatever
    their file (two notebook cells differing in a comment), and each keeps its own."""
    names: list[str] = []
    sources: dict[str, Any] = {}

    def walk(current: types.CodeType) -> None:
        name = current.co_filename
        names.append(name)
        entry = linecache.cache.get(name)
        # no mtime: registered by hand (ipykernel's cells), not read from a file
        if name not in sources and entry is not None and len(entry) == 4 and entry[1] is None:
            sources[name] = entry
        for c in current.co_consts:
            if isinstance(c, types.CodeType):
                walk(c)

    walk(code)
    return tuple(names), sources

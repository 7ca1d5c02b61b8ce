"""Argument checking: every bad input is refused here, with a message that names the
argument, the value and what was expected, before any worker runs."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from ashard._job import JobOptions
from ashard._protocol import Payload
from ashard._serialize import dumps_named
from ashard.shards import Shards, shards

_ERRORS = ("raise", "collect")
_COW = ("deny", "audit", "allow")
_PROFILES = ("default", "memory", "speed")


def _show(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def check_fn(fn: object, name: str = "fn") -> Callable[..., Any]:
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {_show(fn)}")
    return fn


def check_positive_int(name: str, value: object, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {_show(value)}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def check_timeout(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"timeout must be a positive number of seconds or None, got {_show(value)}")
    seconds = float(value)
    if not seconds > 0 or math.isinf(seconds):
        raise ValueError(f"timeout must be a positive, finite number of seconds, got {value}")
    return seconds


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> Any:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}; got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_show(value)}")
    return value


def job_options(
    *,
    chunk_size: object,
    timeout: object,
    max_retries: object,
    retry_errors: object,
    seed: object,
    cow: object,
    errors: object,
    progress: object,
    profile: object = "default",
) -> JobOptions:
    """Check the options shared by `shard_map`, `shard_stream` and `map`."""
    if chunk_size != "auto":
        if isinstance(chunk_size, str):
            raise ValueError(f"chunk_size must be a positive int or 'auto', got {chunk_size!r}")
        check_positive_int("chunk_size", chunk_size)
    if isinstance(max_retries, bool) or not isinstance(max_retries, numbers.Integral):
        raise TypeError(f"max_retries must be an int >= 0, got {_show(max_retries)}")
    if int(max_retries) < 0:
        raise ValueError(f"max_retries must be an int >= 0, got {max_retries}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be a non-negative int or None, got {_show(seed)}")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative int or None, got {seed}")
    check_bool("retry_errors", retry_errors)
    check_bool("progress", progress)
    return JobOptions(
        chunk_size="auto" if chunk_size == "auto" else int(chunk_size),  # type: ignore[call-overload]
        timeout=check_timeout(timeout),
        max_retries=int(max_retries),
        retry_errors=bool(retry_errors),
        seed=None if seed is None else int(seed),
        errors=check_choice("errors", errors, _ERRORS),
        cow=check_choice("cow", cow, _COW),
        profile=check_choice("profile", profile, _PROFILES),
    )


def check_stream(ordered: object, max_pending: object) -> tuple[bool, int | None]:
    check_bool("ordered", ordered)
    return bool(ordered), check_positive_int("max_pending", max_pending, allow_none=True)


def resolve_shards(value: object) -> tuple[Shards, Any]:
    """(layout, sequence or None) for the `shards` argument of `shard_map`."""
    if isinstance(value, Shards):
        return value, None
    if isinstance(value, bool):
        raise TypeError("shards must be an int, an ashard.Shards or a sequence, got bool")
    if isinstance(value, numbers.Integral):
        if value <= 0:
            raise ValueError(f"shards must be a positive number of items, got {value}")
        return shards(int(value)), None
    if isinstance(value, str | bytes | bytearray | Mapping):
        raise TypeError(
            f"shards must be an int, an ashard.Shards or a sequence of items, got "
            f"{type(value).__name__}; wrap it in a list if you mean its elements"
        )
    if not (hasattr(value, "__len__") and hasattr(value, "__getitem__")):
        raise TypeError(
            "shards must be an int, an ashard.Shards or a sequence of items (with len() "
            f"and indexing), got {_show(value)}; for other iterables use ashard.map"
        )
    n = len(value)
    if n == 0:
        return Shards(0, 1, "contiguous"), value
    return shards(n), value


def check_items(items: object) -> Iterable[Any]:
    try:
        iter(items)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"items must be iterable, got {_show(items)}") from None
    return items  # type: ignore[return-value]


def check_borrow(borrow: object, out: object) -> tuple[dict[str, Any], dict[str, Any]]:
    """The borrowed objects and the output buffers, as keyword arguments for `fn`."""
    from ashard.buffers import Buffer
    from ashard.shared import SegmentBacked

    inputs = _check_names("borrow", borrow)
    outputs = _check_names("out", out)
    for name, value in inputs.items():
        if isinstance(value, SegmentBacked) and value.closed:
            raise ValueError(f"borrow[{name!r}] is a closed {type(value).__name__}")
    for name, value in outputs.items():
        if not isinstance(value, Buffer):
            raise TypeError(
                f"out[{name!r}] must be an ashard.Buffer (from ashard.buffer()), got {_show(value)}"
            )
        if value.closed:
            raise ValueError(f"out[{name!r}] is a closed Buffer")
        if name in inputs:
            raise ValueError(f"{name!r} is both in borrow and in out: fn takes each name once")
    return inputs, outputs


def _check_names(what: str, value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping of names to objects, got {_show(value)}")
    for name in value:
        if not isinstance(name, str) or not name.isidentifier():
            raise TypeError(
                f"{what} keys are passed to fn as keyword arguments and must be valid "
                f"identifiers, got {name!r}"
            )
    return dict(value)


def pickle_payload(obj: object, what: str) -> Payload:
    """Pickle `obj` once, for every worker; the error names `what`."""
    buffers: list[Any] = []
    data = dumps_named(obj, what, buffers)
    return Payload(data, buffers)


ErrorsMode = Literal["raise", "collect"]

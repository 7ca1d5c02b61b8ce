"""Every argument check, and the options record a call is built from.

Bad input is refused here, with a message that names the argument, the value and
what was expected, before any worker runs. The per-call options are declared once, in
`CallOptions` (name, default, check); a call builds one frozen record from its
keyword arguments with `CallOptions.build`.

Why a TypedDict beside the record: the public functions take the options as
``**options: Unpack[ShardOptions]`` (PEP 692), which is how `mypy` and IDEs check and
complete every keyword, and Python cannot derive a TypedDict from a dataclass. So the
TypedDicts name the keywords each function accepts (and their types, for static
checkers), the record owns defaults and checks, and `takes_options` writes the
expanded signature (with the record's defaults) onto the function for `help()` and
`inspect`. The TypedDicts' keys are checked against the record at import.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypedDict, TypeVar, cast, get_args, get_type_hints

from ashard._asyncfn import is_async_fn
from ashard._health import HealthPolicy
from ashard._priority import MAX_NICE
from ashard._rules import OnError, RetryErrors, check_on_error, check_retry_errors
from ashard.shards import Shards, shards

__all__ = [
    "CallOptions",
    "MapOptions",
    "ReduceOptions",
    "ShardOptions",
    "StreamOptions",
    "check_borrow",
    "check_concurrency_fn",
    "check_count",
    "check_entry_point",
    "check_env",
    "check_fn",
    "check_items",
    "check_positive_int",
    "check_shard_args",
    "check_size",
    "check_timeout",
    "check_worker_loop",
    "check_worker_nice",
    "check_workers",
    "health_policy",
    "resolve_shards",
    "takes_options",
]

ChunkSize = int | Literal["auto"]
Cow = Literal["deny", "audit", "allow"]
Footprint = int | str | Callable[[Any], int] | None
"""Bytes per shard: a size, a callable of the shard (of the item, for `map`), or "learn"."""
ErrorsMode = Literal["raise", "collect"]
ProfileName = Literal["default", "memory", "speed"]
ResultsMode = Literal["memory", "table", "disk"]
Hygiene = Literal["check", "recycle", "off"]
_F = TypeVar("_F", bound=Callable[..., Any])


# -- primitive checks --------------------------------------------------------------------


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


FDS_PER_WORKER = 5
"""File descriptors of the caller's that each worker holds (its channel, the pipes of
its output, its process handle), counted on a running pool."""
_FDS_KEPT = 64  # for the caller's own files


def check_workers(name: str, value: object, *, local: bool = True) -> int | None:
    """`workers` (named `name`): None or a positive int, and for a pool on this machine
    (`local`) no more than this process's file descriptors can hold: a pool too large
    to start would otherwise try, worker after worker, until memory or descriptors ran
    out."""
    workers = check_positive_int(name, value, allow_none=True)
    if workers is not None and local:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        fds = soft if 0 < soft != resource.RLIM_INFINITY else 1 << 20
        most = max(1, (fds - _FDS_KEPT) // FDS_PER_WORKER)
        if workers > most:
            raise ValueError(
                f"{name} must be at most {most} here, got {workers}: each worker holds "
                f"{FDS_PER_WORKER} of this process's file descriptors, and it may open "
                f"{fds} (RLIMIT_NOFILE: raise it with `ulimit -n` or resource.setrlimit)"
            )
    return workers


MAX_SECONDS = 1e8
"""The longest timeout or interval (about three years): worker timers and thread waits
cannot hold much more."""


def _check_seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number of seconds, got {_show(value)}")
    seconds = float(value)
    if not seconds > 0 or math.isinf(seconds):
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")
    if seconds > MAX_SECONDS:
        raise ValueError(f"{name} must be at most {MAX_SECONDS:.0e} seconds, got {value!r}")
    return seconds


def check_timeout(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number of seconds or None, got {_show(value)}")
    try:
        return _check_seconds(name, value)
    except ValueError as exc:
        raise ValueError(f"{exc} (None: no limit)") from None


def _one_of(literal: object) -> Callable[[str, object], Any]:
    """The check for an option whose values are those of a `Literal` type."""
    choices = get_args(literal)

    def check(name: str, value: object) -> Any:
        if not isinstance(value, str) or value not in choices:
            options = ", ".join(repr(c) for c in choices)
            raise ValueError(f"{name} must be one of {options}; got {value!r}")
        return value

    return check


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_show(value)}")
    return value


def _check_chunk_size(name: str, value: object) -> ChunkSize:
    if isinstance(value, str):
        if value == "auto":
            return "auto"
        raise ValueError(f"{name} must be a positive int or 'auto', got {value!r}")
    size = check_positive_int(name, value)
    assert size is not None
    return size


def check_count(name: str, value: object) -> int:
    if type(value) is int and value >= 0:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 0, got {_show(value)}")
    if int(value) < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value}")
    return int(value)


def _check_seed(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative int or None, got {_show(value)}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int or None, got {value}")
    return int(value)


def _check_limit(name: str, value: object) -> int | None:
    return check_positive_int(name, value, allow_none=True)


def _check_path(name: str, value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise TypeError(
            f"{name} must be a directory path or URI (str or os.PathLike), got {_show(value)}"
        )
    return value


DEFAULT_HELD_BYTES = 128 << 20
"""What the caller holds for one call at most, by default: items read ahead of the
workers (their pickled size: while a chunk is being sent its frame exists too, so the
peak is about twice this) and finished values waiting for a stream's consumer."""


def _check_held_bytes(name: str, value: object) -> int | None:
    size = parse_bytes(name, value)
    if size is not None and size <= 0:
        raise ValueError(f"{name} must be a positive size such as '256MB', or None, got {value!r}")
    return size


def _check_footprint(name: str, value: object) -> Footprint:
    """`footprint`: None, "learn", bytes per shard (an int >= 0 or a size such as
    "200MB"), or a callable giving a shard's bytes."""
    if value is None or value == "learn" or (type(value) is int and value >= 0):
        return cast(Footprint, value)
    if isinstance(value, str):
        return parse_bytes(name, value)
    if callable(value):
        return cast(Footprint, value)
    raise TypeError(
        f"{name} must be bytes per shard (an int >= 0 or a size such as '200MB'), a "
        f"callable footprint(shard) -> int, 'learn' or None, got {_show(value)}"
    )


def _check_concurrency(name: str, value: object) -> int:
    size = check_positive_int(name, value)
    assert size is not None
    return size


def check_concurrency_fn(opts: CallOptions, fn: Callable[..., Any], where: str) -> None:
    """`shard_concurrency` above 1 runs several shards of a worker at once on its event
    loop: only an ``async def`` fn can."""
    if opts.shard_concurrency > 1 and not is_async_fn(fn):
        raise ValueError(
            f"shard_concurrency={opts.shard_concurrency} runs that many shards of a worker at "
            f"once on its event loop, so fn must be an async def function; {_name_of(fn)} is "
            f"a plain one (for {where}, drop shard_concurrency, or make fn async)"
        )


# -- the per-call options ----------------------------------------------------------------


def _checked_by(fn: Callable[[str, object], object]) -> dict[str, object]:
    """The metadata of a `CallOptions` field: the check that normalises a given value."""
    return {"check": fn}


@dataclass(frozen=True, slots=True)
class CallOptions:
    """The options of one `shard_map`, `shard_stream` or `map` call, checked."""

    chunk_size: ChunkSize = field(default="auto", metadata=_checked_by(_check_chunk_size))
    timeout: float | None = field(default=None, metadata=_checked_by(check_timeout))
    max_retries: int = field(default=3, metadata=_checked_by(check_count))
    retry_errors: RetryErrors = field(default=False,
                                      metadata=_checked_by(check_retry_errors))  # fmt: skip
    on_error: OnError | None = field(default=None, metadata=_checked_by(check_on_error))
    seed: int | None = field(default=None, metadata=_checked_by(_check_seed))
    cow: Cow = field(default="deny", metadata=_checked_by(_one_of(Cow)))
    errors: ErrorsMode = field(default="raise", metadata=_checked_by(_one_of(ErrorsMode)))
    progress: bool = field(default=False, metadata=_checked_by(_check_bool))
    profile: ProfileName = field(default="default", metadata=_checked_by(_one_of(ProfileName)))
    ordered: bool = field(default=False, metadata=_checked_by(_check_bool))
    max_pending: int | None = field(default=None, metadata=_checked_by(_check_limit))
    results: ResultsMode = field(default="memory", metadata=_checked_by(_one_of(ResultsMode)))
    results_path: str | None = field(default=None, metadata=_checked_by(_check_path))
    max_held_bytes: int | None = field(default=DEFAULT_HELD_BYTES,
                                       metadata=_checked_by(_check_held_bytes))  # fmt: skip
    footprint: Footprint = field(default=None, metadata=_checked_by(_check_footprint))
    shard_concurrency: int = field(default=1, metadata=_checked_by(_check_concurrency))

    @classmethod
    def build(cls, given: Mapping[str, object], accepted: type, where: str) -> CallOptions:
        """The record for keyword arguments `given` of function `where`, which takes
        the keys of the TypedDict `accepted`; raises what a bad argument deserves."""
        keys = _KEYS[accepted]
        for name in given:
            if name not in keys:
                raise TypeError(
                    f"{where}() got an unexpected keyword argument {name!r}"
                    f"{_nearest(name, sorted(keys))}"
                )
        checked = {
            f.name: f.metadata["check"](f.name, given[f.name]) for f in _FIELDS if f.name in given
        }
        return cls(**checked)


_FIELDS = fields(CallOptions)


class MapOptions(TypedDict, total=False):
    """The options of `map` (see `CallOptions` for defaults)."""

    chunk_size: ChunkSize
    timeout: float | None
    max_retries: int
    retry_errors: RetryErrors
    on_error: OnError | None
    seed: int | None
    errors: ErrorsMode
    progress: bool
    profile: ProfileName
    max_held_bytes: int | str | None
    footprint: Footprint
    shard_concurrency: int


class ShardOptions(MapOptions, total=False):
    """The options of `shard_map`: those of `map`, `cow` for borrowed arrays, and where
    values go (`results`: "memory", or written by the workers as "table" or "disk",
    under `results_path` or a temporary directory)."""

    cow: Cow
    results: ResultsMode
    results_path: str | os.PathLike[str] | None


class StreamOptions(ShardOptions, total=False):
    """The options of `shard_stream`: those of `shard_map`, and the stream's own."""

    ordered: bool
    max_pending: int | None


class ReduceOptions(ShardOptions, total=False):
    """The options of `shard_reduce`: those of `shard_map`, and how many results may
    wait uncombined (`ordered` is a parameter of its own)."""

    max_pending: int | None


def _keys(accepted: type) -> frozenset[str]:
    return frozenset(getattr(accepted, "__annotations__", {}))


_KEYS: dict[type, frozenset[str]] = {
    typed: _keys(typed) for typed in (MapOptions, ShardOptions, StreamOptions, ReduceOptions)
}
_RECORD = {f.name for f in _FIELDS}
_HINTS = get_type_hints(CallOptions)  # Literal[...] rather than alias names, for help()
for _typed, _names in _KEYS.items():
    if not _names <= _RECORD:
        raise AssertionError(f"{_typed.__name__} names options CallOptions lacks")


def takes_options(accepted: type) -> Callable[[_F], _F]:
    """Show the options of TypedDict `accepted` as keyword-only parameters, with the
    record's defaults, in the signature of a function that takes ``**options``."""
    keys = _KEYS[accepted]
    extra = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                          annotation=_HINTS[f.name])
        for f in _FIELDS if f.name in keys
    ]  # fmt: skip

    def apply(fn: _F) -> _F:
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        vars(fn)["__signature__"] = sig.replace(parameters=[*params, *extra])
        return fn

    return apply


# -- what a call works on ----------------------------------------------------------------


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
    """`items`, if it is iterable: if `iter()` takes it, the one reliable test."""
    if isinstance(items, Iterable):
        return items
    try:
        iter(cast(Any, items))  # the sequence protocol (`__getitem__`) too
    except TypeError:
        raise TypeError(f"items must be iterable, got {_show(items)}") from None
    return cast(Iterable[Any], items)


def check_borrow(
    borrow: object, out: object, again: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The borrowed objects and the outputs (buffers, table sinks), as keyword
    arguments for `fn` (`again`: for `retry_failed`, whose sinks hold its first run)."""
    inputs = _check_names("borrow", borrow)
    outputs = _check_names("out", out)
    if not inputs and not outputs:
        return inputs, outputs
    # Buffers, shared objects and sinks exist only once their modules are loaded (by the
    # caller that made them): nothing is imported here, on the event loop (15 ms).
    shared, tables = sys.modules.get("ashard.shared"), sys.modules.get("ashard.tables")
    Buffer = shared.Buffer if shared is not None else ()
    SegmentBacked = shared.SegmentBacked if shared is not None else ()
    TableSink = tables.TableSink if tables is not None else ()

    for name, value in inputs.items():
        if isinstance(value, SegmentBacked) and value.closed:
            raise ValueError(f"borrow[{name!r}] is a closed {type(value).__name__}")
        if isinstance(value, TableSink):
            raise TypeError(f"borrow[{name!r}] is a TableSink: sinks are outputs, pass it in out=")
    sinks = [v for v in outputs.values() if isinstance(v, TableSink)]
    if len({id(s) for s in sinks}) < len(sinks):
        raise ValueError("the same TableSink is given twice in out=")
    for name, value in outputs.items():
        if isinstance(value, TableSink):
            value.check_usable(name, again)
        elif not isinstance(value, Buffer):
            raise TypeError(
                f"out[{name!r}] must be an ashard.Buffer (from ashard.buffer()) or an "
                f"ashard.TableSink (from ashard.table_sink()), got {_show(value)}"
            )
        elif value.closed:
            raise ValueError(f"out[{name!r}] is a closed Buffer")
        if name in inputs:
            raise ValueError(f"{name!r} is both in borrow and in out: fn takes each name once")
    return inputs, outputs


def check_takes(fn: Callable[..., Any], inputs: Mapping[str, Any], outputs: Mapping[str, Any],
                first: str) -> None:  # fmt: skip
    """Refuse a borrow or out name that `fn` has no parameter for, before any worker
    runs, where its signature can be read and it takes no ``**kwargs`` (`fn` is
    called as ``fn(first, **borrow, **out)``)."""
    if not inputs and not outputs:
        return

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or a callable without a signature
        return
    P = inspect.Parameter
    if any(p.kind is P.VAR_KEYWORD for p in params.values()):
        return
    by_position = (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)
    positional = [n for n, p in params.items() if p.kind in by_position]
    taken = positional[0] if positional else None  # receives `first`
    keywords = [
        n for n, p in params.items()
        if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY) and n != taken
    ]  # fmt: skip
    for what, names in (("borrow", inputs), ("out", outputs)):
        for name in names:
            if name not in keywords:
                raise TypeError(
                    f"{what}[{name!r}]: fn {_name_of(fn)} takes no argument {name!r}; it is "
                    f"called as fn({first}, **borrow, **out) and its parameters are "
                    f"({', '.join(params)}){_nearest(name, keywords)}"
                )


def check_shard_args(
    shards: object,
    fn: object,
    borrow: object,
    out: object,
    options: Mapping[str, object],
    accepted: type,
    where: str,
    again: bool = False,
) -> tuple[CallOptions, Callable[..., Any], Shards, Any, dict[str, Any], dict[str, Any]]:
    """Every argument of a `shard_map`, `shard_stream` or `shard_reduce` call checked
    (`again`: a `retry_failed`'s): its options, `fn`, its layout and sequence (or None),
    its borrowed objects and its outputs. Nothing is made, pickled or imported."""
    opts = CallOptions.build(options, accepted, where)
    checked_fn = check_fn(fn)
    layout, sequence = resolve_shards(shards)
    inputs, outputs = check_borrow(borrow, out, again=again)
    check_takes(checked_fn, inputs, outputs, "shard")
    check_concurrency_fn(opts, checked_fn, where)
    if opts.results == "memory" and opts.results_path is not None:
        raise ValueError(
            'results_path is where results="table" or "disk" go; with results="memory" '
            "the values come back to the caller: drop results_path or choose a mode"
        )
    return opts, checked_fn, layout, sequence, inputs, outputs


def _name_of(fn: Callable[..., Any]) -> str:
    return str(getattr(fn, "__qualname__", None) or type(fn).__name__)


def _nearest(name: str, names: list[str]) -> str:
    import difflib  # for a bad argument's message only

    close = difflib.get_close_matches(name, names, n=1)
    return f": did you mean {close[0]!r}?" if close else ""


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


# -- a pool's settings -------------------------------------------------------------------


_ENTRY_POINT = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


def check_entry_point(name: str, value: object) -> str | None:
    """None, or "pkg.module:function" (checked for its form only: it is imported where
    it runs, in the workers)."""
    if value is None:
        return None
    if not isinstance(value, str) or not _ENTRY_POINT.match(value):
        raise ValueError(
            f"{name} must be 'pkg.module:function' (a function the workers can import), "
            f"got {value!r}"
        )
    return value


WorkerLoop = Literal["asyncio", "uvloop", "trio"]


def check_worker_loop(value: object) -> str:
    """`worker_loop`: "asyncio", or "uvloop" / "trio" where that library is installed
    (looked up, not imported)."""
    import importlib.util

    loop = _one_of(WorkerLoop)("worker_loop", value)
    if loop != "asyncio" and importlib.util.find_spec(loop) is None:
        raise ValueError(
            f"worker_loop={loop!r} needs the {loop} package, which cannot be imported here "
            f"(pip install {loop}), or use worker_loop='asyncio'"
        )
    return str(loop)


def check_worker_nice(value: object) -> int:
    """`worker_nice`: how many steps of niceness the workers run below the caller, 0 to
    `MAX_NICE` (more priority than the caller would take privileges)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"worker_nice must be an int from 0 to {MAX_NICE}, got {_show(value)}")
    nice = int(value)
    if not 0 <= nice <= MAX_NICE:
        raise ValueError(f"worker_nice must be an int from 0 to {MAX_NICE}, got {nice}")
    return nice


def check_env(env: object) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise TypeError(f"env must be a mapping of str to str, got {type(env).__name__}")
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"env must map str to str, got {key!r}: {value!r}")
    return dict(env)


def health_policy(
    *,
    mem_cap: object,
    hard_cap: object,
    recycle: object,
    health_check_interval: object,
    max_tasks: object,
    idle_timeout: object,
    min_workers: int | None = None,
    mem_budget: object = None,
    mem_pause: object = 0.8,
    pause_timeout: object = 10.0,
    hygiene: object = "check",
) -> HealthPolicy:
    """The checked health limits of a `Pool` (`min_workers` checked by the caller)."""
    return HealthPolicy(
        mem_cap=parse_bytes("mem_cap", mem_cap),
        hard_factor=_check_factor(hard_cap),
        drift=_check_recycle(recycle),
        interval=_check_seconds("health_check_interval", health_check_interval),
        max_tasks=check_positive_int("max_tasks", max_tasks, allow_none=True),
        idle_timeout=(
            None if idle_timeout is None else _check_seconds("idle_timeout", idle_timeout)
        ),
        min_workers=min_workers,
        mem_budget=_check_budget(mem_budget),
        mem_pause=_check_share("mem_pause", mem_pause),
        pause_timeout=_check_seconds("pause_timeout", pause_timeout),
        hygiene=_one_of(Hygiene)("hygiene", hygiene),
    )


def _check_share(name: str, value: object) -> float:
    """A share of `mem_cap`: above 0, at most 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a share of mem_cap such as 0.8, got {_show(value)}")
    if not 0 < float(value) <= 1:
        raise ValueError(f"{name} must be a share of mem_cap above 0 and at most 1, got {value!r}")
    return float(value)


def _check_budget(value: object) -> int | Literal["auto"] | None:
    """`mem_budget`: None, "auto", or a size."""
    if value == "auto":
        return "auto"
    try:
        return parse_bytes("mem_budget", value)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{exc} (or 'auto', or None)") from None


def check_min_workers(value: object, workers: int, idle_timeout: object) -> int | None:
    """`min_workers` of a pool of `workers`: 0 to `workers`; not given, 0 when
    `idle_timeout` is (idle workers exit, as in v1), else None (all of them)."""
    if value is None:
        return None if idle_timeout is None else 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"min_workers must be an int from 0 to workers, got {_show(value)}")
    if not 0 <= value <= workers:
        raise ValueError(f"min_workers must be from 0 to workers ({workers}), got {value!r}")
    return value


def _check_factor(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) > 1:
        raise ValueError(
            f"hard_cap must be a factor of mem_cap above 1 (such as 1.5), got {value!r}"
        )
    return float(value)


def _check_recycle(value: object) -> float | None:
    """`recycle`: True (drift above 50 %), a growth fraction, or False (off)."""
    if value is True:
        return 0.5
    if value is False:
        return None
    if isinstance(value, numbers.Real) and float(value) > 0 and not math.isinf(value):
        return float(value)
    raise ValueError(
        f"recycle must be True, False or a positive growth fraction such as 0.5, got {value!r}"
    )


_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6,
    "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def check_size(name: str, value: object, least: int = 0) -> int:
    """A size that must be given, `least` bytes at least: bytes, or a string such as
    "2GB"."""
    size = parse_bytes(name, value)
    if size is None:
        raise TypeError(f"{name} must be a number of bytes or a size like '2GB', got None")
    if size < least:
        raise ValueError(f"{name} must be at least {least:,} bytes, got {value!r}")
    return size


def parse_bytes(name: str, value: object) -> int | None:
    """Bytes from an int or a string such as "512MB", "2GB" or "1.5GiB"; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number of bytes or a size like '2GB', got bool")
    if isinstance(value, numbers.Real):
        size = float(value)
    elif isinstance(value, str):
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"{name} must be a number of bytes or a size like '512MB' or '2GB', got {value!r}"
            )
        size = float(match.group(1)) * _UNITS[unit]
    else:
        raise TypeError(
            f"{name} must be a number of bytes or a size like '2GB', got {type(value).__name__}"
        )
    if not size > 0 or math.isinf(size):
        raise ValueError(f"{name} must be a positive size, got {value!r}")
    return int(size)

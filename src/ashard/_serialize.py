"""Pickling of user objects (functions, items, results, exceptions) for the channel.

The C pickler is tried first: it is the fastest and handles importable functions by
reference. Anything it cannot pickle, or that refers to `__main__` (which a worker
cannot import), goes through cloudpickle, which pickles such objects by value.
Buffers (numpy arrays, and large `bytes` given as arguments or borrowed: `uncopied`)
travel out of band, uncopied.
"""

from __future__ import annotations

import functools
import io
import pickle
import sys
import traceback
from collections.abc import Iterable
from itertools import chain
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ashard._protocol import Payload

__all__ = [
    "LRU_WRAPPER",
    "MAX_BUFFERS",
    "SETTLED",
    "SHARED_ARRAY_BYTES",
    "Drawn",
    "Joined",
    "LoadError",
    "decode_exception",
    "drawn",
    "dumps",
    "dumps_named",
    "encode_exception",
    "holds_shared_arrays",
    "joined",
    "load_failure",
    "loads",
    "pack",
    "pickle_payload",
    "settled",
    "show_error",
    "travels_by_value",
    "uncopied",
    "uncopied_items",
    "undrawn",
    "unpack",
]

MAX_BUFFERS = 1 << 16
"""Out-of-band buffers one frame may carry (`ashard._framing` checks it; `pack` keeps
within half)."""

PROTOCOL = 5
_MAIN = b"__main__"
UNCOPIED_BYTES = 1 << 20
"""`bytes` and `bytearray` values this large are pickled out of band by `uncopied`."""


class _Uncopied:
    """Pickles a `bytes` or `bytearray` out of band: it is sent from where it lies, not
    copied into the pickle (a copy of 200 MB, and the scan of the pickle for
    ``__main__``, stop the event loop for a fifth of a second), and the worker rebuilds
    a value of the same type from the buffer it receives."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return type(self.data), (pickle.PickleBuffer(self.data),)


def uncopied(value: Any) -> Any:
    """`value`, or a stand-in that pickles it out of band if it is a large `bytes` or
    `bytearray` (exactly those types: a subclass pickles as itself)."""
    if type(value) in (bytes, bytearray) and len(value) >= UNCOPIED_BYTES:
        return _Uncopied(value)
    return value


class Drawn:
    """An item of the caller's iterator, pickled as it was drawn, before the iterator
    went on: ashard reads items ahead of the workers, and a generator that yields one
    buffer changed in place each time (or a list it keeps growing) would otherwise
    have every item of a chunk pickled as its last value. It unpickles as the item
    (out of band when large); `undrawn` gives it back in the caller."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        data = self.data
        if len(data) >= UNCOPIED_BYTES:
            return pickle.loads, (pickle.PickleBuffer(data),)
        return pickle.loads, (data,)


SETTLED = frozenset({int, float, complex, bool, str, bytes, type(None), range})
"""Types whose values cannot change: an item of one is sent as it is."""


def drawn(item: Any) -> Any:
    """`item`, or a `Drawn` copy of it if it could change (anything but numbers,
    strings, bytes and tuples of them); one that does not pickle is kept as it is
    (sending it then says why)."""
    kind = type(item)
    if kind in SETTLED or (kind is tuple and all(type(x) in SETTLED for x in item)):
        return item
    try:
        data = pickle.dumps(item, protocol=PROTOCOL)  # `dumps`, less its checks: the
    except Exception:  # common case, every item of a generator
        data = _MAIN
    if _MAIN in data:  # by value (a lambda, or something of `__main__`)
        try:
            data = dumps(item, None)
        except Exception:
            return item
    return Drawn(data)


_SMALL = (list, dict, set)
_IS_SETTLED = SETTLED.__contains__


def _as_settled_sees(value: Any) -> int:
    return sys.getrefcount(value)  # as `settled` counts its argument's references


def _alone() -> int:
    value: list[Any] = []  # held here alone, as `settled`'s caller holds a fresh value
    return _as_settled_sees(value)


_ALONE = _alone()
"""`sys.getrefcount` of a value that only the caller of `settled` holds in one variable
(which it must: a value passed straight from a call counts one less), seen from inside
`settled`: 3 on CPython 3.11-3.13 (the variable, the parameter, the count's argument);
measured, in case an interpreter counts otherwise."""


def settled(value: Any) -> Any:
    """A task's value, safe from what its worker runs next, before it is sent: values
    are sent in batches, and a function that returns one object it changes in place
    (a buffer it reuses, a list it keeps) would otherwise have every value of a batch
    sent as its last state. `value` itself if it cannot change (numbers, strings,
    Arrow tables) or nothing else holds it (an array of its own data that only the
    caller has); else a copy: an array's, or the value pickled now (`drawn`)."""
    kind = type(value)
    if kind in SETTLED or (kind is tuple and all(type(x) in SETTLED for x in value)):
        return value
    if kind in _SMALL and len(value) <= 16 and sys.getrefcount(value) <= _ALONE:
        parts = chain(value, value.values()) if kind is dict else value
        if all(map(_IS_SETTLED, map(type, parts))):  # a small container of its own
            return value
    np = sys.modules.get("numpy")
    if np is not None and kind is np.ndarray and not value.dtype.hasobject:
        if value.base is None and sys.getrefcount(value) <= _ALONE:
            return value
        return value.copy(order="K")
    pa = sys.modules.get("pyarrow")
    if pa is not None and kind in (pa.Table, pa.RecordBatch):
        return value
    return drawn(value)


def undrawn(item: Any) -> Any:
    """The caller's item of a chunk (a `Drawn` unpickled)."""
    return pickle.loads(item.data) if type(item) is Drawn else item


def uncopied_items(items: Any) -> Any:
    """A chunk's items, with `uncopied` stand-ins when they are `bytes` (looked for in
    a list whose first item is: a list of numbers costs one check)."""
    if type(items) is list and items and type(items[0]) in (bytes, bytearray):
        return [uncopied(x) for x in items]
    return items


class LoadError(pickle.UnpicklingError):
    """Something pickled could not be unpickled where it arrived: a call's function or
    arguments, a shard's items or a borrowed object in a worker, or a result in the
    parent. Its `__cause__` is what unpickling raised. A `pickle.UnpicklingError`, so
    code that catches that (as around `ProcessPoolExecutor` results) catches it."""

    def __init__(self, what: str, exc: BaseException, where: str) -> None:
        super().__init__(f"{what} could not be loaded in {where}: {show_error(exc)}")
        self.__cause__ = exc

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_load_error, (str(self),))


def _rebuild_load_error(message: str) -> LoadError:
    error = LoadError.__new__(LoadError)
    pickle.UnpicklingError.__init__(error, message)
    return error


def load_failure(exc: BaseException) -> Exception:
    """What unpickling raised, as an `Exception`: a `SystemExit` raised by some
    `__reduce__` must not end the process that unpickles (the caller, or a worker)."""
    if isinstance(exc, Exception):
        return exc
    error = RuntimeError(f"unpickling raised {show_error(exc)}")
    error.__cause__ = exc
    return error


def show_error(exc: BaseException) -> str:
    """``"TypeName: message"``, or the type's name where the message cannot be had."""
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:
        return type(exc).__name__


def dumps(obj: Any, buffers: list[pickle.PickleBuffer] | None) -> bytes:
    """Pickle `obj`, appending its out-of-band buffers to `buffers` (None: in band)."""
    oob: list[pickle.PickleBuffer] = []
    callback = None if buffers is None else oob.append
    try:
        data = pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=callback)
    except Exception:
        pass
    else:
        if _MAIN not in data:
            if buffers is not None:
                buffers.extend(oob)
            return data
    oob.clear()
    with io.BytesIO() as file:
        _by_value_pickler()(file, protocol=PROTOCOL, buffer_callback=callback).dump(obj)
        by_value = file.getvalue()
    if buffers is not None:
        buffers.extend(oob)
    return by_value


def travels_by_value(obj: Any) -> bool:
    """Is `obj` (a function, a class) pickled by value: defined in `__main__` (a script,
    a notebook cell) or inside a function, so that a worker cannot import it?"""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", "")
    return module in (None, "__main__") or "<" in qualname


LRU_WRAPPER = type(functools.lru_cache(maxsize=None)(abs))  # functools' C `_lru_cache_wrapper`


@functools.cache
def _by_value_pickler() -> Any:
    """cloudpickle's pickler (imported for what the C pickler cannot take), which also
    takes by value a `functools.lru_cache` or `functools.cache` wrapper that travels by
    value: its C type pickles by name only, and a worker has no `__main__` to look it
    up in. The worker gets a wrapper of its own, with the same cache parameters and an
    empty cache, as a spawned `ProcessPoolExecutor` worker does."""
    import cloudpickle

    class ByValue(cloudpickle.Pickler):  # type: ignore[misc]
        def reducer_override(self, obj: Any) -> Any:
            if type(obj) is LRU_WRAPPER and travels_by_value(obj):
                params = obj.cache_parameters()
                # the wrapper is made (and memoized) before its function, which may call it
                made = _new_lru, (params["maxsize"], params["typed"])
                return *made, obj.__wrapped__, None, None, _set_lru
            return super().reducer_override(obj)

    return ByValue


def _new_lru(maxsize: int | None, typed: bool) -> Any:
    """A cache wrapper whose function comes later (`_set_lru`)."""
    target: list[Any] = []

    def call(*args: Any, **kwargs: Any) -> Any:
        return target[0](*args, **kwargs)

    wrapper = functools.lru_cache(maxsize=maxsize, typed=typed)(call)
    wrapper.__dict__["_ashard_target"] = target
    return wrapper


def _set_lru(wrapper: Any, fn: Any) -> None:
    wrapper.__dict__.pop("_ashard_target").append(fn)
    functools.update_wrapper(wrapper, fn)


def dumps_named(obj: Any, what: str, buffers: list[pickle.PickleBuffer]) -> bytes:
    """`dumps`, with a `TypeError` naming `what` if the object cannot be pickled."""
    try:
        return dumps(obj, buffers)
    except Exception as exc:
        raise TypeError(
            f"{what} cannot be sent to a worker process: it could not be pickled "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def pickle_payload(obj: object, what: str) -> Payload:
    """Pickle `obj` once, for every worker; the error names `what`. A large pickle
    travels beside its message, uncopied (each message that carried a 20 MB borrowed
    dict in band copied it: 8.5 ms of the caller's loop per worker)."""
    buffers: list[pickle.PickleBuffer] = []
    data = dumps_named(obj, what, buffers)
    if len(data) > INLINE_PACK_BYTES:
        return pickle.PickleBuffer(data), buffers
    return data, buffers


def loads(data: Any, buffers: Any = ()) -> Any:
    """Unpickle what `dumps` produced."""
    return pickle.loads(data, buffers=buffers)


INLINE_PACK_BYTES = 1 << 16
"""Packed objects up to this size ride inside their message (one small copy); larger
ones, and any with out-of-band buffers, travel beside it, uncopied."""

SHARED_ARRAY_BYTES = 1 << 20
"""A plain ndarray this large in a call's `borrow`, or pickled with its function or a
`call`'s arguments, travels as a shared-memory copy kept while it is unchanged
(`ashard._borrowed`); a smaller one is copied for each call: that costs less."""


def holds_shared_arrays(buffers: Iterable[Any]) -> bool:
    """Do `buffers` (a pickle's out-of-band ones) include one of an ndarray of
    `SHARED_ARRAY_BYTES` or more, which may travel as a segment instead
    (`ashard._export.captured` decides)? No ndarray exists before numpy is imported."""
    np = sys.modules.get("numpy")
    if np is None:
        return False
    for buffer in buffers:
        view = memoryview(buffer)
        if view.nbytes >= SHARED_ARRAY_BYTES and isinstance(view.obj, np.ndarray):
            return True
    return False


def pack(obj: object) -> Payload:
    """`obj` pickled on its own, apart from the message that carries it: the message
    stays readable whatever the object does when it is unpickled."""
    buffers: list[pickle.PickleBuffer] = []
    data = dumps(obj, buffers)
    if not buffers and len(data) <= INLINE_PACK_BYTES:
        return data, buffers
    if len(buffers) > MAX_BUFFERS // 2:  # thousands of small arrays: in band, one copy
        buffers = []
        data = dumps(obj, None)
    return pickle.PickleBuffer(data), buffers


class Joined:
    """A long list, tuple or dict pickled a piece at a time (`pieces`: a `Payload` of
    each slice of it, in order: a list of items, or a dict of entries), so that no one
    step of the caller's loop pickles all of it; unpickled as the one `kind` of object.
    The pieces travel out of band, uncopied."""

    __slots__ = ("kind", "pieces")

    def __init__(self, pieces: list[Payload], kind: type) -> None:
        self.pieces = pieces
        self.kind = kind

    def __reduce__(self) -> tuple[Any, ...]:
        pieces = [
            (data if isinstance(data, pickle.PickleBuffer) else pickle.PickleBuffer(data), bufs)
            for data, bufs in self.pieces
        ]
        return joined, (self.kind, *pieces)


def joined(kind: type, *pieces: Payload) -> list[Any] | tuple[Any, ...] | dict[Any, Any]:
    """What a `Joined` was made of: its pieces unpickled, one after the other."""
    if kind is dict:
        entries: dict[Any, Any] = {}
        for piece in pieces:
            entries.update(unpack(piece))
        return entries
    out: list[Any] = []
    for piece in pieces:
        out += unpack(piece)
    return tuple(out) if kind is tuple else out


def unpack(payload: Payload) -> Any:
    """The object in a `Payload`."""
    data, buffers = payload
    return pickle.loads(data, buffers=buffers)


class RemoteError(Exception):
    """Stands in for a worker exception whose own type could not be pickled back."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name


ExcRecord = tuple[bytes | None, str, str, str]


def encode_exception(exc: BaseException) -> ExcRecord:
    """(pickled exception or None, type name, message, traceback text) for the parent.
    Never raises: an exception whose `__str__` or pickling fails still travels, as its
    type name, whatever text can be had, and the traceback."""
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    message = _text(lambda: str(exc), f"<{name} object: str() failed>")
    tb = _text(lambda: "".join(traceback.format_exception(exc)), f"{name}: {message}\n")
    try:
        blob: bytes | None = dumps(exc, [])
        pickle.loads(blob or b"")  # types that pickle but do not unpickle are common
    except Exception:
        blob = None
    return blob, name, message, tb


def _text(make: Any, fallback: str) -> str:
    try:
        text = make()
    except Exception:
        return fallback
    return text if isinstance(text, str) else fallback


def decode_exception(record: ExcRecord) -> BaseException:
    """Rebuild the worker's exception, keeping its type where it unpickles (and can
    be shown: one whose `str()` fails stands in as a `RemoteError`)."""
    blob, name, message, _tb = record
    if blob is not None:
        try:
            exc = pickle.loads(blob)
            if isinstance(exc, BaseException):
                str(exc)
                return exc
        except Exception:
            pass
    return RemoteError(name, message)

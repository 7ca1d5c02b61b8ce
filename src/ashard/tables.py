"""Tables and results that never pass through the caller.

`table_sink()` makes a `TableSink` for ``out=``: `fn` writes rows, each shard's rows
become one file, committed only when the shard succeeds (`ashard._places`), and the
caller holds `TableRef`s. Under ``results="table"`` / ``"disk"`` a call's values are
written by the workers to a results store and the caller gets refs (`TableRef`,
`ResultRef`) and lazy sequences instead of values.

The parent decides what a call keeps: a file counts once its shard's result says it
was committed and its schema fits; when the call ends, whatever else the workers left
(temporary files, commits of attempts that were not accepted) is swept away.
"""

from __future__ import annotations

import numbers
import os
import re
import secrets
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Self, overload

from ashard._places import Place, file_name, temporary_path
from ashard._protocol import SinkRef
from ashard._serialize import loads
from ashard.errors import GatherTooLarge

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.dataset as pads

__all__ = ["LazyResults", "ResultRef", "TableRef", "TableSink", "table_sink"]

TableFormat = Literal["parquet", "arrow"]
_FORMATS = ("parquet", "arrow")
_PATTERN = {
    "parquet": re.compile(r"part-(\d+)\.parquet"),
    "arrow": re.compile(r"part-(\d+)\.arrow"),
    "pickle": re.compile(r"result-(\d+)\.pickle"),
}
_DATASET_FORMAT = {"parquet": "parquet", "arrow": "ipc"}


@dataclass(frozen=True, slots=True)
class TableRef:
    """One shard's committed partition: `path` in the sink's filesystem, its `rows`
    and `bytes` (the file's size); `read()` loads it as a `pyarrow.Table`."""

    __module__ = "ashard"

    shard_id: int
    path: str
    rows: int
    bytes: int
    _output: _Output = field(repr=False, compare=False)
    _memory: int = field(default=0, repr=False, compare=False)

    def read(self) -> pa.Table:
        """The partition as a Table."""
        with self._output.place.open_input(os.path.basename(self.path)) as f:
            if self._output.format == "parquet":
                import pyarrow.parquet as pq  # pyarrow on first use: its import is slow

                return pq.read_table(f)
            import pyarrow as pa  # pyarrow on first use: its import is slow

            return pa.ipc.open_file(f).read_all()


@dataclass(frozen=True, slots=True)
class ResultRef:
    """One shard's value on disk (``results="disk"``): `path`, `bytes`; `load()`."""

    __module__ = "ashard"

    shard_id: int
    path: str
    bytes: int
    _output: _Output = field(repr=False, compare=False)

    def load(self) -> Any:
        """The shard's value, unpickled."""

        with self._output.place.open_input(os.path.basename(self.path)) as f:
            return loads(f.read())


class _Output:
    """The parent's side of somewhere workers write during one call: a table sink in
    ``out=`` or a call's results store."""

    def __init__(self, kind: str, place: Place, fmt: str, schema: pa.Schema | None) -> None:
        self.kind = kind
        self.place = place
        self.format = fmt
        self._schema = schema
        self._schema_key: bytes | None = None
        if schema is not None:
            from ashard._tabular import schema_bytes  # pyarrow, on first use

            self._schema_key = schema_bytes(schema)
        self._given_schema = self._schema_key
        self._token = ""
        self._claim: tuple[str, str] | None = None  # the directory, while a call writes it
        self.closed = False

    @property
    def schema(self) -> pa.Schema | None:
        """Every partition's schema: the one given, else the first committed one's (read
        from its bytes on first use, not as partitions are accepted: pyarrow's import
        holds the GIL for a tenth of a second, which no thread may spend during a call)."""
        if self._schema is None and self._schema_key is not None:
            from ashard._tabular import schema_from_bytes  # pyarrow, on first use

            self._schema = schema_from_bytes(self._schema_key)
        return self._schema

    def spec(self) -> SinkRef:
        """What a worker needs to write here for the running call."""
        return SinkRef(self.kind, self.place, self.format, self._given_schema, self._token)

    def start(self, what: str, again: bool = False) -> None:
        """A call starts writing here (off the event loop: it may touch the filesystem);
        `again`: the call's `retry_failed`, writing beside what its first run kept. The
        directory is the call's alone until `stop` (`Place.claim`), and must hold nothing
        yet (it may have been filled since the output was made: by another sink's call)
        or, `again`, nothing but this output's own files. `what` names it in errors."""
        self._claim = self.place.claim(what)
        try:
            if again:
                self.place.check_own(what, _PATTERN[self.format], self._kept_ids())
            else:
                self.place.check_fresh(what)
            self._token = secrets.token_hex(4)
            self.place.create()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """The call that started writing here is over, or never ran: others may write
        the directory (if it is still empty)."""
        if self._claim is not None:
            Place.unclaim(self._claim)
            self._claim = None

    def check(self, schema: bytes | None, where: str) -> Exception | None:
        """Why a committed file with `schema` cannot be kept, or None."""
        if schema is None or schema == self._schema_key or self._schema_key is None:
            return None
        from ashard._tabular import schema_from_bytes, schema_mismatch  # pyarrow, on first use

        return schema_mismatch(
            schema_from_bytes(self._schema_key), schema_from_bytes(schema), where
        )

    def accept(
        self, shard_id: int, rows: int, size: int, memory: int, schema: bytes | None
    ) -> TableRef | ResultRef:
        """Keep shard `shard_id`'s committed file (checked with `check`)."""
        if self._schema_key is None and schema is not None:
            self._schema_key = schema
        path = self.place.path_of(file_name(self.format, shard_id))
        ref: TableRef | ResultRef
        if rows < 0:
            ref = ResultRef(shard_id, path, size, self)
        else:
            ref = TableRef(shard_id, path, rows, size, self, memory)
        self._keep(ref)
        return ref

    def _keep(self, ref: TableRef | ResultRef) -> None:
        raise NotImplementedError

    def _kept_ids(self) -> Any:
        raise NotImplementedError

    def sweep(self) -> None:
        """The call is over: remove every file no accepted shard owns."""
        self.place.sweep(_PATTERN[self.format], self._kept_ids())

    def dataset_of(self, refs: Sequence[TableRef]) -> pads.Dataset:
        import pyarrow as pa  # pyarrow on first use: its import is slow
        import pyarrow.dataset as pads  # pyarrow on first use: its import is slow

        schema = self.schema if self.schema is not None else pa.schema([])
        return pads.dataset(
            [ref.path for ref in refs],
            schema=schema,
            format=_DATASET_FORMAT[self.format],
            filesystem=self.place.fs,
        )


class TableSink(_Output):
    """Where the workers of one call write tables (see `ashard.table_sink`). Give it
    in ``out={"rows": sink}``; `fn(shard, rows)` calls ``rows.write(data)``. After
    the call: `refs`, `dataset()`, `read()`; `close()` (or leaving ``with``) removes a
    temporary directory. A sink collects one call's output."""

    __module__ = "ashard"

    def __init__(
        self, place: Place, fmt: str, schema: pa.Schema | None, *, temporary: bool
    ) -> None:
        super().__init__("sink", place, fmt, schema)
        self._refs: dict[int, TableRef] = {}
        self._state: Literal["new", "busy", "used"] = "new"
        self._finalizer = (
            weakref.finalize(self, place.remove_tree, os.getpid()) if temporary else None
        )

    @property
    def path(self) -> str:
        """The directory, in the sink's filesystem."""
        return self.place.root

    @property
    def filesystem(self) -> Any:
        """The `pyarrow.fs.FileSystem` the files are in (None: this machine's)."""
        return self.place.fs

    @property
    def refs(self) -> list[TableRef]:
        """The committed partitions, in shard order, one per shard that wrote."""
        return [self._refs[k] for k in sorted(self._refs)]

    def dataset(self) -> pads.Dataset:
        """A lazy `pyarrow.dataset.Dataset` over the committed partitions."""
        self._check_open()
        return self.dataset_of(self.refs)

    def read(self) -> pa.Table:
        """Every committed partition as one Table, in shard order."""
        return self.dataset().to_table()

    def close(self) -> None:
        """Done with the sink; a temporary directory (``path=None``) is removed: now, or
        once the call writing into it is over (it writes on, and its shards commit)."""
        self.closed = True
        if self._finalizer is not None and self._state != "busy":
            self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> Any:
        raise TypeError("a TableSink goes to workers through out=, not pickled in another object")

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._refs)} partitions"
        return f"<ashard.TableSink {self.format} at {self.place.describe()!r}, {state}>"

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("this TableSink is closed")

    def check_usable(self, name: str, again: bool = False) -> None:
        """Refuse a sink that cannot take a new call's output (`again`: more of the
        output of the call it holds, from `retry_failed`)."""
        if self.closed:
            raise ValueError(f"out[{name!r}] is a closed TableSink")
        if self._state == "busy":
            raise ValueError(f"out[{name!r}]: this TableSink is in use by another call")
        if self._state == "used" and not again:
            raise ValueError(
                f"out[{name!r}]: this TableSink already holds the output of a call "
                "(a sink collects one call's output: make a new one with ashard.table_sink())"
            )

    def claim(self, name: str, again: bool = False) -> None:
        self.check_usable(name, again)
        self._state = "busy"

    def release(self) -> None:
        """The call that claimed the sink is over: its partitions are the sink's."""
        self._state = "used"
        if self.closed:
            self.close()  # closed during the call: what was put off

    def unclaim(self, again: bool = False) -> None:
        """The call that claimed the sink never ran."""
        self._state = "used" if again else "new"
        if self.closed:
            self.close()

    def _keep(self, ref: TableRef | ResultRef) -> None:
        assert isinstance(ref, TableRef)
        self._refs[ref.shard_id] = ref

    def _kept_ids(self) -> Any:
        return self._refs


def table_sink(
    path: str | os.PathLike[str] | None = None,
    *,
    format: TableFormat = "parquet",
    schema: pa.Schema | None = None,
    filesystem: Any = None,
) -> TableSink:
    """A sink for ``out=``: each shard's rows become one file, ``part-{id:06d}.parquet``
    (or ``.arrow``: Arrow IPC file format) under `path` — a local directory, a URI
    pyarrow.fs resolves (``"s3://bucket/prefix"``), or a path inside `filesystem`.
    `path=None`: a temporary directory, removed by `close()`. A directory that holds
    anything is refused here (nothing is ever overwritten: this looks at `path`, so
    from async code on a remote filesystem build the sink in a thread); a missing one
    is created when a call starts writing.
    `schema`: every write is checked against it and safely cast; without it, the
    first committed partition's schema is the sink's."""
    if format not in _FORMATS:
        raise ValueError(f"format must be 'parquet' or 'arrow', got {format!r}")
    checked_schema = None
    if schema is not None:  # (pyarrow, imported by whoever made the schema; not before)
        from ashard._tabular import read_schema_arg

        checked_schema = read_schema_arg(schema)
    if path is None:
        if filesystem is not None:
            raise ValueError("filesystem= needs a path inside it: table_sink(path, filesystem=...)")
        place = Place(temporary_path("sink", make=False))  # made when a call starts writing
        return TableSink(place, format, checked_schema, temporary=True)
    place = Place.resolve(path, filesystem, "table_sink path")
    place.check_fresh("table_sink path")
    return TableSink(place, format, checked_schema, temporary=False)


class ResultStore(_Output):
    """Where one call's values go under ``results="table"`` (Arrow IPC files,
    ``part-{id:06d}.arrow``) / ``"disk"`` (pickles, ``result-{id:06d}.pickle``): a directory
    given in `results_path` (kept) or a temporary one (removed by `close()`, when the
    result or stream holding it is closed or collected, or at interpreter exit)."""

    def __init__(self, mode: str, place: Place | None) -> None:
        self.temporary = place is None
        # Arrow IPC, not parquet: a call's own store is written once and read back
        # whole, and an IPC file costs a quarter of a parquet file to write (no encoding)
        # and maps without decoding; a sink is where a format to keep is chosen.
        fmt = "arrow" if mode == "table" else "pickle"
        super().__init__(mode, place or Place(""), fmt, None)
        self._committed = bytearray()
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._busy = False

    def start(self, what: str, again: bool = False) -> None:
        if again:  # `retry_failed`: the directory holds the first run's files
            if self.closed:
                raise ValueError(
                    "this result is closed: its files were removed, so retry_failed has "
                    "no stored results to keep"
                )
            if self._busy:
                raise ValueError("another retry_failed of this result is running")
        elif self.temporary:
            self.place = Place(temporary_path("results", make=True))
            self._finalizer = weakref.finalize(self, self.place.remove_tree, os.getpid())
        super().start(what, again)
        self._busy = True

    def _keep(self, ref: TableRef | ResultRef) -> None:
        shard_id = ref.shard_id
        if shard_id >= len(self._committed):
            self._committed.extend(bytes(shard_id + 1 - len(self._committed)))
        self._committed[shard_id] = 1

    def _kept_ids(self) -> Any:
        return _Flags(self._committed)

    def release(self) -> None:
        """The call writing here is over."""
        self._busy = False

    def close(self) -> None:
        self.closed = True
        if self._finalizer is not None:
            self._finalizer()

    def gather(self, refs: Sequence[TableRef | None], max_bytes: int) -> pa.Table:
        """`ShardResult.table()`: the partitions as one Table, if they fit `max_bytes`."""
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, numbers.Integral):
            raise TypeError(f"max_bytes must be a positive int, got {type(max_bytes).__name__}")
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes}")
        kept = [ref for ref in refs if ref is not None]
        size = sum(ref._memory for ref in kept)
        if size > max_bytes:
            raise GatherTooLarge(
                f"the table would take {size:,} bytes ({size / 2**20:.1f} MiB) in memory, "
                f"above max_bytes={max_bytes:,} ({max_bytes / 2**20:.1f} MiB): read it piece "
                "by piece with res.dataset(), or raise max_bytes",
                size,
                max_bytes,
            )
        return self.dataset_of(kept).to_table()


class _Flags:
    """Membership in a bytearray of flags."""

    def __init__(self, flags: bytearray) -> None:
        self._flags = flags

    def __contains__(self, i: object) -> bool:
        return isinstance(i, int) and 0 <= i < len(self._flags) and bool(self._flags[i])


class LazyResults(Sequence[Any]):
    """A call's values under ``results="table"`` / ``"disk"``: item i is loaded from
    its file when asked for (None where the shard failed or returned None under
    ``"table"``); the parent holds only the refs."""

    __module__ = "ashard"

    def __init__(self, refs: Sequence[TableRef | ResultRef | None]) -> None:
        self._refs = refs

    def __len__(self) -> int:
        return len(self._refs)

    @overload
    def __getitem__(self, i: int) -> Any: ...
    @overload
    def __getitem__(self, i: slice) -> list[Any]: ...
    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [_load(ref) for ref in self._refs[i]]
        return _load(self._refs[i])

    def __iter__(self) -> Iterator[Any]:
        for ref in self._refs:
            yield _load(ref)

    def __repr__(self) -> str:
        return f"<ashard.LazyResults of {len(self._refs)} shards, loaded on access>"


def _load(ref: TableRef | ResultRef | None) -> Any:
    if ref is None:
        return None
    return ref.read() if isinstance(ref, TableRef) else ref.load()

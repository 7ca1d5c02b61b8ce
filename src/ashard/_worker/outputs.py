"""The worker's side of table sinks and results stores: what `fn` writes rows
through, and what writes a shard's returned value to disk.

Each output follows the running shard: `begin` when it starts; when `fn` returned,
`finish` closes the shard's file (still under its temporary name) and the run loop
commits every output's file at once (`ashard._places.commit_all`); when `fn` failed,
timed out or was interrupted, `abort` discards what it wrote. So a file becomes
visible only for a shard that succeeded, and the parent learns of it in the shard's
result (`commits`), which is where it decides what the call keeps.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Self

from ashard._fds import StdioGuard
from ashard._places import Pending, Place, file_name, write_bytes
from ashard._protocol import SinkRef
from ashard._serialize import dumps

__all__ = ["Finished", "ResultWriter", "TableWriter"]

Finished = tuple[Pending, int, int, "bytes | None"]
"""A shard's closed, uncommitted file: the file, rows (-1: a pickle), memory, schema."""

guard: StdioGuard | None = None
"""The worker's standard descriptors: checked before a file is opened, so that a file
never takes the number of a descriptor `fn` closed."""


class _Output:
    """An output that follows the running shard."""

    def __init__(self, name: str, ref: SinkRef) -> None:
        self.name = name
        self.ref = ref
        self.place: Place = ref.place
        self._pos: int | None = None
        self._attempt = 1

    def begin(self, pos: int, attempt: int) -> None:
        self._pos = pos
        self._attempt = attempt

    def fork(self) -> Self:
        """A writer of its own for one shard, when several shards of a worker run at once
        (an ``async def`` fn with ``shard_concurrency``): they never share a file."""
        twin = object.__new__(type(self))  # not `copy.copy`: a writer refuses to be pickled
        twin.__dict__.update(self.__dict__)
        twin._pos = None
        twin._reset()  # its own file and rows (the original's, if any, stay the original's)
        return twin

    def _reset(self) -> None:
        """Forget the running shard's file (without closing it)."""

    def abort(self) -> None:
        self._pos = None

    def _pending(self) -> Pending:
        assert self._pos is not None
        if guard is not None:
            guard.check()
        name = file_name(self.ref.format, self._pos)
        return self.place.pending(name, f"{self.ref.token}-{os.getpid()}-{self._attempt}")


class TableWriter(_Output):
    """The object `fn` receives for a table sink in ``out=``: ``rows.write(data)``
    appends a pyarrow Table or RecordBatch, a pandas DataFrame or a mapping of columns
    to the running shard's partition, any number of times."""

    def __init__(self, name: str, ref: SinkRef) -> None:
        super().__init__(name, ref)
        self._sink_schema: Any = None
        if ref.schema is not None:
            from ashard._tabular import schema_from_bytes  # on demand: it imports pyarrow

            self._sink_schema = schema_from_bytes(ref.schema)
        self._reset()

    def _reset(self) -> None:
        self._schema = self._sink_schema
        self._file: Pending | None = None
        self._writer: Any = None
        self._rows = 0
        self._memory = 0

    def begin(self, pos: int, attempt: int) -> None:
        super().begin(pos, attempt)
        self._reset()

    def write(self, data: Any) -> None:
        """Append `data` to this shard's partition (checked against, and safely cast
        to, the sink's schema; without one, the shard's first write sets it)."""
        if self._pos is None:
            raise RuntimeError(
                f"{self.name}.write() was called while no shard of this sink runs (after fn "
                "returned, or from a thread that outlived it)"
            )
        from ashard._tabular import as_table, conform  # on demand: it imports pyarrow

        table = as_table(data, f"{self.name}.write()")
        if self._schema is not None:
            table = conform(table, self._schema, f"the table written to {self.name!r}")
        if self._writer is None:
            self._open(table.schema)
        self._writer.write_table(table)
        self._rows += table.num_rows
        self._memory += int(table.nbytes)

    def _open(self, schema: Any) -> None:
        self._schema = schema
        self._file = self._pending()
        try:
            self._writer = _open_writer(self.ref.format, self._file.target, schema)
        except BaseException:
            self._file.discard()
            self._file = None
            raise

    def finish(self, value: Any) -> Finished | None:
        """Close this shard's file (None if it wrote nothing)."""
        self._pos = None
        if self._writer is None or self._file is None:
            return None
        from ashard._tabular import schema_bytes  # on demand: it imports pyarrow

        writer, self._writer = self._writer, None
        writer.close()
        return self._file, self._rows, self._memory, schema_bytes(self._schema)

    def abort(self) -> None:
        """Drop what this shard wrote."""
        self._pos = None
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        if self._file is not None:
            self._file.discard()
            self._file = None

    def __reduce__(self) -> Any:
        raise TypeError(f"{self.name} (a table sink's writer) can only be used inside fn")

    def __repr__(self) -> str:
        return f"<ashard table sink writer {self.name!r} ({self.ref.format})>"


class ResultWriter(_Output):
    """Writes what `fn` returned: pickled (``results="disk"``) or as a table
    (``results="table"``: None writes nothing)."""

    def finish(self, value: Any) -> Finished | None:
        if self.ref.format == "pickle":
            data = dumps(value, None)
            return write_bytes(self.place, self._name(), self._token(), data), -1, len(data), None
        if value is None:
            return None
        from ashard._tabular import as_table, schema_bytes  # on demand: pyarrow (not for pickle)

        table = as_table(value, 'the value fn returned under results="table"')
        pending = self._pending()
        try:
            writer = _open_writer(self.ref.format, pending.target, table.schema)
            writer.write_table(table)
            writer.close()
        except BaseException:
            pending.discard()
            raise
        return pending, table.num_rows, int(table.nbytes), schema_bytes(table.schema)

    def _name(self) -> str:
        assert self._pos is not None
        return file_name(self.ref.format, self._pos)

    def _token(self) -> str:
        if guard is not None:
            guard.check()
        return f"{self.ref.token}-{os.getpid()}-{self._attempt}"


def _open_writer(fmt: str, target: Any, schema: Any) -> Any:
    if fmt == "parquet":
        import pyarrow.parquet as pq  # on demand: only parquet sinks need it

        return pq.ParquetWriter(target, schema)
    return _IpcFileWriter(target, schema)


class _IpcFileWriter:
    """An Arrow IPC file writer that closes the file it opened."""

    def __init__(self, target: Any, schema: Any) -> None:
        import pyarrow as pa  # on demand: only tables need it

        self._stream = pa.OSFile(target, "wb") if isinstance(target, str) else None
        try:
            self._writer = pa.ipc.new_file(self._stream or target, schema)
        except BaseException:
            if self._stream is not None:
                self._stream.close()
            raise

    def write_table(self, table: Any) -> None:
        self._writer.write_table(table)

    def close(self) -> None:
        try:
            self._writer.close()
        finally:
            if self._stream is not None:
                self._stream.close()

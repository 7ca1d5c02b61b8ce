"""Table-like data as pyarrow Tables, and how schemas are compared and conformed.

Used by workers (``rows.write(data)``, ``results="table"``) and by the parent (the
schema of a committed partition against the sink's). Columns are matched by name;
a cast is only ever a safe one (int32 -> int64 yes, 1.5 -> int64 no). Imported only
where tables are written or read: it imports pyarrow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from ashard.errors import SchemaMismatch

__all__ = ["as_table", "conform", "schema_bytes", "schema_from_bytes", "schema_mismatch"]

ACCEPTED = (
    "a pyarrow Table or RecordBatch, a pandas DataFrame or a mapping of column names to arrays"
)


def as_table(data: object, what: str = "write()") -> pa.Table:
    """`data` as a Table, or a `TypeError` naming its type and what is accepted."""
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if _is_dataframe(data):
        return pa.Table.from_pandas(data)
    if isinstance(data, Mapping):
        try:
            return pa.table(dict(data))
        except (TypeError, ValueError, pa.ArrowException) as exc:
            raise TypeError(f"{what} got a mapping that is not a table's columns: {exc}") from exc
    raise TypeError(f"{what} takes {ACCEPTED}; got {type(data).__module__}.{type(data).__name__}")


def _is_dataframe(data: object) -> bool:
    cls = type(data)
    return cls.__name__ == "DataFrame" and cls.__module__.startswith("pandas")


def conform(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """`table` with `schema`'s columns, in its order, safely cast; `SchemaMismatch`
    naming every field that differs if that cannot be done."""
    got = table.schema
    if got.names == schema.names and got.remove_metadata().equals(schema.remove_metadata()):
        return table
    problems, names = _differences(schema, got, cast=True)
    if not problems:
        try:
            return table.select(schema.names).cast(schema, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            problems, names = _cast_failures(table, schema, exc)
    raise SchemaMismatch(f"{where} does not fit the schema: {'; '.join(problems)}", names)


def schema_mismatch(expected: pa.Schema, got: pa.Schema, where: str) -> SchemaMismatch | None:
    """None if `got` has `expected`'s fields and types (by name, in any order), else the
    error naming the differences (no casts: both are already written)."""
    problems, names = _differences(expected, got, cast=False)
    if not problems:
        return None
    return SchemaMismatch(f"{where} does not fit the schema: {'; '.join(problems)}", names)


def _differences(expected: pa.Schema, got: pa.Schema, *, cast: bool) -> tuple[list[str], list[str]]:
    want = {f.name: f.type for f in expected}
    have = {f.name: f.type for f in got}
    problems: list[str] = []
    names: list[str] = []
    for name, kind in want.items():
        if name not in have:
            problems.append(f"missing field {name!r} ({kind})")
            names.append(name)
        elif have[name] != kind and not (cast and _castable(have[name], kind)):
            problems.append(f"field {name!r} is {have[name]}, expected {kind}")
            names.append(name)
    for name, kind in have.items():
        if name not in want:
            problems.append(f"extra field {name!r} ({kind})")
            names.append(name)
    return problems, names


def _castable(source: pa.DataType, target: pa.DataType) -> bool:
    """Could values of `source` be cast to `target` at all (safety is checked per value)?"""
    try:
        pa.array([], source).cast(target, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return False
    return True


def _cast_failures(
    table: pa.Table, schema: pa.Schema, exc: Exception
) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    names: list[str] = []
    for field in schema:
        column = table.column(field.name)
        try:
            column.cast(field.type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            problems.append(
                f"field {field.name!r} ({column.type}) cannot be cast safely to {field.type}: {err}"
            )
            names.append(field.name)
    return (problems, names) if problems else ([str(exc)], [])


def schema_bytes(schema: pa.Schema) -> bytes:
    """The schema without its metadata (pandas puts each frame's index there), as
    bytes: equal bytes, equal schemas."""
    return bytes(schema.remove_metadata().serialize())


def schema_from_bytes(data: bytes) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(data))


def read_schema_arg(schema: object) -> pa.Schema | None:
    """The `schema=` argument of `table_sink`: a `pyarrow.Schema`, or None."""
    if schema is None or isinstance(schema, pa.Schema):
        return schema
    raise TypeError(f"schema must be a pyarrow.Schema or None, got {type(schema).__name__}")


def nbytes(table: Any) -> int:
    return int(table.nbytes)

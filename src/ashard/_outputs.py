"""A call's outputs: the table sinks among its `out=` values and its results store
(``results="table"`` / ``"disk"``).

Workers write their files beside each output and commit them with their report; the
parent keeps a commit only for a position it accepts, and only if the file's schema
fits the output (else that position fails, error kind `LOCAL`). Around the call:
`open` claims the sinks and makes the directories before anything runs, `close` sweeps
what no accepted position owns and lets the sinks go. Both may touch a remote
filesystem: callers run them in a thread.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ashard._protocol import Commit, ProtocolViolation

if TYPE_CHECKING:
    from ashard.tables import ResultStore, TableSink

__all__ = ["LOCAL", "Outputs"]

LOCAL = -2
"""Error kind of a position the parent fails: its output cannot be kept."""


class Outputs:
    """The sinks (by name) and the results store (None if values ride back) of a call."""

    def __init__(self, out: Mapping[str, Any], store: ResultStore | None) -> None:
        self.store = store
        self.again = False  # `retry_failed`: the outputs already hold the call's first run
        self._sinks = _sinks_in(out)
        self._by_name: dict[str, TableSink | ResultStore] = dict(self._sinks)
        if store is not None:
            self._by_name[""] = store

    def __bool__(self) -> bool:
        """Has the call any output to open and close?"""
        return bool(self._by_name)

    def open(self) -> None:
        """Claim the table sinks and make the results directory (before anything runs)."""
        claimed: list[TableSink] = []
        started: list[TableSink | ResultStore] = []
        try:
            for name, sink in self._sinks.items():
                sink.claim(name, again=self.again)
                claimed.append(sink)
            for name, output in self._by_name.items():
                what = f"out[{name!r}]: table_sink path" if name else "results_path"
                output.start(what, again=self.again)
                started.append(output)
        except BaseException:  # nothing ran: the sinks are as they were
            for output in started:
                output.stop()
            for sink in claimed:
                sink.unclaim(again=self.again)
            if self.store is not None and self.store.temporary and not self.again:
                self.store.close()
            raise

    def close(self) -> None:
        """The call is over (nothing of it runs): remove what workers left that no
        accepted position owns, and let the sinks go."""
        try:
            for output in self._by_name.values():
                output.sweep()
        finally:
            for output in self._by_name.values():
                output.stop()
            for sink in self._sinks.values():
                sink.release()
            if self.store is not None:
                self.store.release()

    def keep(
        self, base: int, values: list[Any], errors: list[Any], commits: list[Commit]
    ) -> tuple[list[Any], list[Any]]:
        """Accept the files positions ``base + k`` committed, if their schemas fit (else
        they fail, `LOCAL`); the results store's refs take the place of the values."""
        failed = {e[0] for e in errors}
        by_k: dict[int, list[Commit]] = {}
        for entry in commits:
            by_k.setdefault(entry[0], []).append(entry)
        values = list(values)
        errors = list(errors)
        for k, entries in by_k.items():
            if k in failed:
                continue  # the shard failed after all: its files are swept at the end
            outputs = [self._by_name.get(entry[1]) for entry in entries]
            problem: Exception | None = None
            for output, entry in zip(outputs, entries, strict=True):
                if output is None:
                    raise ProtocolViolation("a commit to an output the call does not have")
                where = f"the table shard {base + k} wrote" + (
                    f" to {entry[1]!r}" if entry[1] else ""
                )
                problem = problem or output.check(entry[5], where)
            if problem is not None:
                errors.append((k, LOCAL, problem))
                continue
            for output, entry in zip(outputs, entries, strict=True):
                assert output is not None
                ref = output.accept(base + k, entry[2], entry[3], entry[4], entry[5])
                if output is self.store:
                    values[k] = ref
        errors.sort(key=lambda e: e[0])
        return values, errors


def _sinks_in(out: Mapping[str, Any]) -> dict[str, TableSink]:
    """The table sinks among a call's outputs: none unless `ashard.tables` is loaded
    (by the caller that made them; nothing is imported here, on the event loop)."""
    tables = sys.modules.get("ashard.tables")
    if not out or tables is None:
        return {}
    return {name: v for name, v in out.items() if isinstance(v, tables.TableSink)}

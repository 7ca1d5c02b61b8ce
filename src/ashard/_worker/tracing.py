"""Spans in a worker (DESIGN 2.6): with ``Pool(otel_setup="pkg.module:function")`` the
worker runs that function once, before READY, to install its own OpenTelemetry tracer
provider, then makes an `ashard.run` span around every chunk that came with the
caller's traceparent (a child of the caller's attempt span), and flushes its provider
before it exits - at the end of its channel, as when it is recycled or stopped. Without
`otel_setup` nothing here runs and opentelemetry is never imported in a worker.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

__all__ = ["WorkerTracing"]

FLUSH_MILLIS = 2000
"""How long a worker waits for its spans to be exported before it exits."""


class WorkerTracing:
    """The worker's tracer, after its `otel_setup` ran."""

    def __init__(self, setup: str) -> None:
        module, _, function = setup.partition(":")
        getattr(importlib.import_module(module), function)()
        from opentelemetry import trace  # the setup installed it: it is there

        self._trace = trace
        self._tracer = trace.get_tracer("ashard.worker")

    @contextlib.contextmanager
    def run(self, traceparent: str, first: int, count: int) -> Iterator[None]:
        """An `ashard.run` span for the chunk at ``first .. first+count-1``, a child of the
        caller's attempt span `traceparent`."""
        parent = self._parent(traceparent)
        attributes: dict[str, Any] = (
            {"ashard.shard.id": first}
            if count == 1
            else {"ashard.shard.first": first, "ashard.shard.count": count}
        )
        with self._tracer.start_as_current_span("ashard.run", context=parent,
                                                attributes=attributes):  # fmt: skip
            yield

    def _parent(self, traceparent: str) -> Any:
        trace = self._trace
        try:
            _, trace_id, span_id, flags = traceparent.split("-")
            ctx = trace.SpanContext(
                int(trace_id, 16), int(span_id, 16), is_remote=True,
                trace_flags=trace.TraceFlags(int(flags, 16)),
            )  # fmt: skip
        except ValueError:
            return None
        return trace.set_span_in_context(trace.NonRecordingSpan(ctx))

    def flush(self) -> None:
        """Export what is pending (the worker is about to exit)."""
        provider = self._trace.get_tracer_provider()
        force_flush = getattr(provider, "force_flush", None)
        if force_flush is not None:
            with contextlib.suppress(Exception):
                force_flush(FLUSH_MILLIS)

"""Tracing with OpenTelemetry, in the caller (DESIGN 2.6).

When the application has installed a tracer provider (it imported `opentelemetry.trace`
and set one that records), each call makes a span named for it (`ashard.shard_map`,
`ashard.map`, `ashard.call`, ...) and each attempt a child span `ashard.attempt`, made
here in the caller: a worker killed mid-shard still leaves its attempt's span, with
outcome "crash". The attempt's W3C traceparent goes to the worker with its chunk, where
``Pool(otel_setup=...)`` makes an `ashard.run` span under it (`ashard._worker.tracing`).

Without a recording provider nothing happens: ashard never imports opentelemetry itself
(it looks for the module the application loaded), and a call costs one dictionary
lookup. Spans are ended here, on the caller's loop, as reports come in.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["OUTCOME_RANK", "CallTrace", "call_trace"]

OUTCOME_RANK = {"ok": 0, "skipped": 1, "error": 2, "timeout": 3, "crash": 4, "cancelled": 5}
"""A chunk's outcome is the worst of its shards' (`ashard.outcome`)."""


def call_trace(name: str, **attributes: Any) -> CallTrace | None:
    """The trace of one call named `name` ("shard_map", "call", ...), or None when the
    application has no recording tracer provider (the usual case: free)."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    tracer = provider.get_tracer("ashard")
    span = tracer.start_span(f"ashard.{name}", attributes=attributes or None)
    if not span.is_recording():  # sampled out: its attempts would be too
        span.end()
        return None
    return CallTrace(trace, tracer, span)


class CallTrace:
    """A call's span and its open attempt spans, by what they are for (a chunk, or a
    call's attempt number)."""

    def __init__(self, trace: Any, tracer: Any, span: Any) -> None:
        self._trace = trace
        self._tracer = tracer
        self.span = span
        self._context = trace.set_span_in_context(span)
        self._open: dict[object, list[Any]] = {}  # key -> [span, outcome]

    def attempt(
        self, key: object, first: int, count: int, attempt: int, noun: str = "shard"
    ) -> str:
        """Open the span of one attempt (`key`: its chunk) at positions ``first ..
        first+count-1``; its W3C traceparent, for the worker."""
        if count == 1:
            attributes: dict[str, Any] = {f"ashard.{noun}.id": first}
        else:
            attributes = {f"ashard.{noun}.first": first, f"ashard.{noun}.count": count}
        attributes["ashard.attempt"] = attempt
        span = self._tracer.start_span("ashard.attempt", context=self._context,
                                       attributes=attributes)  # fmt: skip
        self._open[key] = [span, "ok"]
        ctx = span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    def call_attempt(self, key: object, attempt: int) -> None:
        """Open the span of attempt `attempt` of a `call` (`key`: its own)."""
        span = self._tracer.start_span("ashard.attempt", context=self._context,
                                       attributes={"ashard.attempt": attempt})  # fmt: skip
        self._open[key] = [span, "ok"]

    def saw(self, key: object, outcome: str) -> None:
        """Something of attempt `key` ended so (the worst outcome stays)."""
        entry = self._open.get(key)
        if entry is not None and OUTCOME_RANK[outcome] > OUTCOME_RANK[entry[1]]:
            entry[1] = outcome

    def ended(self, key: object, pid: int | None, outcome: str | None = None) -> None:
        """Attempt `key` is over (on worker `pid`): its span ends with its outcome."""
        if outcome is not None:
            self.saw(key, outcome)
        entry = self._open.pop(key, None)
        if entry is None:
            return
        span, seen = entry
        if pid is not None:
            span.set_attribute("ashard.worker.pid", pid)
        span.set_attribute("ashard.outcome", seen)
        if seen in ("error", "timeout", "crash"):
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, seen))
        span.end()

    def close(self, error: BaseException | None = None, failures: int = 0) -> None:
        """The call is over: attempts still open were cancelled; the call's span ends
        (with `error`, if it raised, and how many of its shards failed)."""
        for key in list(self._open):
            self.ended(key, None, "cancelled")
        if failures:
            self.span.set_attribute("ashard.failures", failures)
            if error is None:
                message = f"{failures} failed"
                self.span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, message))
        if error is not None:
            self.span.record_exception(error)
            self.span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, repr(error)))
        self.span.end()

"""Tracing with OpenTelemetry (DESIGN 2.6): a span per call and per attempt in the
caller, W3C context to the workers, `ashard.run` spans there with `otel_setup`, one trace
id across a worker crash, and nothing at all without a recording provider. A real
SDK provider with an in-memory exporter in the caller; the workers write theirs to a
file. Under asyncio and trio."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ashard
import workloads

trace = pytest.importorskip("opentelemetry.trace")  # the test extra installs the SDK
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF  # noqa: E402
from opentelemetry.util._once import Once  # noqa: E402

pytestmark = pytest.mark.anyio


def _install(provider: Any) -> None:
    """Make `provider` the global one (opentelemetry allows one per process: the tests
    reset it, as opentelemetry's own tests do)."""
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    if provider is not None:
        trace.set_tracer_provider(provider)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _install(provider)
    yield exporter
    _install(None)


def _named(exporter: InMemorySpanExporter, name: str) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def _worker_spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_a_call_has_a_span_and_each_attempt_a_child(
    spans: InMemorySpanExporter,
) -> None:
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(ashard.shards(4, block_size=1), workloads.shard_sum,
                                   chunk_size=1)  # fmt: skip
    (call,) = _named(spans, "ashard.shard_map")
    attempts = _named(spans, "ashard.attempt")
    assert sorted(a.attributes["ashard.shard.id"] for a in attempts) == [0, 1, 2, 3]
    assert {a.attributes["ashard.outcome"] for a in attempts} == {"ok"}
    assert {a.attributes["ashard.worker.pid"] for a in attempts} <= set(res.diagnostics.workers)
    assert all(a.parent.span_id == call.context.span_id for a in attempts)
    assert {s.context.trace_id for s in [call, *attempts]} == {call.context.trace_id}
    assert call.attributes["ashard.shards"] == 4


async def test_one_trace_across_a_crash_with_worker_spans_under_their_attempts(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    lines = tmp_path / "spans.jsonl"
    async with ashard.Pool(
        2, otel_setup="workloads:otel_setup", env={"ASHARD_TEST_SPANS": str(lines)}
    ) as pool:
        res = await pool.shard_map(
            ashard.shards(4, block_size=1), workloads.die_first_attempt, chunk_size=1
        )
    assert res.results == [0, 10, 20, 30] and res.diagnostics.crashes == 1
    (call,) = _named(spans, "ashard.shard_map")
    attempts = _named(spans, "ashard.attempt")
    by_shard = sorted(
        (a.attributes["ashard.shard.id"], a.attributes["ashard.attempt"],
         a.attributes["ashard.outcome"]) for a in attempts
    )  # fmt: skip
    # every shard ends ok; shard 2's first run crashed; a chunk queued behind it on the
    # same worker never started ("cancelled") and was sent again
    assert [row for row in by_shard if row[2] not in ("ok", "cancelled")] == [(2, 1, "crash")]
    assert {row[0] for row in by_shard if row[2] == "ok"} == {0, 1, 2, 3}
    assert len([row for row in by_shard if row[2] == "ok"]) == 4
    crashed = next(a for a in attempts if a.attributes["ashard.outcome"] == "crash")
    assert crashed.attributes["ashard.worker.pid"] in res.diagnostics.workers
    runs = [s for s in _worker_spans(lines) if s["name"] == "ashard.run"]  # flushed at exit
    ok_attempts = {a.context.span_id: a for a in attempts if a.attributes["ashard.outcome"] == "ok"}
    assert sorted(r["parent_id"] for r in runs) == sorted(ok_attempts)  # each under its own
    for run in runs:
        assert (
            run["attributes"]["ashard.shard.id"]
            == (ok_attempts[run["parent_id"]].attributes["ashard.shard.id"])
        )
    trace_ids = {s.context.trace_id for s in [call, *attempts]} | {r["trace_id"] for r in runs}
    assert trace_ids == {call.context.trace_id}


async def test_chunks_of_tiny_items_errors_skips_and_timeouts_have_outcomes(
    spans: InMemorySpanExporter,
) -> None:
    await ashard.map(workloads.square, range(100), chunk_size=50, workers=2)
    tiny = _named(spans, "ashard.attempt")
    assert sorted((a.attributes["ashard.item.first"], a.attributes["ashard.item.count"])
                  for a in tiny) == [(0, 50), (50, 50)]  # fmt: skip
    spans.clear()
    plan = {0: ("ValueError", 0), 1: ("KeyError", 0), 2: ("hang", 0)}
    async with ashard.Pool(2) as pool:
        await pool.shard_map(
            ashard.shards(4, block_size=1), workloads.raise_as_planned, borrow={"plan": plan},
            chunk_size=1, timeout=0.5, max_retries=0, errors="collect",
            on_error={KeyError: "skip"},
        )  # fmt: skip
    outcomes = {a.attributes["ashard.shard.id"]: a.attributes["ashard.outcome"]
                for a in _named(spans, "ashard.attempt")}  # fmt: skip
    assert outcomes == {0: "error", 1: "skipped", 2: "timeout", 3: "ok"}
    (call,) = _named(spans, "ashard.shard_map")
    assert call.attributes["ashard.failures"] == 2 and not call.status.is_ok


async def test_a_call_span_with_its_attempts(spans: InMemorySpanExporter) -> None:
    async with ashard.Pool(1) as pool:
        assert await pool.call(divmod, 7, 2) == (3, 1)
        with pytest.raises(ZeroDivisionError):
            await pool.call(divmod, 1, 0)
    calls = _named(spans, "ashard.call")
    attempts = _named(spans, "ashard.attempt")
    assert len(calls) == 2 and len(attempts) == 2
    assert sorted(a.attributes["ashard.outcome"] for a in attempts) == ["error", "ok"]
    assert {a.parent.span_id for a in attempts} == {c.context.span_id for c in calls}


async def test_without_a_recording_provider_nothing_is_traced_or_imported(
    tmp_path: Path,
) -> None:
    _install(None)  # no provider: the proxy
    async with ashard.Pool(1) as pool:
        await pool.shard_map(2, workloads.shard_sum)
        assert not await pool.call(workloads.otel_loaded)  # the workers never import it
    provider = sdk_trace.TracerProvider(sampler=ALWAYS_OFF)  # installed, not sampling
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _install(provider)
    try:
        lines = tmp_path / "spans.jsonl"
        async with ashard.Pool(
            1, otel_setup="workloads:otel_setup", env={"ASHARD_TEST_SPANS": str(lines)}
        ) as pool:
            await pool.shard_map(2, workloads.shard_sum)
        assert exporter.get_finished_spans() == ()
        assert _worker_spans(lines) == []  # no traceparent went: no run spans
    finally:
        _install(None)


async def test_a_bad_otel_setup_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"otel_setup must be 'pkg\.module:function'"):
        ashard.Pool(1, otel_setup="no_colon_here")
    with pytest.raises(ashard.WorkerStartError, match="no_such_module"):
        async with ashard.Pool(1, otel_setup="no_such_module:setup"):
            pass

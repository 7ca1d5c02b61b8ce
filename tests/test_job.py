"""The bookkeeping of one call, without processes: chunks leave the queue, come back as
reports or losses, and every position is resolved exactly once.

These drive `ashard._job.Job` the way a backend does (`take_chunk`, `deliver`,
`worker_lost`), so the invariants hold whatever runs the shards.
"""

from __future__ import annotations

import gc
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import ashard
from ashard import _positions
from ashard._attempts import CRASHED, OK
from ashard._backend import Chunk
from ashard._consumers import StreamBuffer
from ashard._job import OLD_AT, Job
from ashard._options import CallOptions
from ashard._outcomes import Loss
from ashard._protocol import INTERRUPTED, RAISED, Payload, Result
from ashard._serialize import encode_exception

FN: Payload = (b"", [])  # never unpickled: no worker runs
PID = 4242
KILLED = Loss(PID, None, 9)


def shard_job(n: int, **options: Any) -> Job:
    opts = CallOptions(**{"chunk_size": 1, **options})
    layout = ashard.shards(n, block_size=1)
    return Job.of_shards(FN, opts, layout, None, {}, {})


def take_all(job: Job) -> list[Chunk]:
    chunks = []
    while (chunk := job.take_chunk(len(chunks))) is not None:
        chunks.append(chunk)
    return chunks


def report(k0: int, n: int, errors: list[Any], final: bool) -> Result:
    """A worker's report of positions ``k0 .. k0+n-1`` of a chunk, as the scheduler parses
    it (its values are given to `deliver` on their own)."""
    return Result(0, k0, n, FN, errors, [0.001] * n, final, None, 0, None, None)


def deliver_ok(job: Job, chunk: Chunk, start: int = 0, stop: int | None = None) -> None:
    stop = chunk.count if stop is None else stop
    values = [(chunk.first + k) * 10 for k in range(start, stop)]
    job.deliver(chunk, report(start, len(values), [], stop == chunk.count), values, PID)


def test_every_position_leaves_once_and_resolves_once_in_order() -> None:
    job = shard_job(10, chunk_size=3)
    chunks = take_all(job)
    assert [(c.first, c.count) for c in chunks] == [(0, 3), (3, 3), (6, 3), (9, 1)]
    assert job.inflight_shards == 10 and not job.has_work()
    for chunk in reversed(chunks):  # reports may come back in any order across workers
        deliver_ok(job, chunk)
    assert job.finished and job.over
    assert job.results == [i * 10 for i in range(10)]
    assert job.inflight_shards == 0 and not job.failures


def test_a_position_delivered_twice_is_refused() -> None:
    job = shard_job(2)
    chunk = take_all(job)[0]
    deliver_ok(job, chunk)
    with pytest.raises(RuntimeError, match="delivered twice"):
        deliver_ok(job, chunk)


def test_a_lost_chunk_of_one_is_charged_and_retried_until_max_retries() -> None:
    job = shard_job(1, max_retries=2, errors="collect")
    for attempt in (1, 2, 3):
        (chunk,) = take_all(job)
        assert (chunk.first, chunk.attempts or [1]) == (0, [attempt])
        job.worker_lost([chunk], KILLED, timed_out=False)
    assert job.finished and job.take_chunk(9) is None
    (error,) = job.failure_list()
    assert isinstance(error, ashard.WorkerCrashed)
    assert (error.attempts, error.signal, error.shard_id) == (3, 9, 0)
    assert "SIGKILL" in str(error) and "(3 attempts)" in str(error)
    assert (job.record.crashes, job.record.retries) == (3, 2)


def test_a_crash_inside_a_chunk_keeps_what_was_delivered_and_charges_nobody() -> None:
    job = shard_job(8, chunk_size=4, max_retries=0, errors="collect")
    first, second = take_all(job)
    deliver_ok(job, first, 0, 2)  # positions 0 and 1 came back, then the worker died
    job.worker_lost([first, second], KILLED, timed_out=False)
    assert job.results[:2] == [0, 10]
    assert job.inflight_shards == 0
    retried = take_all(job)
    # the culprit is unknown: one chunk each, uncharged, so the next crash names it;
    # those of the running chunk may have run (their attempt counts it), the rest not
    assert sorted((c.first, c.count, c.attempts) for c in retried) == [
        (2, 1, [2]),
        (3, 1, [2]),
        (4, 1, [1]),
        (5, 1, [1]),
        (6, 1, [1]),
        (7, 1, [1]),
    ]
    for chunk in retried:
        deliver_ok(job, chunk)
    assert job.finished and not job.failures
    assert job.results == [i * 10 for i in range(8)]


class FakeWorker:
    """What a backend tells a job of a worker (`ashard._backend.WorkerInfo`)."""

    def __init__(self, pid: int, alive: bool) -> None:
        self.pid, self.peak_rss, self.end_reason, self.alive = pid, 1 << 20, None, alive


def test_the_diagnostics_tell_every_run_and_every_worker_a_backend_reported() -> None:
    job = shard_job(4, chunk_size=2, max_retries=0, errors="collect")
    first, second = take_all(job)
    job.ran_on(FakeWorker(PID, alive=False))
    job.ran_on(FakeWorker(PID + 1, alive=True))
    deliver_ok(job, first)  # positions 0 and 1 ran, reported together
    job.worker_lost([second], Loss(PID + 1, None, 9), timed_out=False)
    diagnostics = job.diagnostics()
    assert (diagnostics.shards, diagnostics.chunks, diagnostics.crashes) == (4, 2, 1)
    assert diagnostics.workers == (PID, PID + 1)
    rows = {row.pid: row for row in diagnostics.per_worker}
    assert (rows[PID].shards, rows[PID].ended) == (2, "exited")
    assert (rows[PID + 1].shards, rows[PID + 1].ended) == (0, None)
    runs = sorted((r[0], r[2], r[5]) for r in diagnostics._attempts.runs())
    assert runs == [(0, PID, OK), (1, PID, OK), (2, PID + 1, CRASHED), (3, PID + 1, CRASHED)]


def test_attempt_counts_runs_whether_or_not_they_were_charged() -> None:
    job = shard_job(2, chunk_size=2, max_retries=1, errors="collect")
    (chunk,) = take_all(job)
    job.worker_lost([chunk], KILLED, timed_out=False)  # both may have run; nobody charged
    first, second = take_all(job)
    assert (first.attempts, second.attempts) == ([2], [2])
    job.worker_lost([first], KILLED, timed_out=False)  # charged: one retry left
    (again,) = take_all(job)
    assert again.attempts == [3]
    job.worker_lost([again], KILLED, timed_out=False)
    deliver_ok(job, second)
    (error,) = job.failure_list()
    assert error.attempts == 3 and job.record.retries == 3  # re-runs, charged or not
    assert job.results == [None, 10]


def test_a_timeout_charges_the_running_position_and_requeues_the_rest() -> None:
    job = shard_job(3, chunk_size=3, timeout=0.5, max_retries=0, errors="collect")
    (chunk,) = take_all(job)
    deliver_ok(job, chunk, 0, 1)
    job.worker_lost([chunk], KILLED, timed_out=True)
    (error,) = job.failure_list()
    assert isinstance(error, ashard.ShardTimeout) and error.shard_id == 1
    assert "ran past its timeout of 0.5 s (1 attempt)" in str(error)
    (rest,) = take_all(job)
    assert (rest.first, rest.count) == (2, 1)
    deliver_ok(job, rest)
    assert job.finished and job.results == [0, None, 20]
    assert job.record.timeouts == 1 and job.record.crashes == 0


def test_a_raised_error_fails_the_shard_with_its_cause_and_retry_errors_retries_it() -> None:
    record = encode_exception(ValueError("bad shard"))
    job = shard_job(1, errors="collect", retry_errors=True, max_retries=1)
    for _ in range(2):
        (chunk,) = take_all(job)
        job.deliver(chunk, report(0, 1, [(0, RAISED, record)], True), [None], PID)
    (error,) = job.failure_list()
    assert isinstance(error, ashard.ShardFailed) and error.attempts == 2
    assert isinstance(error.__cause__, ValueError) and str(error.__cause__) == "bad shard"
    assert "ValueError: bad shard" in error.remote_traceback
    assert str(error) == "shard 0 failed: ValueError: bad shard"


def test_errors_raise_stops_dispatch_at_the_first_permanent_failure() -> None:
    job = shard_job(6, max_retries=0)
    chunk = job.take_chunk(0)
    assert chunk is not None
    job.worker_lost([chunk], KILLED, timed_out=False)
    assert job.over and not job.finished
    assert not job.has_work() and job.take_chunk(1) is None


def test_the_diagnostics_say_whether_the_call_stopped_before_it_was_done() -> None:
    job = shard_job(4, max_retries=0, errors="raise")
    first, *_ = take_all(job)
    job.worker_lost([first], KILLED, timed_out=False)  # a permanent failure: raise stops it
    assert job.over and job.diagnostics().cancelled
    done = shard_job(2, errors="raise")
    for chunk in take_all(done):
        deliver_ok(done, chunk)
    assert done.finished and not done.diagnostics().cancelled


def test_an_interrupted_chunk_gives_its_rest_back_uncharged() -> None:
    job = shard_job(4, chunk_size=4)
    (chunk,) = take_all(job)
    job.deliver(chunk, report(0, 1, [(1, INTERRUPTED, None)], True), [0], PID)
    assert job.inflight_shards == 0
    assert sorted((c.first, c.attempts) for c in take_all(job)) == [(1, [1]), (2, [1]), (3, [1])]


def test_map_reads_items_lazily_and_a_retried_item_keeps_its_value() -> None:
    pulled: list[int] = []

    def source() -> Any:
        for i in range(100):
            pulled.append(i)
            yield f"item {i}"

    opts = CallOptions(chunk_size=4, max_retries=1)
    job = Job.of_items(FN, opts, source(), {})
    assert job.total is None
    chunk = job.take_chunk(0)
    assert chunk is not None and chunk.items == ["item 0", "item 1", "item 2", "item 3"]
    assert len(pulled) == 4  # nothing read ahead of what was taken
    job.worker_lost([chunk], KILLED, timed_out=False)
    retried = take_all(job)[:4]
    assert [c.items for c in retried] == [[f"item {i}"] for i in range(4)]


def young(obj: object) -> bool:
    """Is `obj` in one of the garbage collector's young generations?"""
    return any(o is obj for generation in (0, 1) for o in gc.get_objects(generation))


def test_a_long_results_list_is_old_so_young_collections_never_walk_its_slots() -> None:
    layout = ashard.shards(OLD_AT + 10, block_size=1)
    job = Job.of_shards(FN, CallOptions(chunk_size=1), layout, None, {}, {})
    assert len(job.results) == OLD_AT + 10 and not young(job.results)

    job.resume([0], [1] * (OLD_AT + 10), {}, {})  # retry_failed: a list of its own
    assert job.results[1] == 1 and not young(job.results)

    items = Job.of_items(FN, CallOptions(chunk_size=1000), iter(range(3 * OLD_AT)), {})
    while len(items.results) < OLD_AT:  # a map's grows as its items are taken
        assert items.take_chunk(0) is not None
    assert not young(items.results)


@pytest.mark.parametrize("how", ["disable", "threshold 0"])
def test_a_long_results_list_is_left_alone_when_the_collector_is_off(how: str) -> None:
    thresholds = gc.get_threshold()
    if how == "disable":
        gc.disable()
    else:
        gc.set_threshold(0)
    try:
        layout = ashard.shards(OLD_AT + 10, block_size=1)
        job = Job.of_shards(FN, CallOptions(chunk_size=1), layout, None, {}, {})
        assert young(job.results)  # no collection ran: the user turned them off
    finally:
        gc.enable()
        gc.set_threshold(*thresholds)


def test_a_stream_dispatches_no_more_than_max_pending_ahead() -> None:
    opts = CallOptions(chunk_size=1, max_pending=3)
    layout = ashard.shards(10, block_size=1)
    buffer = StreamBuffer(ordered=False, max_pending=3)
    job = Job.of_shards(FN, opts, layout, None, {}, {}, buffer)
    chunks = take_all(job)
    assert len(chunks) == 3  # the budget is spent
    deliver_ok(job, chunks[0])
    assert job.take_chunk(9) is None  # finished but unconsumed still counts
    buffer.take()
    assert job.take_chunk(9) is not None


def test_a_map_reads_ahead_no_more_bytes_than_max_held_bytes() -> None:
    """Items are counted as they are taken (by their learned pickled size) and let go
    when their chunk is over: no chunk is taken while the caller holds the bound."""
    opts = CallOptions(chunk_size=2, max_held_bytes=1000)
    job = Job.of_items(FN, opts, (f"item {i}" for i in range(100)), {})
    first = job.take_chunk(0)
    assert first is not None and first.count == 2
    job.sent(first, 400)  # 200 bytes an item, pickled
    assert job.held_bytes == 400
    second = job.take_chunk(1)
    assert second is not None and job.held_bytes == 800  # counted when taken
    job.sent(second, 600)  # the estimate is corrected by the real size
    assert job.held_bytes == 1000 and not job.has_work()
    assert job.take_chunk(2) is None
    deliver_ok(job, first)
    assert job.held_bytes == 600 and job.has_work()
    job.worker_lost([second], KILLED, timed_out=False)  # let go too (its items re-queue)
    assert job.held_bytes == 0


def stream_with_a_kilobyte_waiting(n: int, max_held_bytes: int) -> tuple[Job, StreamBuffer]:
    """A stream job of `n` one-shard chunks whose first value (1000 bytes) waits."""
    opts = CallOptions(chunk_size=1, max_held_bytes=max_held_bytes)
    buffer = StreamBuffer(ordered=False, max_pending=1000)
    job = Job.of_shards(FN, opts, ashard.shards(n, block_size=1), None, {}, {}, buffer)
    chunk = job.take_chunk(0)
    assert chunk is not None
    job.deliver(chunk, report(0, 1, [], True), [b"x" * 1000], PID)
    assert buffer.pending_bytes == 1000
    return job, buffer


def test_a_stream_holds_no_more_value_bytes_than_max_held_bytes() -> None:
    job, buffer = stream_with_a_kilobyte_waiting(10, 2500)
    taken = take_all(job)
    assert len(taken) == 1  # 1000 waiting + 1 in flight of ~1000: the next would pass 2500
    buffer.take()
    assert buffer.pending_bytes == 0 and job.take_chunk(9) is not None


def test_one_value_larger_than_the_bound_still_goes_alone() -> None:
    job, buffer = stream_with_a_kilobyte_waiting(3, 10)
    assert job.take_chunk(1) is None  # 1000 bytes wait for the consumer
    buffer.take()
    assert job.take_chunk(1) is not None  # nothing held: one goes, never a deadlock


@pytest.mark.anyio
async def test_a_long_lists_copy_is_indexed_and_sliced_as_the_list_was() -> None:
    """A list longer than `COPY_STEP` is copied in pieces as its call starts; the copy
    reads as the list did, across the pieces."""
    step = _positions.COPY_STEP
    n = 3 * step
    items = list(range(n))
    positions = _positions.ShardPositions(ashard.shards(n), items, None)
    await positions.copy_input()
    copy = positions.sequence
    assert isinstance(copy, _positions.ListCopy) and len(copy) == n
    assert list(copy) == items
    ends = [0, step - 1, step, step + 1, 2 * step + 7, n, -step - 2]
    for start in ends:
        for stop in ends:
            for stride in (1, 7, step + 3, -3):
                assert copy[start:stop:stride] == items[start:stop:stride]
    for k in (0, step - 1, step, n - 1, -1, -n):
        assert copy[k] == items[k]
    with pytest.raises(IndexError):
        copy[n]


@pytest.mark.anyio
async def test_a_long_lists_copy_is_made_old_and_let_go_a_piece_per_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The copy's pieces are made in the collector's oldest generation (a young one
    would cost the next young collection a walk of every item), and go once the call
    is over, a piece per loop step."""
    import gc

    items = list(range(3 * _positions.COPY_STEP + 5))
    positions = _positions.ItemPositions(items)
    await positions.copy_input()
    copy = positions._sliced
    assert isinstance(copy, _positions.ListCopy)
    pieces = list(copy._pieces)
    old = {id(o) for o in gc.get_objects(generation=2)}
    assert len(pieces) == 4 and all(id(p) in old for p in pieces)
    steps = []
    real = anyio.lowlevel.checkpoint

    async def counted() -> None:
        steps.append(len(copy._pieces))
        await real()

    monkeypatch.setattr(anyio.lowlevel, "checkpoint", counted)
    await positions.let_go()
    assert steps == [3, 2, 1, 0] and len(copy) == 0


@pytest.mark.anyio
async def test_a_list_cut_short_while_it_is_copied_fails_its_call_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another task that changes a long list's length between two of its pieces being
    copied: the call fails, saying so, rather than mapping a mix."""
    items = list(range(3 * _positions.COPY_STEP))
    real = anyio.lowlevel.checkpoint

    async def cut_then_checkpoint() -> None:
        del items[-5:]
        await real()

    monkeypatch.setattr(anyio.lowlevel, "checkpoint", cut_then_checkpoint)
    positions = _positions.ItemPositions(items)
    with pytest.raises(RuntimeError, match=r"items: the list changed length"):
        await positions.copy_input()

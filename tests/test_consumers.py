"""A stream's buffer and a reduce's accumulator, without processes: the order they hand
values on in, and the room they leave for positions in flight (count and bytes)."""

from __future__ import annotations

from typing import Any

from ashard._consumers import UNBOUNDED, Reducer, StreamBuffer, approx_bytes
from ashard.results import ShardDone
from ashard.shards import Shard

ROOMY = 1 << 40  # bytes the caller may hold: not the bound


def done(pos: int, value: Any = None) -> ShardDone:
    return ShardDone(Shard(pos, range(pos, pos + 1)), value, None, 1, None, 0.0)


def test_approx_bytes_reads_nbytes_then_length_then_the_objects_own_size() -> None:
    class Array:
        nbytes = 4096

    assert approx_bytes(Array()) == 4096
    assert approx_bytes(b"x" * 100) == approx_bytes("y" * 100) == 100
    assert approx_bytes(None) > 0


def test_an_ordered_stream_holds_early_shards_until_their_turn() -> None:
    buffer = StreamBuffer(ordered=True, max_pending=10)
    buffer.push(done(1))
    buffer.push(done(2))
    assert buffer.pending == 2 and not buffer.ready
    buffer.push(done(0))
    assert [buffer.take().shard.id for _ in range(3)] == [0, 1, 2]
    assert buffer.pending == 0


def test_a_streams_room_counts_what_waits_and_what_runs() -> None:
    buffer = StreamBuffer(ordered=False, max_pending=3)
    assert buffer.room(1, ROOMY) == 2
    buffer.push(done(0))
    assert buffer.room(1, ROOMY) == 1
    assert buffer.room(2, ROOMY) == 0


def test_a_streams_room_keeps_waiting_and_coming_bytes_within_the_bound() -> None:
    buffer = StreamBuffer(ordered=False, max_pending=1000)
    buffer.push(done(0, b"x" * 1000))
    assert buffer.pending_bytes == 1000
    assert buffer.room(0, 3500) == 2  # 1000 wait; two more of about 1000 fit in 3500
    assert buffer.room(1, 3500) == 1
    buffer.take()
    assert buffer.pending_bytes == 0
    assert buffer.room(0, 10) == 1  # larger than the bound, nothing held: one goes alone
    buffer.push(done(1, b"x" * 1000))
    assert buffer.room(0, 10) < 1  # but not while one waits


def test_an_unordered_reduce_holds_nothing_back() -> None:
    reducer = Reducer(lambda a, b: a + b, 0, ordered=False, max_pending=1)
    reducer.push(5, [1, 2])
    reducer.push(0, [3])
    assert reducer.value == 6 and reducer.pending == 0
    assert reducer.room(10**6, 0) == UNBOUNDED


def test_an_ordered_reduce_combines_in_shard_order_and_skips_failed_turns() -> None:
    reducer = Reducer(lambda a, b: [*a, b], None, ordered=True, max_pending=4)
    reducer.push(2, ["c"])
    reducer.push(3, ["d"])
    assert reducer.value is None and reducer.pending == 2
    assert reducer.pending_bytes == 2 and reducer.room(1, ROOMY) == 1
    reducer.push(0, [["a"]])  # the first value starts the accumulator (no init)
    assert reducer.value == ["a"] and reducer.pending == 2
    reducer.skip(1)  # shard 1 failed: its turn passes
    assert reducer.value == ["a", "c", "d"]
    assert reducer.pending == 0 and reducer.pending_bytes == 0

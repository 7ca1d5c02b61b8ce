"""Chunk sizes and windows, without processes: `ChunkSizer` is told numbers (run times,
item sizes, workers, trip latency) and answers sizes and windows."""

from __future__ import annotations

from ashard._sizing import MAX_GROWTH, MAX_WINDOW, ChunkSizer

UNKNOWN = None  # a `map` over an iterable without a length: the remaining count
ROOMY = 1 << 40  # bytes the caller may hold: not the bound


def test_a_fixed_chunk_size_is_kept_whatever_is_learned() -> None:
    sizer = ChunkSizer(7)
    sizer.learn(1000, 0.001)
    sizer.learn_item_bytes(10, 10_000)
    sizer.served_by(64)
    assert sizer.next_size(3, 1) == 7


def test_auto_starts_at_one_then_grows_at_most_max_growth_times_a_step() -> None:
    sizer = ChunkSizer("auto")
    assert sizer.next_size(UNKNOWN, ROOMY) == 1  # nothing learned yet
    sizer.learn(10, 0.001)  # 0.1 ms a position: 100 of them make the 10 ms target
    sizes = [sizer.next_size(UNKNOWN, ROOMY) for _ in range(3)]
    assert sizes == [MAX_GROWTH, MAX_GROWTH**2, 100]


def test_the_profile_scales_the_work_a_chunk_carries() -> None:
    sizer = ChunkSizer("auto", work_factor=0.25)
    sizer.learn(10, 0.001)
    assert [sizer.next_size(UNKNOWN, ROOMY) for _ in range(3)] == [8, 25, 25]


def test_near_the_end_every_worker_is_left_a_share() -> None:
    sizer = ChunkSizer("auto")
    sizer.learn(1000, 1.0)  # 1 ms a position: time alone would say chunks of 10
    sizer.served_by(4)
    for _ in range(5):
        sizer.next_size(UNKNOWN, ROOMY)
    assert sizer.next_size(40, ROOMY) == 5  # half of a 40 / 4 share
    assert sizer.next_size(3, ROOMY) == 1


def test_the_tail_is_not_cut_below_a_quarter_of_a_trip_of_work() -> None:
    sizer = ChunkSizer("auto")
    sizer.learn(1000, 0.001)  # 1 us a position: a quarter of a 1 ms trip is 250 of them
    sizer.served_by(4)
    for _ in range(5):
        sizer.next_size(UNKNOWN, ROOMY)
    assert sizer.next_size(8000, ROOMY) == 1000  # half of an 8000 / 4 share
    assert sizer.next_size(800, ROOMY) == 250  # not 100: that balances little
    assert sizer.next_size(100, ROOMY) == 100  # what is left, in one chunk


def test_a_shards_time_is_learned_by_positions_not_by_chunks() -> None:
    sizer = ChunkSizer("auto")
    for _ in range(3):
        sizer.learn(1, 0.001)  # chunks of one: mostly a chunk's fixed cost
    sizer.learn(10_000, 0.01)  # 1 us a position, over many
    sizer.served_by(1)
    sizer.next_size(UNKNOWN, ROOMY)
    # about 1 us, not the ~250 us an average of the four samples would say
    assert sizer.window() > 1 and 1e-6 <= sizer._per_shard <= 1.2e-6  # type: ignore[operator]


def test_each_workers_window_of_chunks_fits_the_bytes_the_caller_may_hold() -> None:
    sizer = ChunkSizer("auto")
    sizer.learn(1000, 0.001)
    sizer.served_by(2)
    assert sizer.bytes_of(10) == 0  # until a chunk was sent, items weigh nothing known
    sizer.learn_item_bytes(10, 1000)  # 100 bytes an item, pickled
    assert sizer.bytes_of(10) == 1000
    for _ in range(5):
        size = sizer.next_size(UNKNOWN, 8000)
    assert size == 10  # 8000 / (4 windows' worth * 2 workers * 100 bytes)


def test_short_chunks_go_several_at_a_time_long_ones_alone() -> None:
    sizer = ChunkSizer("auto")
    assert sizer.window() == 1  # until a first result says how long shards take
    sizer.learn(1, 1e-5)
    sizer.next_size(UNKNOWN, ROOMY)
    assert sizer.window() == 14  # 80 us chunks: 1 + 1 ms / 80 us of them hide a 1 ms trip
    tiny = ChunkSizer(1)  # 1 us chunks of one position: as many as hide a trip, at most
    tiny.learn(1, 1e-6)
    assert tiny.window() == MAX_WINDOW < 1000
    slow = ChunkSizer("auto")
    slow.learn(1, 0.01)
    slow.next_size(UNKNOWN, ROOMY)
    assert slow.window() == 1


def test_a_far_backend_gets_larger_chunks_and_a_window_to_hide_its_trip() -> None:
    near, far = ChunkSizer("auto"), ChunkSizer("auto")
    far.served_by(1, latency=0.1)
    assert far.window() == 2  # before anything is learned: one in flight, one waiting
    for sizer in (near, far):
        sizer.learn(10, 0.001)
        for _ in range(5):
            sizer.next_size(UNKNOWN, ROOMY)
    assert near.next_size(UNKNOWN, ROOMY) == 100  # 10 ms of work
    assert far.next_size(UNKNOWN, ROOMY) == 5000  # 5 trips of 0.1 s of work
    assert far.window() == 2  # 0.5 s a chunk: shorter than 50 trips, so not alone


def test_async_shards_several_at_once_get_chunks_enough_to_keep_them_in_flight() -> None:
    """With `together` shards of a worker in flight, a chunk starts at that size and a
    worker holds enough chunks to run that many plus one to join them, the tail's small
    chunks too."""
    sizer = ChunkSizer("auto", together=16)
    sizer.served_by(2)
    assert sizer.window() == 2 and sizer.next_size(UNKNOWN, ROOMY) == 16
    sizer.learn(16, 16 * 0.04)  # 40 ms each, 16 at once: 2.5 ms of the worker's time
    assert sizer.next_size(UNKNOWN, ROOMY) == 4  # 10 ms of the worker's time
    assert sizer.window() == 5  # 16 / 4 running, and one more
    assert sizer.next_size(4, ROOMY) == 1  # the tail: a share for each worker
    assert sizer.window() == 17
    fixed = ChunkSizer(2, together=16)
    assert fixed.window() == 9

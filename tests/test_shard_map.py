"""`shard_map` end to end on real workers: order, inputs, functions of every kind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

import ashard
import workloads

pytestmark = pytest.mark.anyio


async def test_results_come_back_in_shard_order() -> None:
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(ashard.shards(40, block_size=1), workloads.sleep_shard)
    assert res.results == list(range(40))
    assert res.ok and res.failures == []
    assert len(res.shards) == 40
    assert res.diagnostics.shards == 40


async def test_int_means_shards_of_n() -> None:
    res = await ashard.shard_map(100, workloads.shard_ids, workers=2)
    expected = ashard.shards(100)
    assert [r[0] for r in res.results] == list(range(len(expected)))
    assert [r[1] for r in res.results] == [list(s.idx) for s in expected]
    assert sorted(i for r in res.results for i in r[1]) == list(range(100))


async def test_strided_shards_on_workers() -> None:
    s = ashard.shards(11, block_size=3, strategy="strided")
    res = await ashard.shard_map(s, workloads.shard_ids, workers=2)
    assert [r[1] for r in res.results] == [sh.idx.tolist() for sh in s]


async def test_sequence_items_are_the_shard_slices() -> None:
    words = [f"w{i}" for i in range(23)]
    res = await ashard.shard_map(words, workloads.shard_items, workers=2)
    layout = ashard.shards(len(words))
    assert res.results == [words[s.idx.start : s.idx.stop] for s in layout]
    assert [w for chunk in res.results for w in chunk] == words


class _ReadOnce:
    """A sequence (a dataset, say) that fails when an item is read a second time."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.reads: dict[int, int] = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: slice) -> list[int]:
        wanted = range(*key.indices(self.n))
        for i in wanted:
            self.reads[i] = self.reads.get(i, 0) + 1
            if self.reads[i] > 1:
                raise OSError(f"item {i} was read again")
        return list(wanted)


async def test_a_sequence_is_read_once_per_shard_and_a_rerun_gets_the_same_items() -> None:
    async with ashard.Pool(2) as pool:
        data = _ReadOnce(8)
        res = await pool.shard_map(data, workloads.items_dying_first_attempt, chunk_size=1)
        assert res.results == [[i] for i in range(8)]
        assert res.diagnostics.retries == 1
        assert data.reads == dict.fromkeys(range(8), 1)

        data = _ReadOnce(8)
        res = await pool.shard_map(data, workloads.fail_odd, errors="collect", chunk_size=1)
        assert [f.shard.items for f in res.failures] == [[1], [3], [5], [7]]
        assert data.reads == dict.fromkeys(range(8), 1)


class _Shrinking(_ReadOnce):
    """A sequence that loses its last items once its first shard was read."""

    def __len__(self) -> int:
        return self.n - 3 if self.reads else self.n


async def test_a_sequence_that_changes_length_during_its_call_fails_the_call() -> None:
    async with ashard.Pool(2) as pool:
        with pytest.raises(RuntimeError, match=r"shards: the sequence changed length \(8 to 5\)"):
            await pool.shard_map(_Shrinking(8), workloads.shard_items, chunk_size=1)


@pytest.fixture
def long_shards(monkeypatch: pytest.MonkeyPatch) -> int:
    """Shards of a list or tuple count as long from 100 items, and go in pieces of at
    most 256 (`_positions.CUT_FROM`, `_scheduler.MAX_PIECE`): the path a 16k-item shard
    takes, with inputs small enough to check item by item. The number of items to give
    a call: a list of it is copied in pieces."""
    from ashard import _positions, _scheduler

    monkeypatch.setattr(_positions, "CUT_FROM", 100)
    monkeypatch.setattr(_scheduler, "FIRST_PIECE", 64)
    monkeypatch.setattr(_scheduler, "MIN_PIECE", 16)
    monkeypatch.setattr(_scheduler, "MAX_PIECE", 256)
    return _positions.COPY_STEP + 3_000


def _long_input(kind: type, n: int) -> Any:
    """`n` items of many sorts: strings and numbers, a large `bytes` first (sent out of
    band), an array, None and a tuple."""
    import numpy as np

    items: list[Any] = [f"s{i}" if i % 3 else i for i in range(n)]
    items[0], items[5], items[300], items[301] = b"x" * (1 << 20), np.arange(3), None, ("t", 1)
    return kind(items)


def _described(items: Any) -> tuple[str, list[Any]]:
    return type(items).__name__, [x.tolist() if hasattr(x, "tolist") else x for x in items]


@pytest.mark.parametrize("kind", [list, tuple])
async def test_long_shards_reach_fn_whole_in_order_and_of_the_inputs_type(
    long_shards: int, kind: type
) -> None:
    """A shard of many items of a list or a tuple is sent a piece at a time: fn gets the
    slice of the input, a list for a list and a tuple for a tuple, whatever its items."""
    data = _long_input(kind, long_shards)
    layout = ashard.shards(len(data))
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(data, workloads.items_described)
    assert res.results == [_described(data[layout.where(k)]) for k in range(len(layout))]


@pytest.mark.parametrize("kind", [list, tuple])
async def test_a_long_shard_is_sent_again_as_it_was_and_shown_whole_in_the_caller(
    long_shards: int, kind: type
) -> None:
    """A long shard's rerun (its worker died) gets its items again; the `Shard` of a
    failure and of a streamed result holds its slice of the input as the call began,
    of the input's type."""
    data = _long_input(kind, long_shards)
    layout = ashard.shards(len(data))
    cut = [_described(data[layout.where(k)]) for k in range(len(layout))]
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(data, workloads.items_dying_first_attempt, borrow={"victim": 1})
        assert [_described(v)[1] for v in res.results] == [c[1] for c in cut]
        assert res.diagnostics.retries == 1
        res = await pool.shard_map(data, workloads.fail_odd, errors="collect")
        assert [_described(f.shard.items) for f in res.failures] == cut[1::2]
        async with pool.shard_stream(data, workloads.shard_ids) as stream:
            if kind is list:
                data.clear()
            seen = {done.shard.id: _described(done.shard.items) async for done in stream}
    assert seen == dict(enumerate(cut))


async def test_long_shards_of_many_arrays_are_sent_whole_and_right(
    long_shards: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pieces whose arrays would need more out-of-band buffers than a frame should carry
    (here over 16) give way to the shard pickled whole, as before: the same items."""
    import numpy as np

    from ashard import _scheduler

    monkeypatch.setattr(_scheduler, "MAX_BUFFERS", 64)
    data = [np.full(2, i) for i in range(long_shards)]
    layout = ashard.shards(len(data))
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(data, workloads.items_described)
    assert res.results == [_described(data[layout.where(k)]) for k in range(len(layout))]


async def test_a_long_shards_items_read_after_its_call_are_still_its_own(long_shards: int) -> None:
    """A `Shard` handed to the caller during a call (here to `footprint=`) takes a long
    shard's items when they are first read: read after the call is over, and its copy
    of the list let go, they are still that shard's slice."""
    data = [f"w{i}" for i in range(long_shards)]
    layout = ashard.shards(len(data))
    handed: list[ashard.Shard] = []

    def footprint(shard: ashard.Shard) -> int:
        handed.append(shard)
        return 0

    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(data, workloads.attempt_of, footprint=footprint)
    assert res.ok
    want = {k: data[layout.where(k)] for k in range(len(layout))}
    data.clear()
    assert {shard.id: shard.items for shard in handed} == want


async def test_a_long_shard_whose_items_cannot_be_pickled_fails_alone(long_shards: int) -> None:
    import threading

    data: list[Any] = list(range(long_shards))
    layout = ashard.shards(len(data))
    data[layout.where(1).start + 150] = threading.Lock()
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(data, workloads.shard_ids, errors="collect")
    assert [f.shard_id for f in res.failures] == [1]
    assert "could not be pickled" in str(res.failures[0])
    assert [r[0] for k, r in enumerate(res.results) if k != 1] == [
        k for k in range(len(layout)) if k != 1
    ]


@pytest.mark.parametrize("kind", ["small", "large", "list", "nested"])
async def test_a_value_its_function_changes_again_later_comes_back_as_it_was(kind: str) -> None:
    """A worker sends its shards' values in batches: a function that returns one object
    it changes in place for every shard (a buffer it reuses) still has each shard's
    value come back as that shard left it."""

    def first(value: Any) -> int:
        return int((value["a"] if kind == "nested" else value)[0])

    shards, borrow = ashard.shards(20, block_size=1), {"kind": kind}
    async with ashard.Pool(1) as pool:
        res = await pool.shard_map(shards, workloads.reused_buffer, borrow=borrow)
        assert [first(v) for v in res.results] == list(range(20))
        res = await pool.shard_map(shards, workloads.reused_buffer_async, borrow=borrow)
        assert [first(v) for v in res.results] == list(range(20))
        async with pool.shard_stream(shards, workloads.reused_buffer, borrow=borrow) as stream:
            seen = {done.shard.id: first(done.value) async for done in stream}
        assert seen == {k: k for k in range(20)}
        assert await pool.map(workloads.reused_list, range(300)) == [[x] for x in range(300)]


def test_a_value_is_kept_when_nothing_else_holds_it_and_copied_when_something_does() -> None:
    """`settled` (what a worker does with each value as its task ends): a fresh array
    or small list is kept as it is, one held elsewhere too is copied, and a copy has
    the value as it was."""
    import numpy as np

    from ashard._serialize import settled, undrawn

    kept = [np.arange(4.0), [1, "a"]]

    def fresh_array() -> bool:
        value = np.arange(4.0)
        return settled(value) is value

    def fresh_list() -> bool:
        value = [1, "a"]
        return settled(value) is value

    assert fresh_array() and fresh_list()
    for value in kept:
        copy = settled(value)
        assert copy is not value
        value[0] = 99
        assert undrawn(copy)[0] != 99


async def test_empty_sequence_gives_empty_result() -> None:
    res = await ashard.shard_map([], workloads.shard_items, workers=2)
    assert res.results == [] and res.ok


async def test_lambdas_and_closures_run_on_workers() -> None:
    offset = 1000

    def add_offset(shard: ashard.Shard) -> int:
        return shard.id + offset

    async with ashard.Pool(2) as pool:
        s = ashard.shards(6, block_size=1)
        assert (await pool.shard_map(s, lambda sh: sh.id * 2)).results == [0, 2, 4, 6, 8, 10]
        assert (await pool.shard_map(s, add_offset)).results == [1000 + i for i in range(6)]


async def test_borrow_reaches_fn_as_keyword_arguments() -> None:
    table = {"a": 1, "b": 2}
    res = await ashard.shard_map(
        ashard.shards(4, block_size=1),
        lambda sh, table, scale: table["b"] * scale + sh.id,
        borrow={"table": table, "scale": 10},
        workers=2,
    )
    assert res.results == [20, 21, 22, 23]


async def test_a_large_borrowed_object_reaches_every_worker_whole() -> None:
    """A borrowed object whose pickle is large travels beside the message that names
    it, uncopied, to each worker: each shard sees all of it, call after call."""
    table = {f"k{i}": i for i in range(20_000)}  # about 300 kB pickled
    async with ashard.Pool(2) as pool:
        for _ in range(2):
            res = await pool.shard_map(
                ashard.shards(8, block_size=1),
                lambda sh, table: (len(table), sum(table.values()), table[f"k{sh.id}"]),
                borrow={"table": table},
            )
            assert res.results == [(20_000, sum(range(20_000)), k) for k in range(8)]


class _CountsLoads:
    """Appends the unpickling process id to a file: counts how often it was sent."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (_record_load, (self.path,))


def _record_load(path: str) -> _CountsLoads:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return _CountsLoads(path)


async def test_borrow_is_sent_once_per_worker_not_per_shard(tmp_path: Path) -> None:
    log = tmp_path / "loads.txt"
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(
            ashard.shards(64, block_size=1),
            lambda sh, obj: sh.id,
            borrow={"obj": _CountsLoads(str(log))},
            chunk_size=1,
        )
        assert res.results == list(range(64))
        pids = (await anyio.Path(log).read_text()).split()
        assert len(pids) == len(set(pids)) <= 2  # one load per worker for the whole call


def test_function_defined_in_main_script(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import anyio, ashard

            def in_main(shard):
                return [i * i for i in shard.idx]

            async def main():
                res = await ashard.shard_map(6, in_main, workers=2)
                print(sum(sum(r) for r in res.results))
                await ashard.shutdown()

            anyio.run(main)
            """
        )
    )
    out = run_script(script)
    assert out.strip() == str(sum(i * i for i in range(6)))


def test_worker_finds_modules_next_to_the_script(tmp_path: Path) -> None:
    (tmp_path / "helper_mod.py").write_text("def triple(shard):\n    return shard.id * 3\n")
    script = tmp_path / "main.py"
    script.write_text(
        textwrap.dedent(
            """
            import anyio, ashard, helper_mod

            async def main():
                res = await ashard.shard_map(ashard.shards(3, block_size=1), helper_mod.triple,
                                             workers=1)
                print(res.results)
                await ashard.shutdown()

            anyio.run(main)
            """
        )
    )
    out = run_script(script)
    assert out.strip() == "[0, 3, 6]"


def run_script(script: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=script.parent, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_sync_code_can_drive_anyio_run() -> None:
    """The default pool serves one event loop after another."""
    import anyio

    for _ in range(2):
        res = anyio.run(ashard.shard_map, 8, workloads.shard_sum)
        assert sum(res.results) == sum(range(8))


def test_subprocess_isolation_from_fork_state() -> None:
    code = "import ashard, anyio; print(anyio.run(ashard.call, abs, -4))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "4"


async def test_map_over_a_generator_holds_a_bounded_amount_of_items() -> None:
    """200 MB of 100 KB items from a generator, a fast fn: the caller holds about
    `max_held_bytes` of items (twice that while a chunk is being sent), not the input."""
    import tracemalloc

    async with ashard.Pool(2) as pool:
        tracemalloc.start()
        try:
            out = await pool.map(len, workloads.make_items(2000, 100_000), max_held_bytes="8MB")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert out == [100_000] * 2000
    assert peak < 40_000_000, peak  # about 2 x 8 MB and some slack; the input is 200 MB

"""`Pool`: warm reuse, statistics, lifecycle, default pool, init and env."""

from __future__ import annotations

import functools
import gc
import json
import operator
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import ashard
import ashard._job
import workloads

pytestmark = pytest.mark.anyio


async def test_warm_pool_reuses_its_workers() -> None:
    async with ashard.Pool(2) as pool:
        pids = pool.pids
        assert len(pids) == 2
        res = await pool.shard_map(ashard.shards(20, block_size=1), workloads.pid_of)
        assert set(res.results) <= set(pids)
        await pool.map(workloads.square, range(100))
        assert pool.pids == pids
        stats = pool.stats
        assert (stats.alive, stats.started, stats.crashed) == (2, 2, 0)
        assert stats.shards_done == 120
    assert pool.closed
    assert pool.pids == []
    with pytest.raises(RuntimeError, match="closed"):
        await pool.call(abs, 1)


async def test_pool_without_context_manager_starts_on_demand() -> None:
    pool = ashard.Pool(1)
    assert pool.pids == []
    assert await pool.call(os.getpid) == pool.pids[0]
    await pool.aclose()


async def test_a_burst_of_first_calls_starts_no_more_workers_than_the_pool_holds() -> None:
    pool = ashard.Pool(2)  # nothing started: the calls start it
    pids: list[int] = []

    async def one() -> None:
        pids.append(await pool.call(os.getpid))

    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for _ in range(16):
                    tg.start_soon(one)
        assert len(pids) == 16
        assert pool.stats.started <= 2, pool.stats  # a storm of starts made one per call
        assert set(pids) <= set(pool.pids)
    finally:
        await pool.aclose()


async def test_calls_while_the_pool_starts_start_no_more_workers_than_it_holds() -> None:
    pool = ashard.Pool(2)
    pids: list[int] = []

    async def one() -> None:
        pids.append(await pool.call(os.getpid))

    try:
        with anyio.fail_after(60):
            await pool.backend()  # made, nothing started yet
            async with anyio.create_task_group() as tg:
                tg.start_soon(pool.start)  # counts its room, then starts two workers
                for _ in range(8):
                    tg.start_soon(one)  # arrive before those starts have begun
        assert len(pids) == 8
        assert pool.stats.started == 2, pool.stats  # one more came for the calls
        assert set(pids) <= set(pool.pids)
    finally:
        await pool.aclose()


async def test_a_cancelled_start_leaves_the_pool_its_room() -> None:
    pool = ashard.Pool(2)
    try:
        with anyio.fail_after(60):
            await pool.backend()
            with anyio.CancelScope() as scope:
                scope.cancel()  # the starts are counted as starting, then cancelled
                await pool.start()
            assert pool.stats.started == 0
            assert await pool.map(abs, range(-20, 0), chunk_size=1) == list(range(20, 0, -1))
        assert 1 <= pool.stats.started <= 2, pool.stats
    finally:
        await pool.aclose()


async def test_default_pool_is_shared_and_resizable() -> None:
    p = ashard.default_pool()
    assert p is ashard.default_pool()
    await ashard.map(abs, range(10), workers=1)
    assert p.workers == 1 and len(p.pids) == 1
    await ashard.shard_map(ashard.shards(8, block_size=1), workloads.sleep_shard, workers=2)
    assert p.workers == 2 and len(p.pids) == 2
    await ashard.map(abs, range(10), workers=1)
    assert len(p.pids) == 1  # the extra worker left when it went idle
    await ashard.shutdown()
    assert p.closed and ashard.default_pool() is not p


async def test_workers_and_pool_together_must_agree() -> None:
    async with ashard.Pool(1) as pool:
        with pytest.raises(ValueError, match="pass one of them"):
            await ashard.map(abs, [1], pool=pool, workers=2)
        assert await ashard.map(abs, [-1], pool=pool, workers=1) == [1]


def _set_flag() -> None:
    os.environ["ASHARD_INIT_RAN"] = str(int(os.environ.get("ASHARD_INIT_RAN", "0")) + 1)


def _read_env(name: str) -> str | None:
    return os.environ.get(name)


async def test_init_runs_once_per_worker_and_env_is_set() -> None:
    async with ashard.Pool(2, init=_set_flag, env={"ASHARD_TEST_VAR": "hello"}) as pool:
        values = await pool.map(_read_env, ["ASHARD_INIT_RAN"] * 20, chunk_size=1)
        assert set(values) == {"1"}
        assert await pool.call(_read_env, "ASHARD_TEST_VAR") == "hello"


async def test_workers_run_nicer_than_the_caller_every_thread_of_them() -> None:
    caller = os.getpriority(os.PRIO_PROCESS, 0)
    with anyio.fail_after(60):
        async with ashard.Pool(1, init=workloads.start_idle_thread) as pool:
            default = await pool.call(workloads.thread_nices)
        async with ashard.Pool(1, worker_nice=3, mem_cap="4GB") as pool:
            three = await pool.call(workloads.thread_nices)  # and the memory watcher
        async with ashard.Pool(1, worker_nice=0) as pool:
            same = await pool.call(workloads.thread_nices)
    assert len(default) >= 2 and set(default) == {min(caller + 10, 19)}
    assert len(three) >= 2 and set(three) == {min(caller + 3, 19)}
    assert set(same) == {caller}


def _broken_init() -> None:
    raise RuntimeError("cannot initialise")


async def test_failing_init_fails_the_pool_start() -> None:
    with anyio.fail_after(30):
        with pytest.raises(ashard.WorkerStartError, match="cannot initialise") as info:
            async with ashard.Pool(2, init=_broken_init):
                pass
    assert isinstance(info.value.__cause__, RuntimeError)


async def test_map_reads_its_input_lazily() -> None:
    pulled: list[float] = []

    def source():  # type: ignore[no-untyped-def]
        import time

        for i in range(400):
            pulled.append(time.monotonic())
            yield i

    async with ashard.Pool(2) as pool:
        out = await pool.map(workloads.timestamps, source(), chunk_size=4)
    assert [x for x, _ in out] == list(range(400))
    finished = sorted(t for _, t in out)
    # when item k was pulled, at most a bounded number of items were unfinished
    import bisect

    ahead = [k - bisect.bisect_left(finished, t) for k, t in enumerate(pulled)]
    assert max(ahead) <= 2 * 8 * 4 + 4


async def test_an_iterator_that_changes_one_object_in_place_maps_each_value() -> None:
    """Items are read ahead of the workers: an iterator that hands out one object
    changed in place each time still has each of its values mapped (each is copied as
    it is drawn), whatever the chunks, and a failed item is reported as it was."""
    first = operator.itemgetter(0)
    with anyio.fail_after(60):
        async with ashard.Pool(2) as pool:
            for chunk_size in ("auto", 1):
                out = await pool.map(first, workloads.one_buffer_changed_in_place(300),
                                     chunk_size=chunk_size)  # fmt: skip
                assert out == list(range(300))
            out = await pool.map(len, workloads.one_list_growing(300))
            assert out == list(range(1, 301))
            out = await pool.map(functools.partial(workloads.fail_past, limit=2),
                                 workloads.one_list_growing(4), errors="collect")  # fmt: skip
            assert out[:2] == [1, 2]
            assert [e.shard.items for e in out[2:]] == [[[0, 1, 2]], [[0, 1, 2, 3]]]


async def _change_once_running(run: Path, items: list[int], how: str) -> None:
    """Once an item of the call runs (`workloads.held_until_go`), change `items` `how`,
    then let the items go on."""
    while not (run / "started").exists():  # noqa: ASYNC110
        await anyio.sleep(0.005)
    if how == "refilled":
        items[:] = [-1] * len(items)
    elif how == "sorted":
        items.sort(reverse=True)
    else:
        del items[10:]
    (run / "go").touch()


@pytest.mark.parametrize("n", [60, 70_000])  # copied at once, and in steps
@pytest.mark.parametrize("call", ["map", "shard_map"])
async def test_a_list_changed_while_its_call_runs_is_mapped_as_it_was(
    tmp_path: Path, call: str, n: int
) -> None:
    """The caller's other tasks run while a call does: a list they refill, sort or cut
    short meanwhile is still mapped whole, as it was when the call began."""
    with anyio.fail_after(60):
        async with ashard.Pool(2) as pool:
            for how in ("refilled", "sorted", "cut short"):
                run = tmp_path / how
                run.mkdir()
                items = list(range(n))
                borrow = {"directory": str(run)}
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_change_once_running, run, items, how)
                    if call == "map":
                        out = await pool.map(workloads.held_until_go, items, borrow=borrow)
                    else:
                        res = await pool.shard_map(items, workloads.shard_items_held_until_go,
                                                   borrow=borrow, chunk_size=1)  # fmt: skip
                        out = [x for part in res.results for x in part]
                assert out == list(range(n)), how


async def test_a_caller_whose_working_directory_was_removed_still_starts_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process may go on in a directory removed under it; so do its workers (they
    start in the caller's working directory)."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    async with ashard.Pool(1) as pool:
        assert await pool.call(abs, -2) == 2
        assert await pool.map(workloads.square, range(3)) == [0, 1, 4]


async def test_call_round_trip_and_kwargs() -> None:
    async with ashard.Pool(1) as pool:
        assert await pool.call(divmod, 17, 5) == (3, 2)
        assert await pool.call(int, "ff", base=16) == 255


@pytest.fixture
def long_args(monkeypatch: pytest.MonkeyPatch) -> None:
    """A list or tuple argument of 100 items or more counts as long and goes in pieces of
    at most 64 (`_scheduler.CUT_FROM`, `MAX_PIECE`): the path of a 16k-item one."""
    from ashard import _scheduler

    monkeypatch.setattr(_scheduler, "CUT_FROM", 100)
    monkeypatch.setattr(_scheduler, "FIRST_PIECE", 32)
    monkeypatch.setattr(_scheduler, "MIN_PIECE", 8)
    monkeypatch.setattr(_scheduler, "MAX_PIECE", 64)


async def test_long_arguments_of_a_call_arrive_whole_and_as_given(long_args: None) -> None:
    """Long list and tuple arguments are pickled a piece per loop step: the function gets
    each whole, of its type, and one object given twice as one object."""
    import numpy as np

    items: list[Any] = [f"s{i}" if i % 3 else i for i in range(1_000)]
    items[0], items[7] = b"x" * (1 << 20), None
    arrays = [np.full(2, i) for i in range(300)]
    as_tuple = tuple(items)
    async with ashard.Pool(1) as pool:
        kinds, alias, args, kwargs = await pool.call(
            workloads.args_seen, items, items, as_tuple, 5, named=as_tuple, arrays=arrays
        )
    assert kinds == ["list", "list", "tuple", "int", "tuple", "list"]
    assert alias
    assert args == [items, items, as_tuple, 5]
    assert kwargs["named"] == as_tuple
    assert [a.tolist() for a in kwargs["arrays"]] == [[i, i] for i in range(300)]


async def test_long_items_of_a_map_arrive_whole_and_as_given(long_args: None) -> None:
    """A map whose items are long lists or tuples (batches) sends each a piece per loop
    step: each arrives whole and of its type, the same object given twice included."""
    batch = [f"s{i}" for i in range(1_000)]
    items = [batch, tuple(range(500)), batch, list(range(300)), 7]
    async with ashard.Pool(2) as pool:
        seen = await pool.map(workloads.args_seen, items)
    assert [s[0] for s in seen] == [["list"], ["tuple"], ["list"], ["list"], ["int"]]
    assert [s[2] for s in seen] == [[item] for item in items]


def change_at_each_checkpoint(monkeypatch: pytest.MonkeyPatch, change: Callable[[], None]) -> None:
    """`change()` (another task's, in effect) before every loop checkpoint from now on:
    between two pieces of what a call sends. `monkeypatch.undo()` ends it."""
    real = anyio.lowlevel.checkpoint

    async def change_then_checkpoint() -> None:
        change()
        await real()

    monkeypatch.setattr(anyio.lowlevel, "checkpoint", change_then_checkpoint)


async def test_a_long_argument_that_changes_length_while_it_is_sent_arrives_as_it_became(
    long_args: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another task that grows a long argument between two of its pieces: the call sends
    the list whole as it is then, never a mix of pieces."""
    items = list(range(1_000))

    def grow() -> None:
        if len(items) == 1_000:
            items.append(-1)

    async with ashard.Pool(1) as pool:
        await pool.call(abs, -1)
        change_at_each_checkpoint(monkeypatch, grow)
        _, _, args, _ = await pool.call(workloads.args_seen, items)
        monkeypatch.undo()
    assert args == [[*range(1_000), -1]]


async def test_a_long_argument_that_cannot_be_pickled_is_named(long_args: None) -> None:
    import threading

    items: list[Any] = list(range(1_000))
    items[500] = threading.Lock()
    async with ashard.Pool(1) as pool:
        with pytest.raises(TypeError, match="argument 1 of the call cannot be sent"):
            await pool.call(workloads.args_seen, 1, items)
        assert await pool.call(abs, -1) == 1


def _long_dict() -> dict[Any, Any]:
    entries: dict[Any, Any] = {}
    for i in range(1_000):  # keys of several types, in an order that is not sorted
        entries[(-i, "t") if i % 5 == 0 else f"k{999 - i}" if i % 2 else 999 - i] = (
            None if i % 7 == 0 else [i] if i % 3 == 0 else f"v{i}"
        )
    return entries


async def test_long_dict_arguments_and_borrows_arrive_whole_in_order_and_as_given(
    long_args: None,
) -> None:
    """A dict of 100 entries or more (here; 16k in use), as a call's argument or as what
    a call borrows, is pickled a piece of entries per loop step: it arrives whole, in
    its order, as a dict (a call's argument given twice, as one object). A subclass
    (an OrderedDict) goes whole, as itself."""
    import collections

    entries = _long_dict()
    ordered = collections.OrderedDict((k, k) for k in range(300))
    async with ashard.Pool(2) as pool:
        kinds, alias, args, _ = await pool.call(workloads.args_seen, entries, entries, ordered)
        assert kinds == ["dict", "dict", "OrderedDict"]
        assert alias
        assert args == [entries, entries, ordered]
        assert list(args[0].items()) == list(entries.items())
        res = await pool.shard_map(2, workloads.borrowed_seen, borrow={"d": entries, "e": entries})
    lent, seen = res.results[0]
    assert lent == {"d": "dict", "e": "dict"}
    assert seen == list(entries.items())


async def test_a_long_borrowed_dict_that_changes_size_while_it_is_sent_arrives_as_it_became(
    long_args: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another task adds an entry between two pieces of a borrowed dict: the call lends
    the dict whole, as it is then, never a mix of pieces."""
    entries = _long_dict()

    def grow() -> None:
        if "late" not in entries:
            entries["late"] = "entry"

    async with ashard.Pool(1) as pool:
        await pool.call(abs, -1)
        change_at_each_checkpoint(monkeypatch, grow)
        res = await pool.shard_map(1, workloads.borrowed_seen, borrow={"d": entries})
        monkeypatch.undo()
    assert res.results[0][1] == list(entries.items())
    assert res.results[0][1][-1] == ("late", "entry")


async def test_a_long_dict_whose_key_is_replaced_while_it_is_sent_arrives_as_it_became(
    long_args: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another task takes a key out of a dict argument and puts another in between two
    of its pieces (its size unchanged): the call sends it whole as it is then, never
    with both keys."""
    entries = _long_dict()
    first = next(iter(entries))

    def swap() -> None:
        if first in entries:
            del entries[first]
            entries["new"] = "key"

    async with ashard.Pool(1) as pool:
        await pool.call(abs, -1)
        change_at_each_checkpoint(monkeypatch, swap)
        _, _, args, _ = await pool.call(workloads.args_seen, entries)
        monkeypatch.undo()
    assert first not in args[0]
    assert list(args[0].items()) == list(entries.items())


def test_a_dicts_entries_read_in_pieces_tell_a_key_replaced_after_the_last_piece() -> None:
    """The last piece read exactly the dict's size in entries, then a key was replaced
    (in a dict with room, and in one Python rebuilds for it): the pieces hold the old
    key and not the new one, so they are not the dict."""
    from ashard._scheduler import _Entries

    table = {i: -i for i in range(8)}
    entries = _Entries(table)
    assert entries(0, 5) == {i: -i for i in range(5)}
    assert entries(5, 8) == {i: -i for i in range(5, 8)}
    del table[0]
    table["new"] = 1
    assert not entries.read_whole(8)
    full = {i: -i for i in range(10)}  # no room: replacing a key rebuilds it
    entries = _Entries(full)
    assert len(entries(0, 10)) == 10
    del full[0]
    full["new"] = 1
    assert not entries.read_whole(10)
    unchanged = _Entries({i: -i for i in range(8)})
    assert len(unchanged(0, 16)) == 8
    assert unchanged.read_whole(8)


async def test_a_long_borrowed_dict_that_cannot_be_pickled_is_named(long_args: None) -> None:
    import threading

    entries = _long_dict()
    entries["lock"] = threading.Lock()
    async with ashard.Pool(1) as pool:
        with pytest.raises(TypeError, match=r"borrow\['d'\]"):
            await pool.shard_map(2, workloads.borrowed_seen, borrow={"d": entries})
        assert await pool.call(abs, -1) == 1


def kind_and_digest(*args: object, **kwargs: object) -> list[tuple[str, str]]:
    import hashlib

    def one(value: object) -> tuple[str, str]:
        assert isinstance(value, bytes | bytearray)
        data = value
        return type(value).__name__, hashlib.sha256(data).hexdigest()

    return [one(v) for v in (*args, *kwargs.values())]


class Tagged(bytes):
    """A bytes subclass: it travels as itself."""


def borrowed_kinds(shard: ashard.Shard, big: object, small: object) -> list[tuple[str, str]]:
    return kind_and_digest(big, small)


async def test_large_bytes_arguments_arrive_whole_and_as_their_own_type() -> None:
    """Large `bytes` and `bytearray` values travel out of band (uncopied by the caller);
    the worker rebuilds each as the type it was, with every byte, whether an argument, a
    keyword argument, borrowed or an item of a map; small ones, subclasses and the other
    items of a mixed list travel as before."""
    import hashlib

    big = random.Random(0).randbytes(3 << 20)
    values = [big, bytearray(big[: 2 << 20]), big[:100], Tagged(big[: (1 << 20) + 7])]
    expected = [(type(v).__name__, hashlib.sha256(v).hexdigest()) for v in values]
    with anyio.fail_after(60):
        async with ashard.Pool(1) as pool:
            got = await pool.call(kind_and_digest, *values[:2], a=values[2], b=values[3])
            assert got == expected
            res = await pool.shard_map(
                2, borrowed_kinds, borrow={"big": values[1], "small": values[2]}
            )
            mixed = [*values, "text", 7]
            got = await pool.map(kind_and_digest, mixed[:4], chunk_size=2)
            assert got == [[e] for e in expected]
            assert await pool.map(type_name, mixed, chunk_size=6) == [
                type(v).__name__ for v in mixed
            ]
    assert res.results == [expected[1:3]] * 2


def type_name(value: object) -> str:
    return type(value).__name__


FORKED_CHILD = """
import json, os, sys
import ashard, ashard.sync

pool = ashard.sync.Pool(1)
parent_pid = pool.call(os.getpid)
ashard.sync.call(abs, -1)  # the sync default pool and its loop thread exist too
r, w = os.pipe()
child = os.fork()
if child == 0:
    os.close(r)
    report = {}
    try:
        pool.call(os.getpid)
    except RuntimeError as exc:
        report["refused"] = str(exc)
    report["own"] = ashard.sync.call(os.getpid)  # a default pool of the child's own
    ashard.sync.shutdown()
    pool.close()  # the parent's workers are not the child's to stop
    os.write(w, json.dumps(report).encode())
    os._exit(0)
os.close(w)
report = json.loads(os.read(r, 1 << 16))
os.waitpid(child, 0)
report["parent_pid"] = parent_pid
report["parent_after"] = pool.call(os.getpid)
report["pids"] = pool.pids
pool.close()
ashard.sync.shutdown()
print(json.dumps(report))
"""


def test_a_forked_child_uses_pools_of_its_own_and_leaves_the_parents_alone() -> None:
    out = subprocess.run(
        [sys.executable, "-c", FORKED_CHILD], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.splitlines()[-1])
    assert "forked child" in report["refused"] and "Make a Pool in the child" in report["refused"]
    assert report["own"] != report["parent_pid"]
    assert report["parent_after"] == report["parent_pid"]  # the same worker, unharmed
    assert report["pids"] == [report["parent_pid"]]


def test_no_resource_warning_when_the_default_pool_is_cleaned_up_at_exit() -> None:
    script = (
        "import asyncio, ashard\n"
        "async def main():\n"
        "    print(await ashard.map(abs, [-1, -2], workers=2))\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run(
        [sys.executable, "-X", "dev", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == "[1, 2]"
    assert "ResourceWarning" not in out.stderr, out.stderr


async def test_a_pool_closed_before_its_first_use_refuses_work_and_started_nothing() -> None:
    pool = ashard.Pool(1)
    await pool.aclose()
    assert pool.closed and pool.pids == [] and pool.stats.started == 0
    for use in (lambda: pool.map(abs, [1]), lambda: pool.call(abs, 1), pool.start):
        with pytest.raises(RuntimeError, match="closed"):
            await use()
    with pytest.raises(RuntimeError, match="closed"):
        pool.shard_stream(2, workloads.shard_sum)


async def test_a_finished_call_keeps_nothing_alive_through_a_reference_cycle() -> None:
    """Once the caller drops a call's answer, its job and values are freed at once (by
    reference counting), not at the next garbage collection: a 200 MB result must not
    outlive the caller's last reference to it."""
    with anyio.fail_after(60):
        async with ashard.Pool(1) as pool:
            calls = {
                "shard_map": lambda: pool.shard_map(4, workloads.shard_sum),
                "shard_reduce": lambda: pool.shard_reduce(4, workloads.shard_sum, max),
                "map": lambda: pool.map(abs, range(-4, 4)),
            }
            for name, call in calls.items():
                gc.collect()
                gc.disable()
                try:
                    answer = await call()
                    del answer
                    if name == "map":
                        async with pool.shard_stream(4, workloads.shard_sum) as stream:
                            async for _ in stream:
                                pass
                        del stream
                    left = [o for o in gc.get_objects() if isinstance(o, ashard._job.Job)]
                    assert left == [], name
                finally:
                    gc.enable()

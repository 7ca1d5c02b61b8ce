"""A pool on a Dask cluster (`Pool(cluster=...)`): the same API and semantics as a
local pool, with real clusters — a `LocalCluster(processes=True)` for the session,
and `dask scheduler` / `dask worker` as separate processes where a test kills a whole
Dask worker or needs a broken one."""

from __future__ import annotations

import functools
import operator
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import psutil
import pytest

import ashard
import workloads
from ashard._backend import JobWork
from ashard._options import CallOptions
from daskcluster import CliCluster

distributed = pytest.importorskip("distributed")  # the test extra installs it

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="session")
def dask_cluster() -> Iterator[Any]:
    """Two Dask worker processes (one thread each) on 127.0.0.1, for the session. It
    loads what making a cluster pool loads (`Pool(cluster=...)` connects as it is
    made, a sync call by design), so that no test depends on one run before it."""
    import ashard._dask.backend
    import ashard._handle  # noqa: F401

    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        yield cluster


def _dask_worker_pids(cluster: Any) -> list[int]:
    with distributed.Client(cluster, set_as_default=False) as client:
        return list(client.run(os.getpid).values())


def _ashard_workers_under(pids: list[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                if "ashard._worker" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.NoSuchProcess:
                pass
    return found


async def test_results_seeds_map_call_and_hosts(dask_cluster: Any) -> None:
    async with ashard.Pool(cluster=dask_cluster) as pool:
        assert pool.workers == 2  # one ashard worker per Dask worker thread
        res = await pool.shard_map(12, workloads.random_draws, seed=7)
        assert await pool.map(workloads.square, range(50)) == [x * x for x in range(50)]
        assert await pool.call(workloads.square, 12) == 144
        ids = await pool.shard_map(range(10), workloads.shard_items)
        total = await pool.shard_reduce(ashard.shards(100, block_size=7), workloads.shard_sum,
                                        operator.add, ordered=True)  # fmt: skip
        assert total.value == sum(range(100))
    async with ashard.Pool(2) as local:
        here = await local.shard_map(12, workloads.random_draws, seed=7)
        ids_here = await local.shard_map(range(10), workloads.shard_items)
    assert [r[0] for r in res.results] == [r[0] for r in here.results]  # same shard.rng
    assert [list(i) for i in ids.results] == [list(i) for i in ids_here.results]
    assert sum(len(i) for i in ids.results) == 10
    table = res.diagnostics.shards_table()
    assert sorted(table.column("shard_id").to_pylist()) == list(range(len(res.results)))
    assert set(table.column("host").to_pylist()) == {"127.0.0.1"}
    assert len(res.diagnostics.per_worker) == len(res.diagnostics.workers) >= 1
    assert f"{len(res.results)} shards" in res.diagnostics.summary()


async def test_long_shards_of_a_list_reach_the_nodes_whole(
    dask_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Long shards, which the local scheduler sends a piece at a time, go to a Dask node
    whole: each shard's items are its slice of the list."""
    from ashard import _positions

    monkeypatch.setattr(_positions, "CUT_FROM", 100)  # shards of 375 items count as long
    data = [f"s{i}" for i in range(3000)]
    layout = ashard.shards(len(data))
    async with ashard.Pool(cluster=dask_cluster) as pool:
        res = await pool.shard_map(data, workloads.shard_items)
    assert res.results == [data[layout.where(k)] for k in range(len(layout))]


async def test_worker_output_reaches_the_callers_streams(dask_cluster: Any) -> None:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    async with ashard.Pool(cluster=dask_cluster) as pool:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            res = await pool.shard_map(6, workloads.print_then_sum, borrow={"X": np.ones(3)})
            await pool.call(print, "from a call")
    assert res.results == [3] * len(res.results)
    lines = out.getvalue().splitlines()
    for i in range(len(res.results)):
        assert f"line from shard {i} " + "x" * 200 in lines  # whole lines, each once
        assert f"err from shard {i}" in err.getvalue().splitlines()
    assert "from a call" in lines
    assert len(lines) == len(res.results) + 1


async def test_a_client_or_an_address_is_a_cluster_too(dask_cluster: Any) -> None:
    with distributed.Client(dask_cluster, set_as_default=False) as client:
        async with ashard.Pool(cluster=client) as pool:  # the pool never closes it
            assert await pool.map(workloads.square, range(5)) == [0, 1, 4, 9, 16]
        assert client.submit(sum, [2, 3]).result() == 5
    async with ashard.Pool(cluster=dask_cluster.scheduler_address) as pool:
        assert await pool.call(workloads.square, 6) == 36


async def test_timeouts_stop_shards_in_python_and_in_c(dask_cluster: Any) -> None:
    async with ashard.Pool(cluster=dask_cluster) as pool:
        for fn in (workloads.python_sleep, workloads.blocked_sleep):
            t0 = time.monotonic()
            res = await pool.shard_map(4, fn, timeout=0.5, max_retries=1, errors="collect")
            assert time.monotonic() - t0 < 20  # not the 60 s the shard sleeps
            assert [type(f) for f in res.failures] == [ashard.ShardTimeout]
            assert res.failures[0].shard is not None and res.failures[0].shard.id == 1
            assert res.failures[0].attempts == 2
            assert [res.results[i] for i in (0, 2, 3)] == [0, 2, 3]
            stack = res.failures[0].stack  # type: ignore[attr-defined]
            if fn is workloads.python_sleep:  # stopped in Python: where, from the node
                assert stack is not None and "python_sleep" in stack
            else:  # killed on its node: the node's dump does not travel to the caller yet
                assert stack is None
        assert await pool.call(workloads.square, 3) == 9  # the pool is still whole


async def test_worker_crash_retried_and_poison_shard_bounded(dask_cluster: Any) -> None:
    async with ashard.Pool(cluster=dask_cluster) as pool:
        res = await pool.shard_map(6, workloads.die_first_attempt, max_retries=2)
        assert res.results == [0, 10, 20, 30, 40, 50]
        assert res.diagnostics.crashes == 1 and res.diagnostics.retries == 1
        res = await pool.shard_map(6, workloads.die_always, max_retries=2, errors="collect")
        assert [type(f) for f in res.failures] == [ashard.WorkerCrashed]
        assert res.failures[0].attempts == 3  # bounded: max_retries + 1 runs
        assert res.results[:2] == [0, 10] and res.results[3:] == [30, 40, 50]


async def test_errors_keep_their_type_and_the_remote_traceback(dask_cluster: Any) -> None:
    async with ashard.Pool(cluster=dask_cluster) as pool:
        with pytest.raises(ashard.ShardMapError) as info:
            await pool.shard_map(6, workloads.fail_on)
        failure = info.value.exceptions[0]
        assert isinstance(failure, ashard.ShardFailed)
        assert isinstance(failure.__cause__, ValueError)
        assert "fail_on" in str(failure.__cause__.__cause__)  # the worker's traceback
        with pytest.raises(ZeroDivisionError) as call_info:
            await pool.call(divmod, 1, 0)
        assert "Traceback" in str(call_info.value.__cause__)
        with pytest.raises(TypeError, match="fn"):  # cannot be pickled: nothing runs
            await pool.shard_map(2, _Unpicklable())


async def test_error_rules_and_a_predicate_decide_in_the_caller(dask_cluster: Any) -> None:
    """The rules (a lambda predicate too, which the cluster could not unpickle) stay in
    the caller: skip, a retry with backoff and a named crash, as on a local pool."""
    plan = {1: ("ValueError", 0), 2: ("ConnectionError", 1), 3: ("sigkill", 0)}
    async with ashard.Pool(cluster=dask_cluster) as pool:
        res = await pool.shard_map(
            ashard.shards(5, block_size=1), workloads.raise_as_planned, borrow={"plan": plan},
            chunk_size=1, retry_errors=lambda exc: False, errors="collect",
            on_error={ValueError: "skip", ConnectionError: ashard.Retry(1, backoff=0.2),
                      ashard.WorkerCrashed: "raise"},
        )  # fmt: skip
    assert res.skipped == (1,) and res.results == [0, None, 20, None, 40]
    assert [(type(f), f.shard_id, f.attempts) for f in res.failures] == [
        (ashard.WorkerCrashed, 3, 1)
    ]
    assert res.diagnostics.error_retries == 1


async def test_stacks_of_busy_workers_on_every_node(dask_cluster: Any, tmp_path: Path) -> None:
    async with ashard.Pool(cluster=dask_cluster) as pool:
        result: list[Any] = []

        async def run() -> None:
            result.append(
                await pool.shard_map(
                    ashard.shards(1),
                    workloads.shard_waiting_here,
                    borrow={"directory": str(tmp_path)},
                )
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            with anyio.fail_after(30):
                while not (tmp_path / "started-0").exists():  # noqa: ASYNC110 (a worker writes it)
                    await anyio.sleep(0.01)
            stacks = await pool.stacks()
            (tmp_path / "release").touch()
    ((shard, text),) = stacks.values()
    assert shard == 0 and text is not None and "shard_waiting_here" in text
    assert result[0].results == ["0"] and result[0].diagnostics.retries == 0


async def test_hygiene_notes_come_back_from_the_nodes(dask_cluster: Any, tmp_path: Path) -> None:
    async with ashard.Pool(cluster=dask_cluster) as pool:
        with pytest.warns(ashard.HygieneWarning, match="ASHARD_TEST_LEFT"):
            res = await pool.shard_map(
                ashard.shards(1), workloads.change_process_state,
                borrow={"where": str(tmp_path)},
            )  # fmt: skip
        assert "os.environ['ASHARD_TEST_LEFT'] was set; restored" in res.diagnostics.hygiene[0]


async def test_async_shards_overlap_on_the_nodes_too(dask_cluster: Any) -> None:
    async with ashard.Pool(cluster=dask_cluster) as pool:
        t0 = time.monotonic()
        res = await pool.shard_map(ashard.shards(32, block_size=1), workloads.nap,
                                   borrow={"seconds": 0.5}, shard_concurrency=16)  # fmt: skip
        assert res.results == list(range(32)) and time.monotonic() - t0 < 5  # one at a time: 8
        res = await pool.shard_map(ashard.shards(12, block_size=1), workloads.nap_span,
                                   borrow={"fail": 7}, chunk_size=2, shard_concurrency=4,
                                   timeout=30, errors="collect")  # fmt: skip
        assert [f.shard_id for f in res.failures] == [7]
        spans = [v for v in res.results if v is not None]
        assert len(spans) == 11 and 2 < workloads.most_at_once(spans) <= 4  # chunks joined


class _Unpicklable:
    def __call__(self, shard: Any) -> None:
        pass

    def __reduce__(self) -> Any:
        raise TypeError("not for the wire")


async def test_out_buffers_are_refused_naming_out_and_cluster(dask_cluster: Any) -> None:
    async with ashard.Pool(cluster=dask_cluster) as pool:
        Y = ashard.buffer("f8", 4)
        with pytest.raises(ValueError, match=r"out=.*cluster="):
            await pool.shard_map(4, workloads.shard_sum_taking_any, out={"Y": Y})
        del Y
        assert await pool.map(workloads.square, [2]) == [4]  # nothing changed


async def test_table_sink_and_results_on_disk_exactly_once(
    dask_cluster: Any, tmp_path: Path
) -> None:
    from test_tables import assert_exactly_once

    layout = ashard.shards(24, block_size=4)
    async with ashard.Pool(cluster=dask_cluster) as pool:
        with ashard.table_sink(tmp_path / "rows") as sink:
            res = await pool.shard_map(layout, workloads.write_then, out={"rows": sink},
                                       max_retries=2)  # fmt: skip
            assert res.results == list(range(6))
            assert res.diagnostics.crashes == 1  # shard 1 died after writing, once
            assert_exactly_once(sink, set(range(6)), layout)
            assert set(sink.read().column("attempt").to_pylist()) == {1, 2}
        res = await pool.shard_map(layout, workloads.shard_sum, results="disk")
        with res:
            assert list(res.results) == [sum(s.idx) for s in layout]
            assert len(res.refs) == 6 and all(os.path.exists(r.path) for r in res.refs)
        big = await pool.call(np.ones, 300_000)  # 2.4 MB: back through Dask, whole
        assert big.shape == (300_000,) and float(big.sum()) == 300_000.0


async def test_a_sink_the_nodes_cannot_see_is_refused_naming_it(tmp_path: Path) -> None:
    import ashard._dask.node
    import ashard._dask.wire

    unseen = ashard._dask.node._unseen_places  # what each node checks when a call reaches it
    spec = JobWork(0, (b"", []), CallOptions(), None, [], {}, {}, None)
    assert await anyio.to_thread.run_sync(unseen, spec, "w") is None
    place = ashard._places.Place(str(tmp_path / "nowhere"))
    ref = ashard._protocol.SinkRef("sink", place, "parquet", None, "t")
    spec = JobWork(0, (b"", []), CallOptions(), None, [], {}, {"rows": ref}, None)
    error = await anyio.to_thread.run_sync(unseen, spec, "tcp://node:1")
    assert error is not None and "nowhere" in str(error) and "out['rows']" in str(error)


async def test_stream_early_exit_and_cancellation_stop_running_shards(
    dask_cluster: Any, tmp_path: Path
) -> None:
    async with ashard.Pool(cluster=dask_cluster) as pool:
        t0 = time.monotonic()
        with anyio.move_on_after(1.5):
            borrow = {"directory": str(tmp_path)}
            await pool.shard_map(4, workloads.shard_touch_sleep_touch, borrow=borrow)
        started = sorted(p.name for p in tmp_path.iterdir())
        assert started and all(n.startswith("started-") for n in started)
        # both slots are free again at once: the cancelled shards were interrupted
        with anyio.fail_after(10):
            assert await pool.map(workloads.square, [1, 2, 3]) == [1, 4, 9]
        async with pool.shard_stream(20, workloads.sleep_shard, ordered=True) as stream:
            async for done in stream:
                if done.shard.id == 2:
                    break
        assert await pool.call(workloads.square, 5) == 25
        await anyio.sleep(max(0.0, t0 + 5.5 - time.monotonic()))  # past the 5 s sleep
        assert not [p for p in tmp_path.iterdir() if p.name.startswith("done-")]


async def test_a_streamed_value_let_go_is_held_by_nothing_while_the_next_shard_runs(
    dask_cluster: Any, tmp_path: Path
) -> None:
    gate = str(tmp_path / "gate")  # the cluster's nodes are on this machine
    with anyio.fail_after(60):
        async with ashard.Pool(cluster=dask_cluster) as pool, pool.shard_stream(
            ashard.shards(2, block_size=1), workloads.shard_payload_past_gate,
            ordered=True, chunk_size=1, borrow={"gate": gate},
        ) as stream:  # fmt: skip
            await workloads.first_value_is_let_go(stream, gate)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # slow: one backend is enough here
async def test_borrow_is_held_once_per_node(dask_cluster: Any) -> None:
    X = np.random.default_rng(0).random(25_000_000)  # 200 MB
    dask_pids = _dask_worker_pids(dask_cluster)
    async with ashard.Pool(workers=2, cluster=dask_cluster) as pool:
        readings: list[int] = []

        async def measure() -> None:
            await anyio.sleep(2.0)
            for p in _ashard_workers_under(dask_pids):
                readings.append(p.memory_full_info().uss)

        async with anyio.create_task_group() as tg:
            tg.start_soon(measure)
            res = await pool.shard_map(8, workloads.borrowed_sum, borrow={"X": X, "hold": 3.0})
    assert res.results == [float(X[i::4096].sum()) for i in range(8)]
    assert len(readings) == 4  # 2 Dask workers x 2 ashard workers, all reading X
    assert sum(readings) < X.nbytes // 2, [r >> 20 for r in readings]  # shared, not copied


@pytest.mark.parametrize("size", [8, 300_000])  # pickled as it is / landed in shared memory
async def test_a_borrow_is_never_another_calls(dask_cluster: Any, size: int) -> None:
    """Same borrow name, other data: across calls, after the array changed in place,
    between two concurrent calls of one pool and between two pools on one cluster."""

    def expect(X: np.ndarray) -> list[tuple[float, tuple[int, ...]]]:
        return [(float(X.sum()), X.shape)] * 2

    fn = workloads.borrowed_total
    ones, other = np.ones(size), np.arange(size + 5, dtype=np.float64)
    async with (
        ashard.Pool(cluster=dask_cluster) as pool,
        ashard.Pool(cluster=dask_cluster) as pool2,
    ):
        assert (await pool.shard_map(2, fn, borrow={"X": ones})).results == expect(ones)
        assert (await pool.shard_map(2, fn, borrow={"X": other})).results == expect(other)
        ones *= 3  # in place: the next call must see the new values
        assert (await pool.shard_map(2, fn, borrow={"X": ones})).results == expect(ones)
        got: dict[str, list[Any]] = {}

        async def run(tag: str, p: ashard.Pool, X: np.ndarray) -> None:
            got[tag] = (await p.shard_map(2, fn, borrow={"X": X, "hold": 0.3})).results

        cases = [("a", pool, ones), ("b", pool, other), ("c", pool2, other * 7), ("d", pool2, ones)]
        async with anyio.create_task_group() as tg:
            for tag, p, X in cases:
                tg.start_soon(run, tag, p, X)
        assert got == {tag: expect(X) for tag, _, X in cases}


async def test_closing_leaves_the_cluster_usable_and_no_ashard_process(dask_cluster: Any) -> None:
    dask_pids = _dask_worker_pids(dask_cluster)
    async with ashard.Pool(cluster=dask_cluster) as pool:
        assert await pool.map(workloads.square, range(4)) == [0, 1, 4, 9]
        assert len(_ashard_workers_under(dask_pids)) == 2
    assert _ashard_workers_under(dask_pids) == []
    with distributed.Client(dask_cluster, set_as_default=False) as client:
        assert client.submit(sum, [1, 2]).result() == 3
        assert not [n for n in client.run(lambda dask_worker: list(dask_worker.plugins)).values()
                    for p in n if p.startswith("ashard")]  # fmt: skip


@pytest.mark.parametrize("anyio_backend", ["trio"])  # slow: trio, the bridged one
async def test_a_killed_dask_worker_loses_nothing(tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    with CliCluster(tmp_path, workers=2, nthreads=2) as cluster:
        async with ashard.Pool(cluster=cluster.address) as pool:
            assert pool.workers == 4

            async def kill_when_running() -> None:
                while not log.exists() or len(log.read_text().splitlines()) < 4:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
                cluster.kill_worker(0)

            async with anyio.create_task_group() as tg:
                tg.start_soon(kill_when_running)
                borrow = {"log": str(log), "seconds": 0.4}
                res = await pool.shard_map(ashard.shards(24, block_size=1), workloads.logged_sleep,
                                           borrow=borrow, max_retries=2, chunk_size=1)  # fmt: skip
            assert sorted(r[0] for r in res.results) == list(range(24))  # each once
            runs = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
            ran = {sid for sid, _, _ in runs}
            assert ran == set(range(24))
            rerun = {sid for sid, attempt, _ in runs if attempt > 1}
            assert rerun, "the killed node's shards ran again"
            assert res.diagnostics.crashes >= 1
            for sid in rerun:  # charged: the result is from its later run
                assert res.results[sid][1] > 1
            assert await pool.map(workloads.square, range(6)) == [0, 1, 4, 9, 16, 25]
        assert cluster.ashard_workers() == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_cluster_errors_say_what_to_do(tmp_path: Path, monkeypatch: Any) -> None:
    import ashard._dask.backend

    with pytest.raises(TypeError, match="cluster must be"):
        ashard.Pool(cluster=42)
    monkeypatch.setattr(ashard._dask.backend, "CONNECT_TIMEOUT", 1.0)
    with pytest.raises(ashard.WorkerStartError, match=r"tcp://127\.0\.0\.1:9"):
        async with ashard.Pool(cluster="tcp://127.0.0.1:9"):
            pass
    preload = tmp_path / "hide_ashard.py"
    preload.write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ashard' or name.startswith('ashard.'):\n"
        "            raise ModuleNotFoundError(\"No module named 'ashard'\", name='ashard')\n"
        "sys.meta_path.insert(0, Hide())\n"
    )
    with (
        CliCluster(tmp_path, workers=1, preload=str(preload)) as cluster,
        pytest.raises(ashard.WorkerStartError, match="cannot import ashard"),
    ):
        async with ashard.Pool(cluster=cluster.address):
            pass
    other = tmp_path / "other_version.py"
    other.write_text("import ashard._version\nashard._version.__version__ = '0.0.1-other'\n")
    with (
        CliCluster(tmp_path, workers=1, preload=str(other)) as cluster,
        pytest.raises(ashard.WorkerStartError, match="same version"),
    ):
        async with ashard.Pool(cluster=cluster.address):
            pass


async def test_a_large_map_reported_in_pieces_arrives_whole(dask_cluster: Any) -> None:
    """A worker reports a large chunk's values in several pieces; the node relays each."""
    n = 200_000
    async with ashard.Pool(cluster=dask_cluster) as pool:
        assert await pool.map(workloads.square, range(n)) == [x * x for x in range(n)]
        got = await pool.map(workloads.square, list(range(n)), chunk_size=n // 2)
        assert got == [x * x for x in range(n)]


async def test_footprint_is_refused_on_a_cluster_naming_it_and_cluster(dask_cluster: Any) -> None:
    async with ashard.Pool(cluster=dask_cluster) as pool:
        with pytest.raises(ValueError, match=r"footprint= .*cluster="):
            await pool.shard_map(4, workloads.shard_sum, footprint="10MB")
        assert await pool.map(workloads.square, [3]) == [9]  # nothing changed


async def test_min_workers_and_idle_timeout_apply_per_dask_worker(dask_cluster: Any) -> None:
    pids = await anyio.to_thread.run_sync(_dask_worker_pids, dask_cluster)
    with anyio.fail_after(90):
        async with ashard.Pool(
            cluster=dask_cluster, workers=2, min_workers=1, idle_timeout=0.3,
            health_check_interval=0.05,
        ) as pool:  # fmt: skip
            res = await pool.shard_map(
                ashard.shards(16, block_size=1), functools.partial(workloads.sleep_pid, seconds=0.2)
            )
            assert res.ok and len(set(res.results)) >= 3  # grew past one per node
            while len(await anyio.to_thread.run_sync(_ashard_workers_under, pids)) > 2:  # noqa: ASYNC110
                await anyio.sleep(0.05)
            await anyio.sleep(1.0)  # three idle timeouts more: one per node stays
            left = await anyio.to_thread.run_sync(_ashard_workers_under, pids)
            assert len(left) == 2
            assert {p.parent().pid for p in left if p.parent()} <= set(pids)
            assert (await pool.shard_map(2, workloads.pid_of)).ok


async def test_mem_pause_applies_per_dask_worker(dask_cluster: Any) -> None:
    """One ashard worker per Dask worker: the one holding memory over mem_pause is
    paused, so (every worker of its node paused) it is recycled at once, and gets no
    more work."""
    with anyio.fail_after(90):
        async with ashard.Pool(
            cluster=dask_cluster, workers=1, mem_cap="600MB", mem_pause=0.5,
            pause_timeout=600, health_check_interval=0.05, recycle=False,
        ) as pool:  # fmt: skip
            first = await pool.shard_map(1, functools.partial(workloads.hoard, mib=400))
            (hoarder,) = first.results
            res = await pool.shard_map(ashard.shards(8, block_size=1), workloads.pid_of)
            assert res.ok and hoarder not in res.results
            assert not psutil.pid_exists(hoarder) or psutil.Process(hoarder).status() == "zombie"

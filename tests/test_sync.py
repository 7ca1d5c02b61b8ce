"""`ashard.sync`: the same API for code without an event loop — in a script, from
several threads at once, inside a running event loop (a notebook cell without
`await`); streams iterated with `for`; Ctrl-C stops the work and the pool stays
usable."""

from __future__ import annotations

import asyncio
import functools
import gc
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

import ashard
import ashard.sync
import workloads

TESTS = str(Path(__file__).resolve().parent)


@pytest.fixture(autouse=True)
def sync_shutdown() -> Iterator[None]:
    yield
    ashard.sync.shutdown()


def _add(a: int, b: int) -> int:
    return a + b


def test_module_functions_block_and_return_what_the_async_api_does() -> None:
    layout = ashard.shards(40, block_size=4)
    res = ashard.sync.shard_map(layout, workloads.shard_sum, workers=2)
    assert isinstance(res, ashard.ShardResult) and res.ok
    assert res.results == [workloads.shard_sum(s) for s in layout]
    assert ashard.sync.map(workloads.square, range(10)) == [i * i for i in range(10)]
    assert ashard.sync.call(workloads.square, 7) == 49
    red = ashard.sync.shard_reduce(layout, workloads.shard_sum, _add, ordered=True)
    assert red.value == sum(range(40))
    assert ashard.sync.default_pool() is ashard.sync.default_pool()
    with pytest.raises(ashard.ShardMapError):
        ashard.sync.shard_map(6, workloads.fail_on)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        ashard.sync.shard_map(6, workloads.fail_on, bogus=1)  # type: ignore[call-arg]


def test_a_pool_with_its_methods_and_properties() -> None:
    with ashard.sync.Pool(2) as pool:
        assert len(pool.pids) == 2 and pool.workers == 2 and not pool.closed
        assert pool.call(workloads.square, 3) == 9
        assert pool.map(workloads.square, [1, 2]) == [1, 4]
        assert pool.shard_map(4, workloads.shard_sum).results == [
            workloads.shard_sum(s) for s in ashard.shards(4)
        ]
        assert pool.shard_reduce(4, workloads.shard_sum, _add).value == 6
        with pool.shard_stream(4, workloads.shard_sum) as stream:
            assert sorted(d.shard.id for d in stream) == list(range(len(ashard.shards(4))))
        assert pool.stats.started == 2
        assert "ashard.sync.Pool workers=2" in repr(pool)
    assert pool.closed


def test_several_threads_at_once() -> None:
    results: dict[int, list[int]] = {}

    def work(k: int) -> None:
        results[k] = ashard.sync.map(workloads.square, range(k, k + 20), chunk_size=3)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {k: [i * i for i in range(k, k + 20)] for k in range(6)}


def test_inside_a_running_event_loop_like_a_notebook_cell(monkeypatch: pytest.MonkeyPatch) -> None:
    """Allowed (a notebook cell without await does it on purpose), but said once per
    process: in a web handler it stalls every other request."""
    import trio

    async def cell() -> list[int]:
        return ashard.sync.map(workloads.square, range(5))  # blocks this loop, on purpose

    monkeypatch.setattr(ashard.sync, "_warned_in_loop", False)
    said = r"running asyncio event loop.*await ashard.shard_map"
    with pytest.warns(RuntimeWarning, match=said) as caught:
        assert asyncio.run(cell()) == [0, 1, 4, 9, 16]
    assert caught[0].filename == __file__  # the cell's line, not ashard's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert asyncio.run(cell()) == [0, 1, 4, 9, 16]  # once is enough
        assert ashard.sync.map(workloads.square, [3]) == [9]  # no loop: nothing to say
    monkeypatch.setattr(ashard.sync, "_warned_in_loop", False)
    with pytest.warns(RuntimeWarning, match="running trio event loop"):
        assert trio.run(cell) == [0, 1, 4, 9, 16]


def test_stream_with_for_and_leaving_early_stops_running_shards(tmp_path: Path) -> None:
    with ashard.sync.shard_stream(ashard.shards(8, block_size=1), workloads.shard_sum,
                                  ordered=True) as stream:  # fmt: skip
        assert [done.value for done in stream] == list(range(8))
    fn = functools.partial(workloads.shard_touch_sleep_touch, directory=str(tmp_path))
    t0 = time.monotonic()
    with ashard.sync.shard_stream(ashard.shards(4, block_size=1), fn, workers=2) as stream:
        pass  # nothing consumed: leaving stops the two running shards
    assert time.monotonic() - t0 < 4.0
    time.sleep(0.2)
    assert not list(tmp_path.glob("done-*"))
    with (
        pytest.raises(ashard.ShardMapError),
        ashard.sync.shard_stream(ashard.shards(6, block_size=1), workloads.fail_on) as stream,
    ):
        for _ in stream:
            pass
    with pytest.raises(TypeError, match="inside its with"):
        iter(ashard.sync.shard_stream(3, workloads.shard_sum))


SCRIPT = """
    import sys, time, ashard.sync
    sys.path.insert(0, {tests!r})
    import workloads

    try:
        ashard.sync.call(workloads.touch_sleep_touch, {started!r}, {finished!r}, 2.0)
        print("not interrupted", flush=True)
    except KeyboardInterrupt:
        print(f"interrupted at {{time.monotonic():.3f}}", flush=True)
    print("after", ashard.sync.call(abs, -5), flush=True)
    ashard.sync.shutdown()
"""


def test_ctrl_c_stops_a_sync_call_and_the_pool_stays_usable(tmp_path: Path) -> None:
    started, finished = tmp_path / "started", tmp_path / "finished"
    script = tmp_path / "caller.py"
    script.write_text(textwrap.dedent(SCRIPT).format(
        tests=TESTS, started=str(started), finished=str(finished)))  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert time.monotonic() < deadline, "the call never started"
            time.sleep(0.01)
        time.sleep(0.2)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    lines = out.splitlines() or [""]
    assert lines[0].startswith("interrupted at "), out + err
    assert float(lines[0].split()[-1]) - sent < 1.0
    assert lines[1:] == ["after 5"], out + err
    time.sleep(2.2)  # past the end of the sleep the call was stopped in
    assert not finished.exists(), "the interrupted call's work ran to its end"


def test_sync_from_ashards_own_loop_is_refused_not_a_deadlock() -> None:
    def combine(acc: int, value: int) -> int:
        return int(ashard.sync.call(abs, -value))  # runs on the loop thread: refused

    with pytest.raises(RuntimeError, match="own event loop thread"):
        ashard.sync.shard_reduce(ashard.shards(3, block_size=1), workloads.shard_sum, combine)
    assert ashard.sync.call(abs, -2) == 2  # the pool goes on


def test_a_streamed_value_let_go_is_held_by_nothing_while_the_next_shard_runs(
    tmp_path: Path,
) -> None:
    gate = str(tmp_path / "gate")
    with ashard.sync.shard_stream(
        ashard.shards(2, block_size=1), workloads.shard_payload_past_gate, workers=1,
        ordered=True, borrow={"gate": gate},
    ) as stream:  # fmt: skip
        dones = iter(stream)
        first = next(dones)
        ref = weakref.ref(first.value)
        del first
        gc.collect()
        assert ref() is None  # shard 1 still runs: nothing waiting for it holds shard 0's
        open(gate, "w").close()
        assert next(dones).value.n == 1

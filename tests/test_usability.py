"""What a user sees: the "ashard" logger's records, short reprs and HTML displays,
`shard.rng` without a seed, typing of `Shard`, and errors that say what to do."""

from __future__ import annotations

import functools
import logging
from typing import Any

import anyio
import numpy as np
import pytest

import ashard
import workloads

pytestmark = pytest.mark.anyio


async def test_the_logger_records_worker_events_with_their_attributes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ashard")
    with anyio.fail_after(60):
        async with ashard.Pool(2) as pool:
            fn = functools.partial(workloads.die_first_attempt, victim=1)
            res = await pool.shard_map(ashard.shards(3, block_size=1), fn, chunk_size=1)
            assert res.ok
            pids = set(pool.pids)
    records = [r for r in caplog.records if r.name == "ashard"]
    started = [r for r in records if r.getMessage().endswith("started")]
    ready = [r for r in records if r.getMessage().endswith("is ready")]
    assert len(started) >= 3 and len(ready) >= 3  # two, then a replacement
    assert all(isinstance(r.pid, int) and str(r.pid) in r.getMessage() for r in ready)
    (crash,) = [r for r in records if getattr(r, "reason", None) == "crashed"]
    assert (
        crash.levelno == logging.WARNING and crash.signal == 9 and "SIGKILL" in crash.getMessage()
    )
    (retry,) = [r for r in records if "will run again" in r.getMessage()]
    assert retry.levelno == logging.WARNING and retry.shard_id == 1 and retry.pid == crash.pid
    closed = [r for r in records if getattr(r, "reason", None) == "closed"]
    assert {r.pid for r in closed} == pids


def test_the_logger_is_silent_by_default() -> None:
    logger = logging.getLogger("ashard")
    assert any(isinstance(h, logging.NullHandler) for h in logger.handlers)
    assert logger.level == logging.NOTSET and logger.propagate


async def test_reprs_are_short_and_html_shows_the_counts() -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(2) as pool:
            res = await pool.shard_map(ashard.shards(10_000, block_size=1), workloads.shard_sum,
                                       errors="collect")  # fmt: skip
            red = await pool.shard_reduce(6, workloads.shard_sum, lambda a, b: a + b)
            for obj in (res, res.diagnostics, red, pool):
                text = repr(obj)
                assert len(text) < 300 and text.count("\n") <= 3, text
            assert "10,000 shards" in repr(res) and "ok" in repr(res)
            html = res._repr_html_()
            assert "<table>" in html and "10,000" in html and "failures" in html
            assert "retries" in res.diagnostics._repr_html_()
            assert "value" in red._repr_html_()
            assert "alive" in pool._repr_html_() and ">2<" in pool._repr_html_()
            summary = res.diagnostics.summary()
            assert f"on {len(res.diagnostics.per_worker)} worker processes" in summary


def _draws(shard: ashard.Shard) -> float:
    return float(shard.rng.random())


async def test_shard_rng_is_a_generator_without_a_seed() -> None:
    with anyio.fail_after(60):
        res = await ashard.shard_map(ashard.shards(6, block_size=1), _draws)
    assert len(set(res.results)) == 6  # fresh entropy per shard
    shard = ashard.shards(3)[0]
    assert isinstance(shard.rng, np.random.Generator) and shard.rng is shard.rng
    with pytest.raises(AttributeError, match="immutable"):
        shard.id = 5  # type: ignore[misc]


async def test_writing_to_a_borrowed_array_says_how_to_allow_it() -> None:
    with anyio.fail_after(60):
        res = await ashard.shard_map(2, workloads.write_borrowed, borrow={"X": np.zeros(10)},
                                     errors="collect")  # fmt: skip
    failure = res.failures[0]
    assert "cow='allow'" in failure.remote_traceback
    assert "'X'" in failure.remote_traceback


async def test_shards_table_has_a_row_per_run_and_the_timeline_draws_them(tmp_path: str) -> None:
    import os

    fn = functools.partial(workloads.die_first_attempt, victim=2)
    with anyio.fail_after(60):
        res = await ashard.shard_map(ashard.shards(6, block_size=1), fn, chunk_size=1, workers=2)
        failing = await ashard.shard_map(ashard.shards(4, block_size=1), workloads.fail_on,
                                         errors="collect")  # fmt: skip
        slow = functools.partial(workloads.python_sleep, victim=1)
        timed = await ashard.shard_map(ashard.shards(3, block_size=1), slow, timeout=0.5,
                                       max_retries=0, errors="collect", chunk_size=1)  # fmt: skip
    table = res.diagnostics.shards_table()
    assert table.column_names == ["shard_id", "attempt", "worker", "host", "start", "end",
                                  "outcome", "stack", "rule"]  # fmt: skip
    rows = table.to_pylist()
    assert len(rows) == 7  # six shards, one of them twice
    (crashed,) = [r for r in rows if r["outcome"] == "crashed"]
    assert crashed["shard_id"] == 2 and crashed["attempt"] == 1
    rerun = [r for r in rows if r["shard_id"] == 2 and r["outcome"] == "ok"]
    assert rerun[0]["attempt"] == 2 and rerun[0]["worker"] != crashed["worker"]
    assert all(0 <= r["start"] <= r["end"] <= res.diagnostics.duration + 0.01 for r in rows)
    assert {r["worker"] for r in rows} <= set(res.diagnostics.workers)
    assert [r["outcome"] for r in failing.diagnostics.shards_table().to_pylist()].count(
        "failed"
    ) == 1
    timed_rows = timed.diagnostics.shards_table().to_pylist()
    (stopped,) = [r for r in timed_rows if r["outcome"] == "timeout"]
    assert stopped["shard_id"] == 1 and "python_sleep" in stopped["stack"]
    assert all(r["stack"] is None for r in timed_rows if r is not stopped)

    page = res.diagnostics.timeline()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "</svg>" in page
    assert "src=" not in page and "href" not in page  # self-contained
    assert page.count("<rect") >= 7 and "attempt 2" in page and "crashed" in page
    path = os.path.join(tmp_path, "timeline.html")
    assert res.diagnostics.timeline(path) == path
    with open(path) as f:
        assert f.read() == page
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="matplotlib"):
            res.diagnostics.timeline(os.path.join(tmp_path, "t.png"))
    else:
        png = res.diagnostics.timeline(os.path.join(tmp_path, "t.png"))
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


async def test_a_traceback_shows_the_source_of_a_function_from_a_notebook_cell() -> None:
    import linecache

    cell = "/tmp/ipykernel_0/cell-7.py"  # as ipykernel names and registers its cells
    source = "def broken(x):\n    return x / 0  # the line to show\n"
    linecache.cache[cell] = (len(source), None, source.splitlines(True), cell)
    namespace: dict[str, object] = {}
    exec(compile(source, cell, "exec"), namespace)
    try:
        with anyio.fail_after(60):
            with pytest.raises(ZeroDivisionError) as info:
                await ashard.call(namespace["broken"], 1)
            res = await ashard.shard_map(2, namespace["broken"], errors="collect")
    finally:
        del linecache.cache[cell]
    text = str(info.value.__cause__)
    assert f'File "{cell}", line 2, in broken' in text
    assert "return x / 0  # the line to show" in text
    assert "return x / 0  # the line to show" in res.failures[0].remote_traceback


async def test_cells_with_the_same_code_each_show_their_own_name_and_lines() -> None:
    """Two cells whose functions compile to equal code (they differ in a comment only):
    code objects compare equal whatever their file, so anything remembered per code
    object must not hand one cell's name and lines to the other."""
    import linecache

    names = ["/tmp/ipykernel_0/cell-8.py", "/tmp/ipykernel_0/cell-9.py"]
    fns = []
    for k, cell in enumerate(names):
        source = f"def broken(x):\n    return x / 0  # the line of cell {k}\n"
        linecache.cache[cell] = (len(source), None, source.splitlines(True), cell)
        namespace: dict[str, object] = {}
        exec(compile(source, cell, "exec"), namespace)
        fns.append(namespace["broken"])
    assert fns[0].__code__ == fns[1].__code__  # type: ignore[attr-defined]
    try:
        with anyio.fail_after(60):
            texts = []
            for fn in fns:
                with pytest.raises(ZeroDivisionError) as info:
                    await ashard.call(fn, 1)
                texts.append(str(info.value.__cause__))
    finally:
        for cell in names:
            del linecache.cache[cell]
    for k, (cell, text) in enumerate(zip(names, texts, strict=True)):
        assert f'File "{cell}", line 2, in broken' in text
        assert f"return x / 0  # the line of cell {k}" in text


async def test_a_method_of_a_class_from_a_cell_runs_and_shows_its_lines() -> None:
    """A bound method (a classmethod, a partial of one) of a class defined in a notebook
    cell or a script travels by value, and its function's code gets its file name back
    in the worker as a plain function's does: a method cannot be given a code object,
    its function can (the worker failed to load the call before)."""
    import linecache

    cell = "/tmp/ipykernel_0/cell-10.py"
    source = (
        "class Scaler:\n"
        "    def __init__(self, k):\n"
        "        self.k = k\n"
        "\n"
        "    def scale(self, x):\n"
        "        return x * self.k / (x != 3)  # the line to show\n"
        "\n"
        "    @classmethod\n"
        "    def twice(cls, x):\n"
        "        return 2 * x\n"
    )
    linecache.cache[cell] = (len(source), None, source.splitlines(True), cell)
    namespace: dict[str, object] = {"__name__": "__main__"}  # as a cell's or a script's
    exec(compile(source, cell, "exec"), namespace)
    scaler = namespace["Scaler"](10)  # type: ignore[operator]
    try:
        with anyio.fail_after(60):
            assert await ashard.call(scaler.scale, 2) == 20
            assert await ashard.call(functools.partial(scaler.scale, 4)) == 40
            assert await ashard.call(namespace["Scaler"].twice, 4) == 8  # type: ignore[attr-defined]
            assert await ashard.map(scaler.scale, [1, 2]) == [10, 20]
            with pytest.raises(ZeroDivisionError) as info:
                await ashard.call(scaler.scale, 3)
    finally:
        del linecache.cache[cell]
    text = str(info.value.__cause__)
    assert f'File "{cell}", line 6, in scale' in text
    assert "return x * self.k / (x != 3)  # the line to show" in text


async def test_a_cached_function_from_a_cell_runs_with_a_cache_of_its_own() -> None:
    """A `functools.cache` / `lru_cache` function from a script or a notebook cell: its
    C wrapper pickles by name only, and a worker has no `__main__` to find it in. It
    travels by value and gets a cache of its own in the worker, with the same
    parameters, as a spawned `ProcessPoolExecutor` worker's (loky fails it). A
    recursive one calls its worker's cached self: fib(90) returns at once only so."""
    source = (
        "import functools\n"
        "\n"
        "@functools.cache\n"
        "def fib(n):\n"
        "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
        "\n"
        "@functools.lru_cache(maxsize=3, typed=True)\n"
        "def parameters(x):\n"
        "    return parameters.cache_parameters(), parameters.cache_info().currsize\n"
    )
    namespace: dict[str, Any] = {"__name__": "__main__"}  # as a cell's or a script's
    exec(compile(source, "/tmp/ipykernel_0/cell-11.py", "exec"), namespace)
    fib, parameters = namespace["fib"], namespace["parameters"]
    with anyio.fail_after(60):
        assert await ashard.call(fib, 90) == 2880067194370816120
        assert await ashard.map(fib, [10, 20]) == [55, 6765]
        assert await ashard.call(parameters, 1) == ({"maxsize": 3, "typed": True}, 0)


def test_a_traceback_names_the_script_and_shows_the_line(tmp_path: str) -> None:
    import os
    import subprocess
    import sys
    import textwrap

    script = os.path.join(tmp_path, "job.py")
    with open(script, "w") as f:
        f.write(
            textwrap.dedent("""
            import ashard.sync


            def broken(shard):
                return shard.id / 0  # the line to show


            res = ashard.sync.shard_map(2, broken, errors="collect")
            print(res.failures[0].remote_traceback)
            ashard.sync.shutdown()
        """)
        )
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f'File "{script}", line 6, in broken' in out.stdout, out.stdout
    assert "return shard.id / 0  # the line to show" in out.stdout


def test_progress_draws_a_bar_without_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from ashard._progress import Progress

    monkeypatch.setitem(sys.modules, "tqdm.std", None)  # as on a fresh install
    bar = Progress(200, "shards")
    assert bar._bar is None
    bar.done = 84
    line = bar.line()
    assert line.startswith("shards  42%|") and "| 84/200 [" in line and "shards/s]" in line
    assert line.count("#") == 10  # 42 % of a 24-character bar


def test_progress_outside_a_notebook_is_tqdms_text_bar_never_a_widget() -> None:
    import io

    import tqdm.std

    from ashard._progress import Progress

    bar = Progress(3, "shards", Progress.load())
    try:
        assert type(bar._bar) is tqdm.std.tqdm and bar._shown is None  # no ipywidgets needed
    finally:
        bar._bar.fp = io.StringIO()  # what it draws is not the test's output
        bar.close()


@pytest.mark.parametrize("tqdm", ["tqdm", "no tqdm"])
async def test_a_progress_bar_with_no_stderr_to_draw_on_never_fails_the_call(
    monkeypatch: pytest.MonkeyPatch, tqdm: str
) -> None:
    """Under pythonw or a service `sys.stderr` is None; a daemon may have closed it.
    The bar is not drawn, and the call goes on."""
    import io
    import sys

    if tqdm == "no tqdm":
        monkeypatch.setitem(sys.modules, "tqdm.std", None)
    closed = io.StringIO()
    closed.close()
    async with ashard.Pool(2) as pool:
        for stderr in (None, closed):
            monkeypatch.setattr(sys, "stderr", stderr)
            res = await pool.shard_map(ashard.shards(30, block_size=1), workloads.attempt_of,
                                       progress=True)  # fmt: skip
            monkeypatch.undo()
            assert res.results == [1] * 30


def test_a_sigkill_names_the_out_of_memory_killer_only_near_a_memory_limit() -> None:
    import signal

    from ashard._health import HealthPolicy
    from ashard._outcomes import describe_exit

    capped = HealthPolicy(mem_cap=100 << 20, hard_factor=1.5)  # hard cap 150 MiB
    assert capped.near_memory_limit(140 << 20) and not capped.near_memory_limit(50 << 20)
    assert not HealthPolicy().near_memory_limit(50 << 20)  # no cap: half the machine's RAM
    plain = describe_exit(7, None, signal.SIGKILL)
    assert plain == "worker 7 was killed by SIGKILL (from outside)"
    tight = describe_exit(7, None, signal.SIGKILL, memory_tight=True)
    assert "out-of-memory killer" in tight and "near the limit" in tight
    assert "sys.exit" not in describe_exit(7, 3, None)  # SystemExit in fn is a failure


async def test_messages_say_items_for_map_none_for_no_limit_and_the_nearest_option() -> None:
    async with ashard.Pool(1) as pool:
        with pytest.raises(ashard.ShardMapError, match=r"^1 item failed; first: item 1 "):
            await pool.map(workloads.fail_on_one, [0, 1, 2])
        res = await pool.shard_map(3, functools.partial(workloads.fail_on, bad=1),
                                   errors="collect")  # fmt: skip
        with pytest.raises(ashard.ShardMapError, match=r"^1 shard failed; first: shard 1 "):
            res.raise_for_failures()
        res = await pool.shard_map(ashard.shards(4, block_size=1), workloads.fail_odd,
                                   errors="collect")  # fmt: skip
        with pytest.raises(ashard.ShardMapError, match=r"^2 shards failed; first: shard 1 .*"
                           r"\(and 1 more\)"):  # fmt: skip
            res.raise_for_failures()
        with pytest.raises(ValueError, match=r"at most 1e\+08 seconds, got 1.*\(None: no limit\)"):
            await pool.map(abs, [1], timeout=1e10)
        with pytest.raises(TypeError, match=r"'max_retry': did you mean 'max_retries'\?"):
            await pool.shard_map(3, workloads.shard_sum, max_retry=2)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match=r"'chunksize': did you mean 'chunk_size'\?"):
            await pool.map(abs, [1], chunksize=2)  # type: ignore[call-arg]
    async with ashard.Pool(1) as pool:
        (pid,) = pool.pids
        res = await pool.shard_map(1, workloads.kill_self_shard, errors="collect", max_retries=0)
        message = str(res.failures[0])
        assert f"worker {pid} was killed by SIGKILL (from outside)" in message
        assert "out-of-memory" not in message  # a small worker: nothing suggests memory


async def test_counters_agree_and_say_what_they_count() -> None:
    """Two runs stopped by their timeout in Python (the worker lives on): the pool's
    `timed_out` and the call's `timeouts` both say 2; a crash replaced a worker, so the
    call ran on more worker processes than the pool's size, and the summary says so."""
    async with ashard.Pool(1) as pool:
        res = await pool.shard_map(
            3, workloads.python_sleep, timeout=0.3, max_retries=1, errors="collect"
        )
        assert res.diagnostics.timeouts == 2 and pool.stats.timed_out == 2
        assert pool.stats.crashed == 0 and len(pool.pids) == 1
        with pytest.raises(ashard.ShardTimeout):
            await pool.call(workloads.sleep_for, 60, timeout=0.3)
        assert pool.stats.timed_out == 3
        res = await pool.shard_map(ashard.shards(3, block_size=1), workloads.die_first_attempt)
        assert pool.stats.crashed == 1 == res.diagnostics.crashes
        assert len(res.diagnostics.workers) == 2  # the crashed one and its replacement
        assert "on 2 worker processes" in res.diagnostics.summary()


async def test_a_per_item_function_given_to_shard_map_gets_a_note_saying_so() -> None:
    async with ashard.Pool(1) as pool:
        res = await pool.shard_map([1, 2, 3], workloads.square, errors="collect")
        failure = res.failures[0]
        assert isinstance(failure.__cause__, TypeError)
        notes = "".join(getattr(failure.__cause__, "__notes__", []))
        assert "shard_map passes fn an ashard.Shard" in notes and "ashard.map(fn" in notes
        assert "ashard.map(fn" in failure.remote_traceback  # in the worker's traceback too
        res = await pool.shard_map(2, functools.partial(workloads.fail_on, bad=1),
                                   errors="collect")  # fmt: skip
        assert len(res.failures) == 1  # a ValueError of its own: no note
        assert not getattr(res.failures[0].__cause__, "__notes__", None)

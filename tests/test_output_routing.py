"""Worker output goes where the caller's output goes: every line a worker writes
(print, sys.stderr, a raw write to fd 1, C's printf) is written whole to `sys.stdout`
/ `sys.stderr` as the calling task sees them, in that task's context, by the time the
call returns — so `redirect_stdout` captures it, and two concurrent calls whose tasks
route output differently (as ipykernel does per cell) keep their lines apart."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import io
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import ashard
import ashard.sync
import workloads

pytestmark = pytest.mark.anyio

_cell: contextvars.ContextVar[list[str]] = contextvars.ContextVar("cell")


class PerTaskStream(io.TextIOBase):
    """Like ipykernel's stream: a write lands in the buffer of the context it is made
    in (one "cell" per task)."""

    def write(self, text: str) -> int:
        _cell.get().append(text)
        return len(text)


@contextlib.contextmanager
def routed(name: str) -> Iterator[None]:
    saved = getattr(sys, name)
    setattr(sys, name, PerTaskStream())
    try:
        yield
    finally:
        setattr(sys, name, saved)


def _lines(chunks: list[str], tag: str) -> list[str]:
    return sorted(line for line in "".join(chunks).splitlines() if line.startswith(tag))


def _expected(tag: str, kinds: tuple[str, ...], n: int) -> list[str]:
    return sorted(f"{tag} {kind} shard {i}" for kind in kinds for i in range(n))


async def test_redirect_stdout_captures_every_kind_of_worker_output() -> None:
    out, err = io.StringIO(), io.StringIO()
    fn = functools.partial(workloads.print_every_way, tag="T")
    with anyio.fail_after(60):
        async with ashard.Pool(2) as pool:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                res = await pool.shard_map(ashard.shards(6, block_size=1), fn)
                value = await pool.call(workloads.print_every_way, ashard.shards(1)[0], "C")
            # every line is in by the time the call returned
            assert res.ok and value == 0
    assert _lines([out.getvalue()], "T") == _expected("T", ("py", "raw", "c"), 6)
    assert _lines([err.getvalue()], "T") == _expected("T", ("err",), 6)
    assert _lines([out.getvalue()], "C") == _expected("C", ("py", "raw", "c"), 1)


@pytest.mark.parametrize("how", ["shard_map", "call"])
async def test_long_works_output_is_written_while_it_runs(tmp_path: Path, how: str) -> None:
    seen = anyio.Event()

    class Watched(io.StringIO):
        def write(self, text: str) -> int:
            written = super().write(text)
            if "still running" in self.getvalue():
                seen.set()
            return written

    out = Watched()
    flag = str(tmp_path / "go on")
    with anyio.fail_after(30), contextlib.redirect_stdout(out):  # the work waits 300 s
        async with ashard.Pool(1) as pool, anyio.create_task_group() as tg:
            if how == "shard_map":
                fn = functools.partial(workloads.print_then_wait, flag=flag, line="still running")
                tg.start_soon(functools.partial(pool.shard_map, 1, fn))
            else:
                tg.start_soon(pool.call, workloads.say_then_wait, flag, "still running")
            await seen.wait()  # written while the work waits for the flag
            Path(flag).touch()
    assert out.getvalue() == "still running\n"


def _bulk_shard(shard: ashard.Shard) -> int:
    return workloads.print_bulk(f"shard {shard.id}", 3_000)


async def test_a_jobs_output_is_read_before_its_pumping_tasks_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before the tasks that pump a job's output start (`PUMP_AFTER_SECONDS`), the
    job's drive reads what the worker prints: a shard printing more than a pipe holds
    is not left blocked until then (here: never)."""
    from ashard import _scheduler

    monkeypatch.setattr(_scheduler, "PUMP_AFTER_SECONDS", 1e6)
    buf = io.StringIO()
    with anyio.fail_after(60), contextlib.redirect_stdout(buf):
        async with ashard.Pool(1) as pool:
            result = await pool.shard_map(ashard.shards(2, block_size=1), _bulk_shard)
    assert result.results == [3_000, 3_000]
    lines = buf.getvalue().splitlines()
    for i in range(2):
        assert [line for line in lines if line.startswith(f"shard {i} ")] == [
            f"shard {i} {k:08d} ".ljust(99, "x") for k in range(3_000)
        ]


async def test_a_line_cut_short_by_a_workers_death_is_ended_where_it_stops() -> None:
    """What a dying worker wrote of a line is written, ended there: the next worker's
    lines (a call's, a retried shard's) start lines of their own, never glued to it."""
    buf = io.StringIO()
    with anyio.fail_after(60), contextlib.redirect_stdout(buf):
        async with ashard.Pool(1) as pool:
            with pytest.raises(ashard.WorkerCrashed):
                await pool.call(workloads.write_then_die, "cut sh")
            assert await pool.call(workloads.print_tagged, "next", 1) == 1
            result = await pool.shard_map(1, workloads.cut_short_first_attempt)
    assert result.results == [0]
    assert buf.getvalue().splitlines() == [
        "cut sh", "next py 1", "next raw 1", "cut sh", "attempt 2"
    ]  # fmt: skip


async def test_two_concurrent_calls_keep_their_lines_in_their_own_context() -> None:
    cells: dict[str, list[str]] = {"A": [], "B": []}

    async def run_in_cell(tag: str, pool: ashard.Pool) -> None:
        _cell.set(cells[tag])
        fn = functools.partial(workloads.print_every_way, tag=tag)
        await pool.shard_map(ashard.shards(8, block_size=1), fn, chunk_size=1)

    with anyio.fail_after(60), routed("stdout"), routed("stderr"):
        async with ashard.Pool(2) as pool, anyio.create_task_group() as tg:
            tg.start_soon(run_in_cell, "A", pool)
            tg.start_soon(run_in_cell, "B", pool)
    for tag, other in (("A", "B"), ("B", "A")):
        assert _lines(cells[tag], tag) == _expected(tag, ("py", "raw", "c", "err"), 8)
        assert _lines(cells[tag], other) == []
        for chunk in cells[tag]:  # lines stay whole: never a piece of one
            assert chunk.endswith("\n"), chunk


def test_sync_calls_write_in_the_calling_threads_context() -> None:
    chunks: list[str] = []
    _cell.set(chunks)
    try:
        with routed("stdout"), routed("stderr"):
            fn = functools.partial(workloads.print_every_way, tag="S")
            ashard.sync.shard_map(ashard.shards(3, block_size=1), fn)
    finally:
        ashard.sync.shutdown()
    assert _lines(chunks, "S") == _expected("S", ("py", "raw", "c", "err"), 3)


@pytest.mark.parametrize("capture_fd", [True, False])
def test_in_jupyter_output_goes_to_the_cell_that_launched_the_work(capture_fd: bool) -> None:
    """Cell A starts work in the background; cell B runs while the workers print: the
    lines belong to cell A, with ipykernel's fd capture on or off."""
    import time

    from jupyter_client.manager import start_new_kernel

    tests = str(__import__("pathlib").Path(__file__).resolve().parent)
    flag = f"--IPKernelApp.capture_fd_output={capture_fd}"
    km, kc = start_new_kernel(kernel_name="python3", cwd=tests, extra_arguments=[flag])
    try:
        run = kc.execute("import asyncio, ashard, workloads")
        a = kc.execute(
            "task = asyncio.ensure_future(ashard.shard_map(ashard.shards(2, block_size=1), "
            "workloads.sleep_then_print, workers=2))"
        )
        b = kc.execute("await asyncio.sleep(2.5); print('cell B')")
        c = kc.execute("print((await task).results); await ashard.shutdown()")
        texts: dict[str, str] = {run: "", a: "", b: "", c: ""}
        deadline = time.monotonic() + 60
        idle: set[str] = set()
        while idle != set(texts) and time.monotonic() < deadline:
            msg = kc.get_iopub_msg(timeout=60)
            parent = msg["parent_header"].get("msg_id")
            if parent in texts and msg["msg_type"] == "stream":
                texts[parent] += msg["content"]["text"]
            elif parent in texts and msg["msg_type"] == "error":
                texts[parent] += "ERROR " + msg["content"]["ename"]
            elif (
                parent in texts
                and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"
            ):
                idle.add(parent)
        assert sorted(texts[a].split("\n")[:-1]) == ["worker line 0", "worker line 1"], texts
        assert texts[b] == "cell B\n", texts
        assert texts[c].strip() == "[0, 1]", texts
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


async def test_an_init_printing_more_than_a_pipe_holds_starts_its_worker() -> None:
    """What `init` prints is read while the worker starts: an init that fills its
    stdout pipe does not hang the start (it did, for `START_TIMEOUT`); every line is
    written, in order."""
    buf = io.StringIO()
    init = functools.partial(workloads.print_bulk, "init", 5_000)  # 500 kB
    with anyio.fail_after(30), contextlib.redirect_stdout(buf):
        async with ashard.Pool(1, init=init) as pool:
            assert await pool.call(abs, -3) == 3
    expected = [f"init {i:08d} ".ljust(99, "x") for i in range(5_000)]
    assert buf.getvalue().splitlines() == expected

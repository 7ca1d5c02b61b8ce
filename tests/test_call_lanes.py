"""Calls queued on a busy worker (`ashard._lanes`): several short calls outstanding per
worker, each answered with its own value, output and errors; a cancelled queued call
never runs, a cancelled running call stops without touching the call behind it; a
worker's death or hang costs the call it ran and nothing else.

Most tests raise the short-call threshold (`_lanes.SHORT`) so that any call queues
behind a running one: the mechanics are the same for the microsecond calls that queue
by default, only slower to observe."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import io
import os
import pickle
import random
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import ashard
import workloads
from ashard import _lanes
from ashard._output import WorkerOutput, marker

pytestmark = pytest.mark.anyio


@pytest.fixture
def queue_anything(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(_lanes, "SHORT", 1e6)
    yield


async def _lanes_of(pool: ashard.Pool) -> Any:
    return (await pool.backend()).lanes  # type: ignore[attr-defined]


async def _until(check: Callable[[], bool]) -> None:
    """Poll `check` (state in the worker or a file: nothing to wait on)."""
    while not check():  # noqa: ASYNC110
        await anyio.sleep(0.01)


async def _record(
    outcomes: dict[str, Any], name: str, call: Awaitable[Any], errors: type[BaseException]
) -> None:
    """outcomes[name] = what `call` gives, or the `errors` it raises."""
    try:
        outcomes[name] = await call
    except errors as exc:
        outcomes[name] = exc


def _runs(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


async def test_many_short_calls_queue_on_busy_workers_and_each_gets_its_own_value() -> None:
    got: dict[int, Any] = {}

    async def caller(pool: ashard.Pool, start: int) -> None:
        for i in range(start, start + 50):
            got[i] = await pool.call(workloads.identity, i)

    with anyio.fail_after(60):
        async with ashard.Pool(2) as pool:
            async with anyio.create_task_group() as tg:
                for t in range(16):
                    tg.start_soon(caller, pool, t * 50)
            lanes = await _lanes_of(pool)
            assert lanes.deepest >= 2  # calls did queue
            assert lanes.outstanding() == 0
            assert pool.stats.crashed == 0
    assert got == {i: i for i in range(800)}


async def test_a_cancelled_queued_call_never_runs(queue_anything: None, tmp_path: Path) -> None:
    log = tmp_path / "runs"
    b_scope = anyio.CancelScope()

    async def call_b(pool: ashard.Pool) -> None:
        with b_scope:
            await pool.call(workloads.logged_call, str(log), "B")

    with anyio.fail_after(60):
        async with ashard.Pool(1) as pool:
            await pool.call(abs, -1)
            pids = pool.pids
            lanes = await _lanes_of(pool)
            async with anyio.create_task_group() as tg:
                tg.start_soon(pool.call, workloads.logged_call, str(log), "A", 0.5)
                await _until(lambda: lanes.outstanding() == 1)
                tg.start_soon(call_b, pool)
                await _until(lambda: lanes.outstanding() == 2)
                b_scope.cancel()
            assert await pool.call(workloads.logged_call, str(log), "C") == "C"
            assert _runs(log) == ["A", "C"]
            assert pool.pids == pids and pool.stats.crashed == 0


async def test_cancelling_the_running_call_leaves_the_queued_one_alone(
    queue_anything: None, tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    a_scope = anyio.CancelScope()
    results: list[str] = []

    async def call_a(pool: ashard.Pool) -> None:
        with a_scope:
            await pool.call(workloads.logged_call, str(log), "A", 30.0)

    async def call_b(pool: ashard.Pool) -> None:
        results.append(await pool.call(workloads.logged_call, str(log), "B"))

    with anyio.fail_after(20):
        async with ashard.Pool(1) as pool:
            await pool.call(abs, -1)
            pids = pool.pids
            lanes = await _lanes_of(pool)
            async with anyio.create_task_group() as tg:
                tg.start_soon(call_a, pool)
                await _until(lambda: _runs(log) == ["A"])
                tg.start_soon(call_b, pool)
                await _until(lambda: lanes.outstanding() == 2)
                a_scope.cancel()
            assert results == ["B"]
            assert _runs(log) == ["A", "B"]
            assert pool.pids == pids and pool.stats.crashed == 0  # interrupted, not killed


async def test_a_killed_worker_costs_the_running_call_only(
    queue_anything: None, tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    outcomes: dict[str, Any] = {}

    async def call(pool: ashard.Pool, tag: str, seconds: float) -> None:
        try:
            outcomes[tag] = await pool.call(workloads.logged_call, str(log), tag, seconds)
        except ashard.WorkerCrashed as exc:
            outcomes[tag] = exc

    with anyio.fail_after(60):
        async with ashard.Pool(1) as pool:
            await pool.call(abs, -1)
            (pid,) = pool.pids
            lanes = await _lanes_of(pool)
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, pool, "A", 30.0)
                await _until(lambda: _runs(log) == ["A"])
                for tag in "BCD":
                    tg.start_soon(call, pool, tag, 0.0)
                await _until(lambda: lanes.outstanding() == 4)
                os.kill(pid, signal.SIGKILL)
            assert isinstance(outcomes.pop("A"), ashard.WorkerCrashed)
            assert outcomes == {"B": "B", "C": "C", "D": "D"}
            assert sorted(_runs(log)) == ["A", "B", "C", "D"]  # each ran once
            assert pool.stats.crashed == 1


async def test_a_hung_call_times_out_and_the_queued_calls_run(queue_anything: None) -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(1) as pool:
            await pool.call(abs, -1)
            lanes = await _lanes_of(pool)
            outcomes: dict[str, Any] = {}

            async def hang() -> None:
                with pytest.raises(ashard.ShardTimeout):
                    await pool.call(workloads.sleep_deaf, 30.0, timeout=0.3)
                outcomes["hang"] = "timed out"

            async def after(k: int) -> None:
                outcomes[f"after {k}"] = await pool.call(abs, -k)

            async with anyio.create_task_group() as tg:
                tg.start_soon(hang)
                await _until(lambda: lanes.outstanding() == 1)
                for k in (1, 2):
                    tg.start_soon(after, k)
                await _until(lambda: lanes.outstanding() == 3)
            assert outcomes == {"hang": "timed out", "after 1": 1, "after 2": 2}
            assert pool.stats.timed_out == 1


async def test_a_queued_call_that_cannot_be_loaded_fails_alone(queue_anything: None) -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(1) as pool:
            await pool.call(abs, -1)
            lanes = await _lanes_of(pool)
            outcomes: dict[str, Any] = {}

            def run(name: str, fn: Any, *args: Any) -> None:
                tg.start_soon(_record, outcomes, name, pool.call(fn, *args), pickle.UnpicklingError)

            async with anyio.create_task_group() as tg:
                run("slow", workloads.sleep_for, 0.5)
                await _until(lambda: lanes.outstanding() == 1)
                run("bad", workloads.identity, workloads.RebuildFails())
                await _until(lambda: lanes.outstanding() == 2)
                run("fine", workloads.identity, 3)
            assert outcomes["slow"] == 0.5 and outcomes["fine"] == 3
            assert isinstance(outcomes["bad"], pickle.UnpicklingError)
            assert pool.stats.crashed == 0


async def test_queued_calls_respect_max_tasks(queue_anything: None) -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(1, max_tasks=2) as pool:
            pids: list[int] = []

            async def run() -> None:
                pids.append(await pool.call(os.getpid))

            async with anyio.create_task_group() as tg:
                for _ in range(9):
                    tg.start_soon(run)
    assert len(pids) == 9
    assert max(pids.count(pid) for pid in set(pids)) <= 2


_cell: contextvars.ContextVar[list[str]] = contextvars.ContextVar("cell")


class _PerTaskStream(io.TextIOBase):
    def write(self, text: str) -> int:
        _cell.get().append(text)
        return len(text)


async def _in_cells(
    workers: int,
    cells: dict[str, list[str]],
    body: Callable[[ashard.Pool, str], Awaitable[None]],
) -> None:
    """`body(pool, tag)` for every cell at once, each in its own cell's context, on a
    warm pool whose calls queue (checked: they did)."""

    async def cell(pool: ashard.Pool, tag: str) -> None:
        _cell.set(cells[tag])
        await body(pool, tag)

    with anyio.fail_after(60):
        async with ashard.Pool(workers) as pool:
            await pool.call(abs, -1)
            async with anyio.create_task_group() as tg:
                for tag in cells:
                    tg.start_soon(cell, pool, tag)
            assert (await _lanes_of(pool)).deepest >= 2


async def test_queued_calls_keep_their_output_in_their_own_context(
    queue_anything: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    cells: dict[str, list[str]] = {tag: [] for tag in "ABCDEFGH"}

    async def calls(pool: ashard.Pool, tag: str) -> None:
        for k in range(10):
            assert await pool.call(workloads.print_tagged, tag, k) == k
            # every line of the call is in by the time it returned
            assert f"{tag} raw {k}\n" in "".join(cells[tag])

    monkeypatch.setattr(sys, "stdout", _PerTaskStream())
    await _in_cells(2, cells, calls)
    for tag, chunks in cells.items():
        lines = "".join(chunks).splitlines()
        assert sorted(lines) == sorted(
            f"{tag} {how} {k}" for how in ("py", "raw") for k in range(10)
        )


def _bulk_lines(tag: str, lines: int) -> list[str]:
    return [f"{tag} {i:08d} ".ljust(99, "x") for i in range(lines)]


async def test_a_call_printing_more_than_a_pipe_holds_is_answered_with_every_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker blocked on a full stdout pipe is read while its call runs: the call
    is answered (it hung before), with all its 2 MB of lines in order."""
    cell: list[str] = []
    _cell.set(cell)
    monkeypatch.setattr(sys, "stdout", _PerTaskStream())
    with anyio.fail_after(60):
        async with ashard.Pool(1) as pool:
            assert await pool.call(workloads.print_bulk, "A", 20_000) == 20_000
    assert "".join(cell).splitlines() == _bulk_lines("A", 20_000)


async def test_queued_calls_printing_more_than_a_pipe_holds_each_get_their_own(
    queue_anything: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls queued on one worker, each printing several pipes' worth while the others
    wait: read early, every line still goes to its own call's context, in order."""
    cells: dict[str, list[str]] = {tag: [] for tag in "ABCD"}

    async def calls(pool: ashard.Pool, tag: str) -> None:
        for _ in range(2):
            assert await pool.call(workloads.print_bulk, tag, 3_000) == 3_000

    monkeypatch.setattr(sys, "stdout", _PerTaskStream())
    await _in_cells(1, cells, calls)
    for tag, chunks in cells.items():
        assert "".join(chunks).splitlines() == _bulk_lines(tag, 3_000) * 2


async def test_cancelled_calls_lines_never_land_in_another_calls_context(
    queue_anything: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Printing calls queued on two workers, cancelled at random moments (before they
    start, as they run, as they answer): every line goes to the context of the call
    that printed it, in order, and a call that was not cancelled gets all of its
    lines. (A cancelled call's lines went to whichever call's task read its answer.)"""
    monkeypatch.setattr(sys, "stdout", _PerTaskStream())
    rng = random.Random(2026)
    records: list[tuple[str, int, list[str], bool]] = []

    async def caller(pool: ashard.Pool, t: int) -> None:
        for k in range(8):
            tag, mine = f"{t}.{k}", []
            _cell.set(mine)
            n = rng.choice([0, 10, 300, 1_000])
            with anyio.move_on_after(rng.choice([0.001, 0.003, 0.01, 0.03, 60])) as scope:
                assert await pool.call(workloads.print_bulk, tag, n) == n
            records.append((tag, n, mine, not scope.cancelled_caught))

    with anyio.fail_after(120):
        async with ashard.Pool(2) as pool, anyio.create_task_group() as tg:
            for t in range(8):
                tg.start_soon(caller, pool, t)
    assert {done for *_, done in records} == {True, False}
    for tag, n, mine, done in records:
        lines, want = "".join(mine).splitlines(), _bulk_lines(tag, n)
        assert lines == (want if done else want[: len(lines)]), tag


async def test_workers_killed_under_queued_printing_calls_cost_no_line_its_place(
    queue_anything: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers SIGKILLed from outside every 50-200 ms while printing calls queue on them
    and callers give up at random: a call that returns has its value and every line of
    its own; one that crashed or was cancelled has a first part of its lines; no line
    lands in another call's context."""
    monkeypatch.setattr(sys, "stdout", _PerTaskStream())
    rng = random.Random(7)
    records: list[tuple[str, int, list[str], bool]] = []

    async def caller(pool: ashard.Pool, t: int) -> None:
        for k in range(25):
            tag, mine = f"{t}.{k}", []
            _cell.set(mine)
            n = rng.choice([0, 10, 300, 1_000])
            done = False
            with anyio.move_on_after(rng.choice([0.003, 0.02, 60, 60])):
                try:
                    assert await pool.call(workloads.print_bulk, tag, n) == n
                    done = True
                except (ashard.WorkerCrashed, ashard.WorkerStartError):
                    pass
            records.append((tag, n, mine, done))

    async def killer(pool: ashard.Pool) -> None:
        while True:
            await anyio.sleep(rng.uniform(0.05, 0.2))
            with contextlib.suppress(ProcessLookupError, IndexError):
                os.kill(rng.choice(pool.pids), signal.SIGKILL)

    with anyio.fail_after(120):
        async with ashard.Pool(2) as pool, anyio.create_task_group() as tg:
            tg.start_soon(killer, pool)
            async with anyio.create_task_group() as callers:
                for t in range(8):
                    callers.start_soon(caller, pool, t)
            tg.cancel_scope.cancel()
    assert any(done for *_, done in records)
    for tag, n, mine, done in records:
        lines, want = "".join(mine).splitlines(), _bulk_lines(tag, n)
        assert lines == (want if done else want[: len(lines)]), tag


def test_a_marker_read_alone_still_starts_its_calls_output() -> None:
    """The marker of the next call may be the last thing one read finds: what comes
    after it in a later read is still that call's, not the call before's."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    with os.fdopen(out_r, "rb") as stdout, os.fdopen(err_r, "rb") as stderr:
        output = WorkerOutput(stdout, stderr)
        os.write(out_w, b"first\n" + marker(8))
        output.pull()
        assert output.take(7) == [("stdout", b"first\n")]
        os.write(out_w, b"second\n" + marker(9) + b"third\n")
        output.pull()
        assert output.take(8) == [("stdout", b"second\n")]
        output.pull()
        assert output.take(9) == [("stdout", b"third\n")]
        os.close(out_w)
        os.close(err_w)
        output.close()


def test_calls_that_print_nothing_leave_only_their_markers_and_hand_on_the_rest() -> None:
    """A read that is exactly one marker (the call before printed nothing) starts the
    next call's output all the same, on stdout and stderr alike."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    with os.fdopen(out_r, "rb") as stdout, os.fdopen(err_r, "rb") as stderr:
        output = WorkerOutput(stdout, stderr)
        for fd in (out_w, err_w):
            os.write(fd, marker(2))
        output.pull()
        assert output.take(1) == []
        for fd in (out_w, err_w):
            os.write(fd, marker(3))
        output.pull()
        assert output.take(2) == []
        os.write(out_w, b"three says\n")
        os.write(err_w, b"three warns\n")
        for fd in (out_w, err_w):
            os.write(fd, marker(4))
        output.pull()
        assert output.take(3) == [("stdout", b"three says\n"), ("stderr", b"three warns\n")]
        os.write(out_w, b"four\n")
        output.pull()
        assert output.take(4) == [("stdout", b"four\n")]
        os.close(out_w)
        os.close(err_w)
        output.close()


def test_what_is_drained_at_the_end_never_carries_a_marker() -> None:
    """A lost worker's pipes are drained whole at the end: the markers of the calls it
    held are taken out, not written as output."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    with os.fdopen(out_r, "rb") as stdout, os.fdopen(err_r, "rb") as stderr:
        output = WorkerOutput(stdout, stderr)
        os.write(out_w, b"before\n" + marker(5) + b"after")
        os.close(out_w)
        os.close(err_w)
        written = io.StringIO()
        with contextlib.redirect_stdout(written):
            output.close()
    assert written.getvalue() == "before\nafter"


def test_a_running_calls_whole_lines_are_handed_out_early_and_the_rest_kept() -> None:
    """`take_lines` gives the running call its whole lines so far; the piece of a line
    and what later calls printed stay for `take`."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    with os.fdopen(out_r, "rb") as stdout, os.fdopen(err_r, "rb") as stderr:
        output = WorkerOutput(stdout, stderr)
        os.write(out_w, b"one\ntw")
        assert output.pull()
        assert output.take_lines(1) == [("stdout", b"one\n")]
        os.write(out_w, b"o\n" + marker(2) + b"next\n")
        output.pull()
        assert output.take_lines(1) == [("stdout", b"two\n")]
        assert output.take(1) == []
        assert output.take(2) == [("stdout", b"next\n")]
        assert not output.pull()
        os.close(out_w)
        os.close(err_w)
        output.close()


async def test_a_queued_calls_timeout_counts_from_its_own_start(queue_anything: None) -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(1) as pool:
            await pool.call(abs, -1)
            lanes = await _lanes_of(pool)
            got: dict[str, Any] = {}

            async def run(name: str, *args: Any, **kwargs: Any) -> None:
                got[name] = await pool.call(workloads.sleep_for, *args, **kwargs)

            async with anyio.create_task_group() as tg:
                tg.start_soon(run, "first", 2.0)
                await _until(lambda: lanes.outstanding() == 1)
                # queued behind a 2 s call, it needs 0.1 s of its 0.6 s (+ 0.5 s of
                # grace before the parent would kill): counted from when it was sent,
                # it would be killed long before it starts
                tg.start_soon(functools.partial(run, "queued", 0.1, timeout=0.6))
                await _until(lambda: lanes.outstanding() == 2)
            assert got == {"first": 2.0, "queued": 0.1}
            assert pool.stats.timed_out == 0


async def test_closing_the_pool_ends_queued_calls(queue_anything: None) -> None:
    errors: list[BaseException] = []

    async def run(pool: ashard.Pool, seconds: float) -> None:
        try:
            await pool.call(workloads.sleep_for, seconds)
        except (ashard.WorkerCrashed, RuntimeError) as exc:
            errors.append(exc)

    with anyio.fail_after(30):
        pool = ashard.Pool(1)
        await pool.start()
        await pool.call(abs, -1)
        lanes = await _lanes_of(pool)
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, pool, 20.0)
            await _until(lambda: lanes.outstanding() == 1)
            for _ in range(3):
                tg.start_soon(run, pool, 0.0)
            await _until(lambda: lanes.outstanding() == 4)
            await pool.aclose()
    assert len(errors) == 4


async def test_calls_cancelled_at_random_moments_leave_the_pool_sound() -> None:
    """Callers that give up at any moment (before the send, queued, running, as their
    answer arrives): every call that was not cancelled gets its own value, no worker is
    lost, and the pool serves the next calls."""
    rng = random.Random(23)
    got: list[tuple[int, Any]] = []

    async def caller(pool: ashard.Pool, start: int) -> None:
        for i in range(start, start + 40):
            seconds = rng.choice([0.0, 0.0, 0.0005, 0.002])
            with anyio.move_on_after(rng.choice([1e-5, 1e-4, 5e-4, 2e-3, 10.0])):
                got.append((i, await pool.call(workloads.sleep_then, seconds, i)))

    with anyio.fail_after(60):
        async with ashard.Pool(2) as pool:
            async with anyio.create_task_group() as tg:
                for t in range(16):
                    tg.start_soon(caller, pool, t * 40)
            assert all(value == i for i, value in got)
            assert len(got) > 100  # most calls had time enough
            assert (await _lanes_of(pool)).outstanding() == 0
            assert pool.stats.crashed == 0
            values = [await pool.call(workloads.identity, k) for k in range(4)]
            assert values == list(range(4))


async def test_workers_killed_at_random_moments_lose_no_call() -> None:
    """SIGKILL a random worker every 50 ms while 16 tasks make short calls (queued on
    the workers): every call still returns its own value (the running one is retried
    under `max_retries`, the queued ones are sent again), and the pool is whole after."""
    rng = random.Random(24)
    got: dict[int, Any] = {}

    async def caller(pool: ashard.Pool, start: int) -> None:
        for i in range(start, start + 25):
            got[i] = await pool.call(workloads.sleep_then, 0.001, i, max_retries=5)

    async def killer(pool: ashard.Pool) -> None:
        for _ in range(8):
            await anyio.sleep(0.05)
            if pool.pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rng.choice(pool.pids), signal.SIGKILL)

    with anyio.fail_after(120):
        async with ashard.Pool(2) as pool:
            async with anyio.create_task_group() as tg:
                tg.start_soon(killer, pool)
                for t in range(16):
                    tg.start_soon(caller, pool, t * 25)
            assert got == {i: i for i in range(400)}
            assert pool.stats.crashed >= 1
            assert (await _lanes_of(pool)).outstanding() == 0
            assert await pool.call(workloads.identity, 7) == 7


@pytest.mark.parametrize("kind", ["garbage", "stale-result", "unknown-message"])
async def test_a_worker_that_breaks_the_protocol_costs_only_its_running_call(
    queue_anything: None, tmp_path: Path, kind: str
) -> None:
    """A call that writes hostile bytes into the channel while calls wait behind it:
    the worker is killed, that call fails as a crash, and the queued ones run elsewhere."""
    armed = tmp_path / "armed"
    armed.touch()
    with anyio.fail_after(60):
        async with ashard.Pool(1) as pool:
            await pool.call(abs, -1)
            lanes = await _lanes_of(pool)
            got: dict[str, Any] = {}

            def run(name: str, fn: Any, *args: Any) -> None:
                tg.start_soon(_record, got, name, pool.call(fn, *args), ashard.WorkerCrashed)

            async with anyio.create_task_group() as tg:
                run("hostile", workloads.call_writing_hostile_once, str(armed), kind, 0.3, "h")
                await _until(lambda: lanes.outstanding() == 1)
                for k in range(3):
                    run(f"queued {k}", workloads.identity, k)
                await _until(lambda: lanes.outstanding() == 4)
            assert isinstance(got.pop("hostile"), ashard.WorkerCrashed)
            assert got == {f"queued {k}": k for k in range(3)}
            assert pool.stats.crashed == 1

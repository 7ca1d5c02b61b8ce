"""Hygiene between tasks (DESIGN 2.6): `Pool(hygiene="check" | "recycle" | "off")` puts
back what a shard changed in its worker's process-wide state, reports what it cannot,
and (recycle) replaces a worker that left threads, processes or descriptors behind.
Real workers, asyncio and trio."""

from __future__ import annotations

import contextlib
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import anyio
import pytest

import ashard
import workloads

pytestmark = pytest.mark.anyio

TWO = ashard.shards(2, block_size=1)


@pytest.fixture(autouse=True)
def _kept_env() -> Any:
    os.environ["ASHARD_TEST_KEPT"] = "here"  # workers inherit it: shard 0 removes it
    yield
    del os.environ["ASHARD_TEST_KEPT"]


async def test_what_a_shard_changes_is_put_back_before_the_next(tmp_path: Path) -> None:
    async with ashard.Pool(1) as pool:
        with pytest.warns(ashard.HygieneWarning, match="shard 0 changed its worker") as caught:
            res = await pool.shard_map(
                TWO, workloads.state_after, borrow={"where": str(tmp_path)}, chunk_size=1
            )
        assert len(caught) == 1  # one warning per call
        assert caught[0].filename == __file__  # the caller's line, not ashard's
        seen = res.results[1]
        clean = await pool.call(workloads.process_state)
        notes = res.diagnostics.hygiene[0]
        for stack_needed in (
            "os.environ['ASHARD_TEST_LEFT'] was set; restored",
            "os.environ['ASHARD_TEST_KEPT'] was removed; restored",
            f"the working directory was changed to {str(tmp_path)!r}; restored",
            "sys.path was changed; restored",
            "the warnings filters were changed; restored",
            "the root logger's handlers were changed; restored",
            "the root logger's level was changed; restored",
            "the handler of SIGTERM was changed; restored",
            "the handler of SIGALRM was changed; restored",
            "the handler of SIGUSR2 was changed; restored",
            "random.seed or random.setstate was called; the random module was reseeded from "
            "fresh entropy",
        ):
            assert stack_needed in notes
        assert list(res.diagnostics.hygiene) == [0]
        assert seen["left"] is None and seen["kept"] == "here"
        assert seen["cwd"] == clean["cwd"] != str(tmp_path)
        assert not seen["nowhere"] and seen["sigterm"]
        assert (seen["filters"], seen["handlers"], seen["level"]) == (
            clean["filters"], clean["handlers"], clean["level"],
        )  # fmt: skip
        import random

        assert seen["draw"] != random.Random(42).random()  # not left seeded
        # ashard's own handlers came back: a timeout still stops a shard, stacks answer
        res = await pool.shard_map(
            2, workloads.python_sleep, timeout=0.5, max_retries=0, errors="collect"
        )
        assert [type(f) for f in res.failures] == [ashard.ShardTimeout]
        assert "python_sleep" in (res.failures[0].stack or "")  # type: ignore[attr-defined]
        assert seen["pid"] == clean["pid"]  # check: the worker stays


async def test_settings_a_later_shard_would_compute_under_are_put_back() -> None:
    """decimal's precision and traps, numpy's error handling and print options, the
    umask, socket's timeout, the time zone (TZ with `time.tzset()`), the garbage
    collector and the locale: what one shard set, the next shard of its worker does not
    compute or write under (it would give other results by where it ran)."""
    import time

    async with ashard.Pool(1) as pool:
        ctype = await pool.call(workloads.locale_ctype)
        with pytest.warns(ashard.HygieneWarning, match="shard 0 changed its worker"):
            res = await pool.shard_map(TWO, workloads.settings_after, chunk_size=1)
        seen = res.results[1]
        notes = res.diagnostics.hygiene[0]
    assert seen["third"] == "0.3333333333333333333333333333"  # 28 digits, no trap
    assert seen["divide"] == "warn" and seen["printed"] == "[0.33333333]"
    assert seen["umask"] == os.umask(os.umask(0o022)) and seen["timeout"] is None
    assert seen["zone"] == time.tzname and seen["gc"] and seen["ctype"] == ctype
    for note in (
        "os.environ['TZ'] was set; restored",
        "the umask was changed to 077; restored",
        "decimal's context (precision, rounding, traps) was changed; restored",
        "numpy's floating-point error handling (numpy.seterr) was changed; restored",
        "numpy's print options was changed; restored",
        "socket's default timeout was changed; restored",
        "the garbage collector's switch or thresholds was changed; restored",
        "the locale was changed; restored",
    ):
        assert note in notes


async def test_what_cannot_be_put_back_is_reported_and_recycle_replaces(tmp_path: Path) -> None:
    try:
        for mode in ("check", "recycle"):
            async with ashard.Pool(1, hygiene=mode) as pool:
                with pytest.warns(ashard.HygieneWarning, match="left running"):
                    res = await pool.shard_map(
                        TWO, workloads.leave_things_behind, chunk_size=1,
                        borrow={"directory": str(tmp_path)},
                    )  # fmt: skip
                notes = "\n".join(res.diagnostics.hygiene[0])
                assert "a non-daemon thread 'left-behind' was left running" in notes
                assert "child process" in notes and "(sleep 30) was left running" in notes
                assert "open-file) was left open" in notes
                assert "socket" not in notes  # the worker's own channel sits above it
                after = await pool.call(os.getpid)
                if mode == "check":
                    assert res.results[1] == res.results[0] == after
                    assert pool.stats.recycled_by.get("hygiene", 0) == 0
                else:
                    assert after != res.results[0]  # replaced once its chunk was done
                    assert pool.stats.recycled_by["hygiene"] >= 1
    finally:
        (tmp_path / "stop").touch()
        for line in (tmp_path / "child").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line), signal.SIGKILL)


async def test_the_worker_loops_own_executor_thread_is_not_left_behind() -> None:
    """`asyncio.to_thread` in an `async def` shard starts a thread of the worker loop's
    executor, which stays, idle, for the next: the loop's, not the shard's doing. A
    thread the shard leaves running is still named (the test above)."""
    with anyio.fail_after(60):
        async with ashard.Pool(1, hygiene="recycle") as pool:
            pid = pool.pids or [await pool.call(os.getpid)]
            with warnings.catch_warnings():
                warnings.simplefilter("error", ashard.HygieneWarning)
                res = await pool.shard_map(ashard.shards(6, block_size=1),
                                           workloads.sum_in_a_thread, chunk_size=1)  # fmt: skip
            assert res.results == [s.idx.start for s in ashard.shards(6, block_size=1)]
            assert res.diagnostics.hygiene == {}
            assert pool.pids == pid  # not recycled


async def test_a_task_an_async_shard_leaves_pending_is_named_and_recycle_replaces() -> None:
    """A task an ``async def`` shard starts and never awaits stays on the worker's loop
    and runs again during its next ``async def`` task: named once, as a thread is."""
    with anyio.fail_after(60):
        for mode in ("check", "recycle"):
            async with ashard.Pool(1, hygiene=mode) as pool:
                with pytest.warns(ashard.HygieneWarning, match="left running") as caught:
                    res = await pool.shard_map(ashard.shards(3, block_size=1),
                                               workloads.leave_a_task, chunk_size=1)  # fmt: skip
                assert len(caught) == 1
                named = "an asyncio task 'left' (leave_a_task.<locals>.ticking_on)"
                assert res.diagnostics.hygiene == {0: (f"{named} was left running",)}
                with pytest.warns(ashard.HygieneWarning, match="left running"):
                    again = await pool.shard_map(ashard.shards(2, block_size=1),
                                                 workloads.leave_a_task, chunk_size=1)  # fmt: skip
                after = again.results[0]
                if mode == "check":  # the same worker: its first task, still there, is not
                    assert after == res.results[0]  # named again; shard 0 left another
                    assert again.diagnostics.hygiene == res.diagnostics.hygiene
                else:
                    assert after != res.results[0]
                    assert pool.stats.recycled_by["hygiene"] >= 1


async def test_off_checks_nothing(tmp_path: Path) -> None:
    async with ashard.Pool(1, hygiene="off") as pool:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ashard.HygieneWarning)
            res = await pool.shard_map(
                TWO, workloads.state_after, borrow={"where": str(tmp_path)}, chunk_size=1
            )
        assert res.diagnostics.hygiene == {}
        assert res.results[1]["left"] == "1" and res.results[1]["cwd"] == str(tmp_path)
        assert not res.results[1]["sigterm"]  # the shard's own SIGTERM handler stayed
        # ashard's own handlers are put back even so: a timeout still stops a shard
        res = await pool.shard_map(
            2, workloads.python_sleep, timeout=0.5, max_retries=0, errors="collect"
        )
        assert [type(f) for f in res.failures] == [ashard.ShardTimeout]


async def test_init_is_the_baseline_and_calls_are_checked_too() -> None:
    async with ashard.Pool(1, init=workloads.set_up_in_init) as pool:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ashard.HygieneWarning)
            res = await pool.shard_map(2, workloads.shard_sum)
            assert await pool.call(workloads.env_of, "ASHARD_TEST_INIT") == "yes"
        assert res.diagnostics.hygiene == {}
        said = r"call changed .*ASHARD_TEST_CALL"
        with pytest.warns(ashard.HygieneWarning, match=said) as caught:
            await pool.call(workloads.set_env, "ASHARD_TEST_CALL", "1")
        assert caught[0].filename == __file__
        assert await pool.call(workloads.env_of, "ASHARD_TEST_CALL") is None


async def test_a_map_chunk_is_checked_as_one_and_says_which_items_ran() -> None:
    def set_env(x: int) -> int:
        if x == 7:
            os.environ["ASHARD_TEST_MAP"] = "1"
        return x

    with pytest.warns(ashard.HygieneWarning, match="item"):
        values = await ashard.map(set_env, range(20), chunk_size=10, workers=1)
    assert values == list(range(20))


async def test_async_chunks_that_ran_together_are_checked_as_one() -> None:
    """Chunks of async shards joined on a worker's loop are checked when the last ends:
    the note says which shards ran together, and the next task finds it put back."""
    async with ashard.Pool(1) as pool:
        with pytest.warns(ashard.HygieneWarning, match="ASHARD_TEST_ASYNC") as caught:
            res = await pool.shard_map(ashard.shards(6, block_size=1), workloads.set_env_async,
                                       borrow={"name": "ASHARD_TEST_ASYNC"}, chunk_size=2,
                                       shard_concurrency=6)  # fmt: skip
        assert res.ok and len(caught) == 1
        (notes,) = res.diagnostics.hygiene.values()
        assert any("ASHARD_TEST_ASYNC'] was set; restored" in n for n in notes), notes
        assert any("shards 0-5 ran at once on its event loop" in n for n in notes), notes
        assert await pool.call(workloads.env_of, "ASHARD_TEST_ASYNC") is None


def test_a_bad_hygiene_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="hygiene must be one of 'check', 'recycle', 'off'"):
        ashard.Pool(1, hygiene="sometimes")  # type: ignore[arg-type]


async def test_stacks_still_answer_after_a_shard_took_the_dump_signal(tmp_path: Path) -> None:
    async with ashard.Pool(1) as pool:
        with pytest.warns(ashard.HygieneWarning):
            await pool.shard_map(
                TWO, workloads.state_after, borrow={"where": str(tmp_path)}, chunk_size=1
            )
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: pool.shard_map(
                    1, workloads.shard_waiting_here, borrow={"directory": str(tmp_path)}
                )
            )
            with anyio.fail_after(30):
                while not (tmp_path / "started-0").exists():  # noqa: ASYNC110 (a worker writes it)
                    await anyio.sleep(0.01)
            stacks = await pool.stacks()
            (tmp_path / "release").touch()
        ((_, text),) = stacks.values()
        assert text is not None and "shard_waiting_here" in text


def test_a_child_is_named_by_its_command_even_as_its_exec_finishes() -> None:
    import subprocess

    from ashard._worker.hygiene import _command

    for _ in range(200):  # Popen returns while exec still maps the arguments (~5 % of tries)
        child = subprocess.Popen(["sleep", "30"])
        try:
            assert _command(child.pid) == "sleep 30"
        finally:
            child.kill()
            child.wait()
    zombie = subprocess.Popen(["true"])
    try:
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        assert _command(zombie.pid) == "[true]"
    finally:
        zombie.wait()

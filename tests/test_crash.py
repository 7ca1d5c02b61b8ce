"""Workers that die: every shard's result still appears exactly once.

The crash matrix at the end: a worker misbehaves once, in each phase of its life, in
each way a process can fail, and the call still completes with every shard's result
exactly once. Phases: "starting" (in `init`, after the pool is up, so a replacement
hits it), "loading" (unpickling a borrowed object), "mid-shard" (inside fn),
"sending" (pickling fn's result). Kinds: see `workloads.misbehave`.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import random
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

import ashard
import ashard._handle
import workloads

pytestmark = pytest.mark.anyio

HOW = ["sigkill", "exit", "segfault"]


@pytest.mark.parametrize("how", HOW)
async def test_crash_is_retried_on_a_live_worker(how: str) -> None:
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(
            ashard.shards(12, block_size=1), functools.partial(workloads.die_first_attempt, how=how)
        )
        assert res.results == [i * 10 for i in range(12)]
        assert res.ok
        assert res.diagnostics.crashes >= 1
        assert res.diagnostics.retries >= 1
        stats = pool.stats
        assert stats.crashed >= 1
        assert stats.started >= 3  # a replacement was started
        assert await pool.call(os.getpid) in pool.pids


@pytest.mark.parametrize("how", HOW)
async def test_crash_past_max_retries_fails_with_worker_crashed(how: str) -> None:
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(
            ashard.shards(8, block_size=1),
            functools.partial(workloads.die_always, how=how),
            max_retries=2,
            errors="collect",
            chunk_size=1,  # alone in its chunks: every run of shard 2 is charged
        )
    assert [f.shard_id for f in res.failures] == [2]
    err = res.failures[0]
    assert isinstance(err, ashard.WorkerCrashed)
    assert err.attempts == 3
    if how == "exit":
        assert (err.exitcode, err.signal) == (3, None)
    else:
        expected = signal.SIGKILL if how == "sigkill" else signal.SIGSEGV
        assert (err.exitcode, err.signal) == (None, expected)
        assert signal.Signals(expected).name in str(err)
    assert res.results[:2] == [0, 10] and res.results[3:] == [30, 40, 50, 60, 70]


async def test_crash_with_no_retries_fails_only_the_culprit() -> None:
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(
            ashard.shards(64, block_size=1), workloads.die_always, max_retries=0, errors="collect"
        )
    assert [f.shard_id for f in res.failures] == [2]
    assert sum(r is not None for r in res.results) == 63


async def test_worker_killed_from_outside_mid_run() -> None:
    async with ashard.Pool(2) as pool:
        victims = list(pool.pids)

        async def kill_soon() -> None:
            await anyio.sleep(0.3)
            os.kill(victims[0], signal.SIGKILL)

        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_soon)
            res = await pool.shard_map(ashard.shards(40, block_size=1), workloads.sleep_shard)
        assert res.results == list(range(40))
        assert victims[0] not in pool.pids
        assert pool.stats.crashed == 1


async def test_map_survives_crashes(tmp_path: Path) -> None:
    marker = str(tmp_path / "crashed-once")

    def maybe_die(x: int) -> int:
        if x == 500 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(7)
        return x + 1

    out = await ashard.map(maybe_die, range(2000), workers=2)
    assert out == list(range(1, 2001))


async def test_call_reports_a_crash() -> None:
    with pytest.raises(ashard.WorkerCrashed) as info:
        await ashard.call(workloads.die, "exit")
    assert info.value.exitcode == 3
    assert await ashard.call(abs, -1) == 1  # the pool goes on


# -- the crash matrix ---------------------------------------------------------------

PHASES = ["starting", "loading", "mid-shard", "sending"]
# "hang-c" sleeps with every signal blocked rather than backtracking in a regex: CPython's
# regex engine checks for signals every few thousand steps, so SIGALRM interrupts a match.
KINDS = ["sigkill", "exit", "segfault", "hang-python", "hang-c", "hostile", "memory"]
MEM_CAP = "150MB"  # the "memory" kind is stopped at 1.5 x this

SHARDS = 4
TIMEOUT = 1.0
START_TIMEOUT = 2.0

FAILS_TODAY: dict[tuple[str, str], tuple[type[BaseException], str]] = {}
"""Cells that fail, with the exception they raise and why (none, since issue 11)."""


def short_start_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that hangs while it starts is given up on after seconds, not a minute."""
    monkeypatch.setattr(ashard._handle, "START_TIMEOUT", START_TIMEOUT)


def _cells() -> list[Any]:
    cells = []
    for phase in PHASES:
        for kind in KINDS:
            marks = []
            if (phase, kind) in FAILS_TODAY:
                raises, reason = FAILS_TODAY[phase, kind]
                marks.append(pytest.mark.xfail(raises=raises, reason=reason, strict=True))
            cells.append(pytest.param(phase, kind, marks=marks, id=f"{phase}-{kind}"))
    return cells


def _job(phase: str, armed: str, kind: str) -> tuple[Callable[..., Any], dict[str, Any] | None]:
    """fn and borrow of the call, for the phases other than "starting"."""
    if phase == "loading":
        return workloads.shard_times_ten, {"tripwire": workloads.UnpicklesBadlyOnce(armed, kind)}
    if phase == "mid-shard":
        return functools.partial(workloads.shard_misbehaving_once, armed=armed, how=kind), None
    if phase == "sending":
        fn = functools.partial(workloads.shard_result_pickling_badly_once, armed=armed, how=kind)
        return fn, None
    return workloads.shard_times_ten, None


@pytest.mark.parametrize(("phase", "kind"), _cells())
async def test_one_misbehaving_worker_does_not_change_the_results(
    phase: str, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    armed = str(tmp_path / "armed")
    with anyio.fail_after(60):
        if phase == "starting":
            short_start_timeout(monkeypatch)
            init = functools.partial(workloads.misbehave_once, armed, kind)
            pool = ashard.Pool(2, init=init, max_tasks=1, mem_cap=MEM_CAP)  # new worker per shard
        else:
            pool = ashard.Pool(2, mem_cap=MEM_CAP)
        async with pool:
            await anyio.Path(armed).touch()  # armed once the first workers are up
            fn, borrow = _job(phase, armed, kind)
            res = await pool.shard_map(
                ashard.shards(SHARDS, block_size=1),
                fn,
                borrow=borrow,
                timeout=TIMEOUT,
                max_retries=2,
            )
            assert res.results == [i * 10 for i in range(SHARDS)]
            assert not res.failures
            assert await pool.call(abs, -1) == 1
    assert await anyio.Path(armed + ".claimed").exists()  # the misbehaviour did happen


# -- retried calls, attempts, kill storms ---------------------------------------------


async def test_a_call_whose_worker_dies_runs_again_with_max_retries(tmp_path: Path) -> None:
    armed = str(tmp_path / "armed")
    async with ashard.Pool(2) as pool:
        await anyio.Path(armed).touch()
        assert await pool.call(workloads.die_once_then, armed, 7, max_retries=1) == 7
        await anyio.Path(armed).touch()
        with pytest.raises(ashard.WorkerCrashed) as info:
            await pool.call(workloads.die_once_then, armed, 7)
        assert info.value.attempts == 1 and "attempt" not in str(info.value)
        await anyio.Path(armed).touch()
        value = await pool.call(workloads.hang_once_then, armed, 8, timeout=0.5, max_retries=2)
        assert value == 8
        with pytest.raises(ashard.WorkerCrashed, match=r"\(3 attempts\)") as info:
            await pool.call(workloads.die, "exit", max_retries=2)
        assert info.value.attempts == 3 and info.value.exitcode == 3
        with pytest.raises(ValueError, match="max_retries must be an int >= 0"):
            await pool.call(abs, 1, max_retries=-1)
        assert await pool.call(abs, -4) == 4


async def test_a_call_that_timed_out_in_python_runs_again_with_max_retries(
    tmp_path: Path,
) -> None:
    """A hang that the timeout interrupted cleanly (the worker lives on) is a hang too:
    `max_retries` runs the call again; without it, ShardTimeout after one attempt."""
    armed = str(tmp_path / "armed")
    async with ashard.Pool(1) as pool:
        (pid,) = pool.pids
        await anyio.Path(armed).touch()
        fn = workloads.sleep_in_python_once_then
        assert await pool.call(fn, armed, 5, timeout=0.5, max_retries=1) == (5, pid)
        assert pool.pids == [pid] and pool.stats.crashed == 0  # interrupted, not killed
        await anyio.Path(armed).touch()
        with pytest.raises(ashard.ShardTimeout) as info:
            await pool.call(fn, armed, 5, timeout=0.5)
        assert info.value.attempts == 1
        with pytest.raises(ashard.ShardTimeout, match=r"\(2 attempts\)") as info:
            await pool.call(workloads.sleep_for, 60, timeout=0.3, max_retries=1)
        assert info.value.attempts == 2 and pool.pids == [pid]


@pytest.mark.parametrize("how", ["call", "shard_map", "map"])
async def test_work_handed_to_a_worker_that_had_ended_never_ran_and_runs_elsewhere(
    how: str,
) -> None:
    """An idle worker killed before the next call: that call (or chunk) could not be
    delivered, so it goes to a replacement without costing an attempt, even with
    max_retries=0; the death is counted once."""
    async with ashard.Pool(1) as pool:
        (victim,) = pool.pids
        os.kill(victim, signal.SIGKILL)
        await _exited(victim)  # its end of the channel is closed: a send must fail
        if how == "call":
            assert await pool.call(os.getpid) not in (victim, os.getpid())
        elif how == "shard_map":
            res = await pool.shard_map(3, workloads.attempt_of, max_retries=0)
            assert res.results == [1, 1, 1] and res.diagnostics.retries == 0
        else:
            assert await pool.map(abs, [-1, -2], max_retries=0) == [1, 2]
        assert victim not in pool.pids and len(pool.pids) == 1
        assert pool.stats.crashed == 1


@pytest.mark.parametrize("how", ["call", "shard_map"])
async def test_work_a_worker_cannot_take_runs_elsewhere_uncharged(how: str) -> None:
    """The worker's channel refuses the next send (the worker is on its way out): the
    call or chunk never reached it, so it runs on a replacement, no attempt charged."""
    async with ashard.Pool(1) as pool:
        victim = await pool.call(workloads.refuse_channel_soon, 0.2)
        await anyio.sleep(0.5)  # its channel is shut; its process lives on
        assert pool.pids == [victim]
        if how == "call":
            assert await pool.call(os.getpid) != victim
        else:
            res = await pool.shard_map(3, workloads.attempt_of, max_retries=0)
            assert res.results == [1, 1, 1] and res.diagnostics.retries == 0
        assert victim not in pool.pids and pool.stats.crashed == 1
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == "zombie"


async def _exited(pid: int) -> None:
    """Wait (bounded) until `pid` has exited: a zombie of ours, or gone."""

    def dead() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    with anyio.fail_after(10):
        while not await anyio.to_thread.run_sync(dead):  # noqa: ASYNC110 - no event for it
            await anyio.sleep(0.01)


async def test_attempt_counts_every_run_of_a_shard(tmp_path: Path) -> None:
    log, armed = str(tmp_path / "runs.log"), str(tmp_path / "armed")
    await anyio.Path(armed).touch()
    fn = functools.partial(workloads.logged_run, log=log, victim=2, armed=armed)
    async with ashard.Pool(1) as pool:
        res = await pool.shard_map(ashard.shards(8, block_size=1), fn, chunk_size=4)
    assert [r[0] for r in res.results] == list(range(8))
    runs = _runs(await anyio.Path(log).read_text())
    assert runs[2] == [1, 2]  # the culprit's second run knows of the first
    for shard_id in (0, 1):  # ran in the dead worker's chunk before the culprit
        assert runs[shard_id][0] == 1 and runs[shard_id][-1] > 1
    # shard 3 may have run before its worker died: its first run here counts that
    assert runs[3] in ([1, 2], [2])
    assert all(runs[i] == [1] for i in range(4, 8))  # the next chunk had not started
    for shard_id, attempts in runs.items():
        assert res.results[shard_id][1] == attempts[-1]


def _runs(log: str) -> dict[int, list[int]]:
    runs: dict[int, list[int]] = {}
    for line in log.splitlines():
        shard_id, attempt, _pid = (int(x) for x in line.split())
        runs.setdefault(shard_id, []).append(attempt)
    return runs


async def test_a_kill_storm_loses_no_result_and_no_run_goes_uncounted(tmp_path: Path) -> None:
    """SIGKILL a busy worker every ~0.1 s, and every third time a worker that is
    still starting: every result arrives exactly once, and every run of a shard sees
    its own attempt number."""
    log = str(tmp_path / "runs.log")
    fn = functools.partial(workloads.logged_run, log=log)
    kills = {"busy": 0, "starting": 0}
    with anyio.fail_after(90):
        async with ashard.Pool(2) as pool:

            async def storm() -> None:
                for i in itertools.count():
                    await anyio.sleep(0.1)
                    victims = pool.pids
                    if i % 3 == 2:
                        children = await anyio.to_thread.run_sync(_child_pids)
                        victims = [p for p in children if p not in pool.pids]
                        kind = "starting"
                    else:
                        kind = "busy"
                    if victims:
                        victim = random.choice(victims)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(victim, signal.SIGKILL)
                            kills[kind] += 1
                            killed.append(victim)

            killed: list[int] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(storm)
                res = await pool.shard_map(ashard.shards(400, block_size=1), fn, max_retries=50)
                tg.cancel_scope.cancel()
            # The last kill may land after shard_map returned, on an idle worker: once
            # it has exited, the next call cannot be handed to it (and if its channel
            # merely refuses the call, the call goes to another worker, uncharged).
            for victim in killed:
                await _exited(victim)
            assert await pool.call(abs, -1) == 1
    assert [r[0] for r in res.results] == list(range(400))
    assert kills["busy"] >= 5
    runs = _runs(await anyio.Path(log).read_text())
    assert sorted(runs) == list(range(400))
    for shard_id, attempts in runs.items():
        assert attempts == sorted(set(attempts)), (shard_id, attempts)  # no attempt seen twice
        assert res.results[shard_id][1] == attempts[-1]


def _child_pids() -> list[int]:
    """This process's ashard worker processes (not, say, a Dask cluster's that another
    test module left running for the session)."""
    pids = []
    for p in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if "ashard._worker" in " ".join(p.cmdline()):
                pids.append(p.pid)
    return pids


def attempt_unless_victim(shard: ashard.Shard, victim: int) -> int:
    if shard.id == victim and shard.attempt == 1:
        workloads.die("sigkill")
    return shard.attempt


async def test_pieces_reported_before_a_crash_are_kept_and_the_rest_runs_again() -> None:
    """A worker reports a long chunk in pieces as it goes; killed partway, what it
    reported stands and only the rest of its chunk runs again, each position once."""
    n, victim = 100_000, 40_000
    layout = ashard.shards(n, block_size=1)
    async with ashard.Pool(2) as pool:
        res = await pool.shard_map(
            layout, attempt_unless_victim, borrow={"victim": victim}, chunk_size=n // 2
        )
    assert res.ok and res.diagnostics.crashes == 1
    again = [k for k, attempt in enumerate(res.results) if attempt == 2]
    assert set(res.results) == {1, 2}
    first = again[0]
    assert again == list(range(first, n // 2))  # the killed chunk's tail, from one point on
    assert 0 < first <= victim  # what it reported before the kill was kept


def fork_a_session_then_exit(shard: ashard.Shard, pidfile: str) -> int:
    """On its first run shard 1 forks a child that leaves the worker's process group
    (a session of its own) holding the worker's channel, then the worker exits."""
    if shard.id == 1 and shard.attempt == 1:
        if os.fork() == 0:
            os.setsid()
            Path(pidfile).write_text(str(os.getpid()))
            signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals() - {signal.SIGKILL})
            os.execvp("sleep", ["sleep", "120"])
        while not Path(pidfile).exists():
            pass
        os._exit(3)
    return shard.id


async def test_a_worker_gone_is_seen_gone_while_a_process_it_forked_holds_its_channel(
    tmp_path: Path,
) -> None:
    """The channel's EOF never comes while the forked child lives: the health check sees
    the worker's exit instead, and the call goes on without waiting for the child."""
    pidfile = tmp_path / "child"
    try:
        with anyio.fail_after(30):  # the child sleeps 120 s: a call that waits for it fails
            async with ashard.Pool(2) as pool:
                res = await pool.shard_map(
                    4, fork_a_session_then_exit, borrow={"pidfile": str(pidfile)}, chunk_size=1
                )
        assert res.results == [0, 1, 2, 3]
        assert res.diagnostics.crashes == 1
    finally:
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)


def leave_a_process(shard: ashard.Shard, pidfile: str, then: str) -> int:
    """On its first run shard 0 starts a process that would sleep 120 s and writes its
    pid, then its worker ends: killed past the timeout while `os.system` waits (a signal
    cannot stop it there), or exiting on its own."""
    if shard.id == 0 and shard.attempt == 1:
        if then == "timeout":
            os.system(f"echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile} && exec sleep 120")
        else:
            proc = subprocess.Popen(["sleep", "120"])
            Path(pidfile).write_text(str(proc.pid))
            os._exit(3)
    return shard.id


@pytest.mark.parametrize("then", ["timeout", "exit"])
async def test_the_processes_a_worker_started_end_with_it(tmp_path: Path, then: str) -> None:
    """They are in the worker's process group, which is killed before the worker is
    reaped: a shard that timed out or crashed leaves nothing running."""
    pidfile = tmp_path / "left"
    with anyio.fail_after(60):
        async with ashard.Pool(2) as pool:
            res = await pool.shard_map(
                3, leave_a_process, borrow={"pidfile": str(pidfile), "then": then}, timeout=2
            )
        assert res.results == [0, 1, 2]
    await _exited(int(pidfile.read_text()))  # (an orphan: its zombie waits for init)

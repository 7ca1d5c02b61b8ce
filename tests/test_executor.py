"""`ashard.Executor`: `concurrent.futures` code runs on ashard workers unchanged, and a
worker's death fails only the task it was running."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import psutil
import pytest

import ashard
import workloads


def test_submit_map_and_chunksize() -> None:
    with ashard.Executor(2) as ex:
        assert ex.submit(workloads.square, 7).result(timeout=60) == 49
        assert list(ex.map(workloads.square, range(20))) == [x * x for x in range(20)]
        assert list(ex.map(pow, range(10), range(10), chunksize=4)) == [x**x for x in range(10)]
        assert ex.submit(sorted, [3, 1], reverse=True).result() == [3, 1]
        with pytest.raises(ValueError, match="chunksize"):
            ex.map(workloads.square, [1], chunksize=0)
        with pytest.raises(TimeoutError):
            list(ex.map(time.sleep, [5, 5], timeout=0.3))


def test_map_over_an_iterator_that_changes_one_object_in_place_maps_each_value() -> None:
    with ashard.Executor(2) as ex:
        out = list(ex.map(len, workloads.one_list_growing(200), chunksize=4))
    assert out == list(range(1, 201))


def test_shutdown_right_after_a_map_stops_the_worker_it_was_starting() -> None:
    """A map can be over while its job still starts a second worker: shutting down
    then (with ``wait``) returns once that worker too is stopped and reaped (it was
    left a zombie)."""
    before = psutil.Process().children()
    for _ in range(3):
        with ashard.Executor(2) as ex:
            assert list(ex.map(abs, range(-100, 0))) == list(range(100, 0, -1))
        assert psutil.Process().children() == before


def test_map_raises_each_error_when_reached_and_stops_when_left(tmp_path: Path) -> None:
    with ashard.Executor(2) as ex:
        results = ex.map(workloads.fail_at, range(10))  # item 5 raises
        assert [next(results) for _ in range(5)] == [0, 1, 2, 3, 4]
        with pytest.raises(ValueError, match="bad item 5") as info:
            next(results)
        assert "Traceback" in str(info.value.__cause__)
        (tmp_path / "armed").touch()
        crashing = ex.map(workloads.die_once_then, [str(tmp_path / "armed")], ["late"])
        with pytest.raises(ashard.WorkerCrashed) as crash:  # its worker died: only this item
            list(crashing)
        assert isinstance(crash.value, BrokenProcessPool)
        (tmp_path / "armed").unlink(missing_ok=True)
        items = ex.map(workloads.touch_then_sleep, [str(tmp_path)] * 40,
                       [f"m{i:02d}" for i in range(40)], [0.2] * 40)  # fmt: skip
        assert next(items) == "m00"
        items.close()  # leaving early stops the rest
        time.sleep(0.5)
        started = len(list(tmp_path.iterdir()))
        assert started < 40
        time.sleep(0.5)
        assert len(list(tmp_path.iterdir())) == started
        assert list(ex.map(workloads.square, [])) == []


def test_a_dead_worker_fails_only_its_own_future() -> None:
    with ashard.Executor(2) as ex:
        slow = [ex.submit(time.sleep, 0.3) for _ in range(4)]
        victim = ex.submit(workloads.kill_self)
        behind = [ex.submit(workloads.square, i) for i in range(6)]
        cf.wait([*slow, victim, *behind], timeout=60)
        error = victim.exception()
        assert isinstance(error, ashard.WorkerCrashed)
        assert isinstance(error, BrokenProcessPool)  # what ProcessPoolExecutor code catches
        assert type(error) is ashard.ExecutorWorkerCrashed  # a public name, in tracebacks too
        assert repr(error).startswith("ExecutorWorkerCrashed(")
        assert pickle.loads(pickle.dumps(error)).exitcode == error.exitcode
        assert [f.result() for f in slow] == [None] * 4
        assert [f.result() for f in behind] == [i * i for i in range(6)]
        assert ex.submit(workloads.square, 9).result(timeout=60) == 81  # still usable


@pytest.mark.parametrize("fn", [time.sleep, workloads.sleep_deaf])
def test_timeout_stops_a_hung_task(fn: object) -> None:
    with ashard.Executor(1, timeout=0.5) as ex:
        t0 = time.monotonic()
        with pytest.raises(ashard.ShardTimeout):
            ex.submit(fn, 60).result(timeout=60)  # type: ignore[arg-type]
        assert time.monotonic() - t0 < 20
        assert ex.submit(workloads.square, 3).result(timeout=60) == 9


def test_max_retries_reruns_a_crashed_task(tmp_path: Path) -> None:
    armed = str(tmp_path / "armed")
    open(armed, "w").close()
    with ashard.Executor(1, max_retries=1) as ex:
        assert ex.submit(workloads.die_once_then, armed, "ok").result(timeout=60) == "ok"
    with ashard.Executor(1) as ex:
        open(armed, "w").close()
        with pytest.raises(ashard.WorkerCrashed):
            ex.submit(workloads.die_once_then, armed, "ok").result(timeout=60)


def test_max_retries_reruns_a_task_stopped_by_its_timeout_in_python(tmp_path: Path) -> None:
    armed = str(tmp_path / "armed")
    open(armed, "w").close()
    with ashard.Executor(1, timeout=0.5, max_retries=1) as ex:
        fn = workloads.sleep_in_python_once_then
        value, pid = ex.submit(fn, armed, "ok").result(timeout=60)
        assert value == "ok" and ex.submit(os.getpid).result(timeout=60) == pid  # no kill
        with pytest.raises(ashard.ShardTimeout, match=r"\(2 attempts\)"):
            ex.submit(workloads.sleep_for, 60).result(timeout=60)


def test_what_processpoolexecutor_code_catches_is_still_caught() -> None:
    """Arguments that do not unpickle in the worker and a result that does not unpickle
    here: `pickle.UnpicklingError` and `BrokenProcessPool` (what ProcessPoolExecutor
    raises) both catch it, with the message; SystemExit or KeyboardInterrupt raised
    while the worker pickles a result come back as themselves; the worker lives on."""
    with ashard.Executor(1) as ex:
        pid = ex.submit(os.getpid).result(timeout=60)
        cases = [
            (ex.submit(workloads.identity, workloads.RebuildFails()), "arguments"),
            (ex.submit(workloads.return_unrebuildable, 13), "result"),
        ]
        for future, what in cases:
            for kind in (pickle.UnpicklingError, BrokenProcessPool):
                with pytest.raises(kind, match=f"{what} could not be loaded"):
                    future.result(timeout=60)
            assert "cannot be rebuilt" in str(future.exception())
            assert type(future.exception()) is ashard.ExecutorUnpicklingError
        exiting = [  # a SystemExit while unpickling ends no process: the task fails
            ex.submit(workloads.identity, workloads.ExitsWhenUnpickled()),  # in the worker
            ex.submit(workloads.return_exiting_when_unpickled),  # here
        ]
        for future in exiting:
            with pytest.raises(BrokenProcessPool, match="SystemExit"):
                future.result(timeout=60)
            assert isinstance(future.exception(), pickle.UnpicklingError)
        for kind in (SystemExit, KeyboardInterrupt):
            future = ex.submit(workloads.return_raising_when_pickled, kind)
            with pytest.raises(kind, match="raised while pickling the result"):
                future.result(timeout=60)
        mapped = ex.map(workloads.return_unrebuildable, [12, 13])
        assert next(mapped) == 12
        with pytest.raises(BrokenProcessPool, match="result could not be loaded"):
            next(mapped)
        assert ex.submit(os.getpid).result(timeout=60) == pid  # the same worker, still up


def test_exceptions_are_the_tasks_own_with_the_remote_traceback() -> None:
    with ashard.Executor(1) as ex:
        pid = ex.submit(os.getpid).result()
        with pytest.raises(ZeroDivisionError) as info:
            ex.submit(divmod, 1, 0).result()
        assert "Traceback" in str(info.value.__cause__)
        with pytest.raises(SystemExit) as exit_info:
            ex.submit(workloads.raise_system_exit, 3).result()
        assert exit_info.value.code == 3
        assert ex.submit(os.getpid).result() == pid  # the worker lived on
        with pytest.raises(pickle.PicklingError):
            ex.submit(workloads.identity, threading.Lock()).result()


def test_what_the_standard_librarys_own_tests_expect() -> None:
    import multiprocessing
    import weakref
    from concurrent.futures.process import _RemoteTraceback

    with ashard.Executor(2) as ex:
        # keywords named like Pool.call's own parameters reach the task
        assert ex.submit(workloads.keywords, 1, self=2, fn=3, timeout=4).result() == (
            (1,),
            {"self": 2, "fn": 3, "timeout": 4},
        )
        # the cause is ProcessPoolExecutor's own remote-traceback type, with the line
        with pytest.raises(ZeroDivisionError) as info:
            ex.submit(divmod, 1, 0).result()
        assert type(info.value.__cause__) is _RemoteTraceback
        assert "Traceback" in info.value.__cause__.tb
        # a map's iterator keeps no result the caller was given
        for obj in ex.map(workloads.make_payload, range(10)):
            ref = weakref.ref(obj)
            del obj
            gc.collect()
            assert ref() is None
        # a Manager proxy among the arguments connects back (the authkey is shared)
        with multiprocessing.get_context("fork").Manager() as manager:
            event = manager.Event()
            assert ex.submit(workloads.set_event, event).result(timeout=60) is True
            assert event.is_set()


def test_a_result_handed_over_is_held_by_nothing_while_the_next_runs(tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    with ashard.Executor(1) as ex:
        results = ex.map(workloads.payload_past_gate, range(2), [gate] * 2)
        first = next(results)
        ref = weakref.ref(first)
        del first
        gc.collect()
        assert ref() is None  # item 1 still runs: nothing waiting for it holds item 0
        open(gate, "w").close()
        assert next(results).n == 1


def test_initializer_and_a_failing_one() -> None:
    with ashard.Executor(2, initializer=workloads.remember, initargs=("hello",)) as ex:
        assert {ex.submit(workloads.remembered).result() for _ in range(4)} == {"hello"}
    with ashard.Executor(1, initializer=workloads.failing_init) as ex:
        futures = [ex.submit(workloads.square, i) for i in range(3)]
        for f in futures:
            with pytest.raises(BrokenProcessPool):
                f.result(timeout=60)
        with pytest.raises(BrokenProcessPool):
            ex.submit(workloads.square, 1)


def test_cancel_shutdown_and_submit_after_shutdown(tmp_path: Path) -> None:
    ex = ashard.Executor(1)
    running = ex.submit(workloads.touch_then_sleep, str(tmp_path), "first", 0.5)
    queued = [ex.submit(workloads.touch_then_sleep, str(tmp_path), f"q{i}", 0.1) for i in range(3)]
    while not (tmp_path / "first").exists():
        time.sleep(0.01)
    assert running.cancel() is False  # running: not cancellable
    assert queued[0].cancel() is True
    ex.shutdown(wait=True, cancel_futures=True)
    assert running.result() == "first"
    assert all(f.cancelled() for f in queued)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first"]
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(workloads.square, 1)
    ex2 = ashard.Executor(1)
    pending = ex2.submit(time.sleep, 0.3)
    ex2.shutdown(wait=False)
    assert pending.result(timeout=60) is None  # finished in the background


def test_max_tasks_per_child_replaces_workers() -> None:
    with ashard.Executor(1, max_tasks_per_child=1) as ex:
        pids = [ex.submit(os.getpid).result() for _ in range(3)]
    assert len(set(pids)) == 3
    with pytest.raises(ValueError, match="max_workers"):
        ashard.Executor(0)
    with pytest.raises(ValueError, match="max_tasks_per_child"):
        ashard.Executor(1, max_tasks_per_child=0)


def test_run_in_executor_wait_as_completed_and_wrap_future() -> None:
    async def main(ex: ashard.Executor) -> list[int]:
        loop = asyncio.get_running_loop()
        first = await loop.run_in_executor(ex, workloads.square, 4)
        wrapped = await asyncio.wrap_future(ex.submit(workloads.square, 5))
        return [first, wrapped]

    with ashard.Executor(2) as ex:
        assert asyncio.run(main(ex)) == [16, 25]
        futures = [ex.submit(workloads.square, i) for i in range(10)]
        assert sorted(f.result() for f in cf.as_completed(futures, timeout=60)) == [
            i * i for i in range(10)
        ]
        done, not_done = cf.wait(futures, return_when=cf.ALL_COMPLETED)
        assert len(done) == 10 and not not_done


def test_submits_from_eight_threads() -> None:
    with ashard.Executor(2) as ex:
        results: list[list[int]] = [[] for _ in range(8)]

        def submitter(k: int) -> None:
            futures = [ex.submit(workloads.square, k * 100 + i) for i in range(50)]
            results[k] = [f.result(timeout=60) for f in futures]

        threads = [threading.Thread(target=submitter, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == [[(k * 100 + i) ** 2 for i in range(50)] for k in range(8)]


def test_a_collected_executor_stops_its_workers() -> None:
    ex = ashard.Executor(1)
    pid = ex.submit(os.getpid).result(timeout=60)
    del ex
    gc.collect()
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_pending_work_finishes_at_interpreter_exit(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import ashard, workloads
        ex = ashard.Executor(2)
        for i in range(6):
            ex.submit(workloads.touch_then_sleep, {str(tmp_path)!r}, f"t{{i}}", 0.2)
        print("leaving")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"t{i}" for i in range(6)]

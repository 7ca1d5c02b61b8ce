"""The cold start: the first call on the default pool launches its first worker before
it imports the supervisor, that worker serves the call, and one nobody took (bad
arguments, a cancelled call) is ended before the call returns. Each case runs in a
fresh interpreter: only there is a call the first."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import asyncio, os, sys
import psutil
import ashard
from ashard import _spawn

launched = []
_submit = _spawn._submit
def spy(*args):
    future = _submit(*args)
    launched.append(future)
    return future
_spawn._submit = spy
"""


def run_fresh(body: str, backend: str = "asyncio") -> str:
    code = PRELUDE + textwrap.dedent(body)
    if backend == "trio":
        code = code.replace("asyncio.run(main())", "import anyio; anyio.run(main, backend='trio')")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_first_worker_is_launched_before_the_supervisor_loads(backend: str) -> None:
    out = run_fresh(
        """
        async def main():
            assert "ashard.pool" not in sys.modules
            pid = await ashard.call(os.getpid)
            first = launched[0].result()
            assert first.pid == pid, (first.pid, pid)
            assert ashard.default_pool().pids[0] == pid
            assert await ashard.map(abs, [-1, -2]) == [1, 2]
            await ashard.shutdown()
            print("ok")
        asyncio.run(main())
        """,
        backend,
    )
    assert out == "ok"


def test_a_first_call_with_bad_arguments_leaves_no_process() -> None:
    out = run_fresh(
        """
        async def main():
            try:
                await ashard.call(abs, -1, timeout=-1)
            except ValueError as exc:
                assert "timeout" in str(exc), exc
            else:
                raise AssertionError("no error")
            assert len(launched) == 1  # it was launched ahead ...
            assert psutil.Process().children() == []  # ... and ended before the raise
            try:
                await ashard.map(abs, [1], chunk_size="big")
            except (TypeError, ValueError):
                pass
            assert psutil.Process().children() == []
            assert await ashard.call(abs, -3) == 3  # a later call starts afresh
            await ashard.shutdown()
            print("ok")
        asyncio.run(main())
        """
    )
    assert out == "ok"


def test_a_sync_first_call_launches_its_worker_before_the_supervisor_loads() -> None:
    out = run_fresh(
        """
        import ashard.sync
        assert "ashard._calls" not in sys.modules and "ashard._scheduler" not in sys.modules
        pid = ashard.sync.call(os.getpid)
        first = launched[0].result()
        assert first.pid == pid, (first.pid, pid)
        assert ashard.sync.default_pool().pids[0] == pid
        assert ashard.sync.map(abs, [-1, -2]) == [1, 2]
        ashard.sync.shutdown()
        print("ok")
        """
    )
    assert out == "ok"


def test_a_sync_first_call_with_bad_arguments_leaves_no_process() -> None:
    out = run_fresh(
        """
        import ashard.sync
        for bad in (lambda: ashard.sync.call(abs, -1, timeout=-1),
                    lambda: ashard.sync.map(abs, [1], chunk_size="big")):
            ashard.sync.shutdown()  # each is a first call on a fresh default pool
            try:
                bad()
            except (TypeError, ValueError):
                pass
            else:
                raise AssertionError("no error")
            assert psutil.Process().children() == []
        assert len(launched) == 2  # each launched one ahead, and ended it before raising
        assert ashard.sync.call(abs, -3) == 3  # a later call starts afresh
        ashard.sync.shutdown()
        print("ok")
        """
    )
    assert out == "ok"


def test_sync_first_calls_from_many_threads_leave_no_process_behind() -> None:
    out = run_fresh(
        """
        import threading
        import ashard.sync
        pids, errors = [], []
        def one():
            try:
                pids.append(ashard.sync.call(os.getpid))
            except BaseException as exc:
                errors.append(exc)
        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(pids) == 8, errors
        assert set(pids) <= set(ashard.sync.default_pool().pids)
        ashard.sync.shutdown()
        assert psutil.Process().children() == [], psutil.Process().children()
        print("ok")
        """
    )
    assert out == "ok"


def test_a_first_call_cancelled_at_once_leaves_no_process() -> None:
    out = run_fresh(
        """
        import time
        async def main():
            task = asyncio.ensure_future(ashard.call(time.sleep, 30))
            await asyncio.sleep(0)  # it has launched its worker and is importing
            assert len(launched) == 1
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            await ashard.shutdown()
            for _ in range(100):
                if not psutil.Process().children():
                    break
                await asyncio.sleep(0.05)
            assert psutil.Process().children() == [], psutil.Process().children()
            print("ok")
        asyncio.run(main())
        """
    )
    assert out == "ok"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_first_call_cancelled_while_it_loads_has_ended_its_worker_when_it_returns(
    backend: str,
) -> None:
    """`ashard.call` read in a coroutine before anything loaded it launches the first
    worker, then imports the call layer in a thread: cancelled then, it ends that worker
    and waits until it is reaped before it returns."""
    out = run_fresh(
        """
        import importlib.abc, threading, time
        import anyio
        gate = threading.Event()
        class Gate(importlib.abc.MetaPathFinder):  # holds the import of the call layer
            def find_spec(self, name, path, target=None):
                if name == "ashard.api":
                    gate.wait(30)
        sys.meta_path.insert(0, Gate())
        async def main():
            async with anyio.create_task_group() as tg:
                tg.start_soon(ashard.call, time.sleep, 30)
                while not launched:
                    await anyio.sleep(0)
                loaded = "ashard.api" in sys.modules
                tg.cancel_scope.cancel()
                gate.set()
            print(loaded, len(launched), psutil.Process().children())
        asyncio.run(main())
        """,
        backend,
    )
    assert out == "False 1 []"


def test_an_explicit_pool_launches_nothing_ahead() -> None:
    out = run_fresh(
        """
        async def main():
            async with ashard.Pool(1) as pool:
                assert await pool.call(abs, -1) == 1
                assert await pool.map(abs, [-1], chunk_size=1) == [1]
                assert _spawn._ahead is None
            print(len(launched))  # the pool's one worker, nothing ahead
        asyncio.run(main())
        """
    )
    assert out == "1"


FIRST_TOUCH = """
import asyncio, json, sys, threading
import ashard

where = {}

class Spy:  # notes the thread that imports each supervisor module
    def find_spec(self, name, path=None, target=None):
        if name in ("ashard._scheduler", "ashard._handle", "ashard._job"):
            where.setdefault(name, threading.current_thread().name)
        return None

sys.meta_path.insert(0, Spy())

async def main():
    pool = ashard.Pool(1)  # the first touch: in a request handler, say
    seen = {"after_construct": sorted(m for m in where)}
    async with pool:
        seen["value"] = await pool.call(abs, -3)
    seen["loop_thread"] = threading.current_thread().name
    seen["where"] = where
    print(json.dumps(seen))

asyncio.run(main())
"""


def test_the_first_touch_of_pool_imports_the_supervisor_off_the_loop() -> None:
    """Making an `ashard.Pool` imports no supervisor module; its first async use
    imports them in a worker thread, never on the caller's event loop thread."""
    out = subprocess.run(
        [sys.executable, "-c", FIRST_TOUCH], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.splitlines()[-1])
    assert seen["after_construct"] == [] and seen["value"] == 3
    assert set(seen["where"]) == {"ashard._scheduler", "ashard._handle", "ashard._job"}
    assert seen["loop_thread"] not in set(seen["where"].values()), seen

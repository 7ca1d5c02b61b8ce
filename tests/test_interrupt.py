"""Ctrl-C (SIGINT to the caller) stops the call's work within a second and leaves the
pool usable: in a script under asyncio and trio, and in a real Jupyter kernel (its
interrupt, as the Stop button sends it).

The caller runs in a process of its own (a signal to pytest would stop pytest); its
function marks when it starts and when it ends, so a run that was stopped is seen
never to end.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

TESTS = str(Path(__file__).resolve().parent)

SCRIPT = """
    import sys, time, anyio, ashard
    sys.path.insert(0, {tests!r})
    import workloads

    async def long_call():
        return await ashard.call(workloads.touch_sleep_touch, {started!r}, {finished!r}, 2.0)

    async def long_map():
        fn = workloads.shard_touch_sleep_touch
        layout = ashard.shards(4, block_size=1)
        borrow = {{"directory": {tmp!r}, "seconds": 2.0}}
        res = await ashard.shard_map(layout, fn, borrow=borrow, workers=2)
        return res.results

    try:
        anyio.run({what}, backend={backend!r})
        print("not interrupted", flush=True)
    except KeyboardInterrupt:
        print(f"interrupted at {{time.monotonic():.3f}}", flush=True)
    print("after", anyio.run(ashard.call, abs, -5, backend={backend!r}), flush=True)
    anyio.run(ashard.shutdown, backend={backend!r})
"""


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.01)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("what", ["long_call", "long_map"])
def test_sigint_stops_the_work_within_a_second(backend: str, what: str, tmp_path: Path) -> None:
    started, finished = tmp_path / "started-0", tmp_path / "done-0"
    script = tmp_path / "caller.py"
    script.write_text(textwrap.dedent(SCRIPT).format(
        tests=TESTS, started=str(started), finished=str(finished), tmp=str(tmp_path),
        what=what, backend=backend,
    ))  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for(started)
        time.sleep(0.2)  # well inside the sleep
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    lines = out.splitlines() or [""]
    assert lines[0].startswith("interrupted at "), out + err
    assert float(lines[0].split()[-1]) - sent < 1.0
    assert lines[1] == "after 5", out + err
    time.sleep(2.5)  # past the end of the sleep the runs were stopped in
    assert not list(tmp_path.glob("done-*")), "a stopped run went on to its end"


def test_the_jupyter_stop_button_stops_an_awaited_call_within_a_second() -> None:
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", cwd=TESTS)
    try:
        setup = "import time, ashard, workloads, tempfile, os; d = tempfile.mkdtemp()"
        assert _execute(kc, setup)[0] == "ok"
        code = (
            "try:\n"
            "    await ashard.call(workloads.touch_sleep_touch, d + '/s', d + '/f', 3.0)\n"
            "finally:\n"
            "    print(f'ended at {time.monotonic():.3f}')\n"
        )
        msg_id = kc.execute(code)
        time.sleep(1.0)  # the call is under way
        sent = time.monotonic()  # CLOCK_MONOTONIC: the same clock in the kernel
        km.interrupt_kernel()
        status, output = _collect(kc, msg_id)
        assert status == "error", output
        ended = float(output.split("ended at ")[1].split()[0])
        assert ended - sent < 1.0, output
        status, output = _execute(kc, "print(await ashard.call(abs, -3))")
        assert (status, output.strip()) == ("ok", "3")
        time.sleep(3.0)  # past the end of the sleep the call was stopped in
        status, output = _execute(kc, "print(os.path.exists(d + '/s'), os.path.exists(d + '/f'))")
        assert output.strip() == "True False", output
        _execute(kc, "await ashard.shutdown()")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _execute(kc: Any, code: str) -> tuple[str, str]:
    return _collect(kc, kc.execute(code))


def _collect(kc: Any, msg_id: str, timeout: float = 60.0) -> tuple[str, str]:
    """(status, printed output) of the cell `msg_id`, once the kernel is idle again."""
    output, status = [], "ok"
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            return "timeout", "".join(output)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind = msg["msg_type"]
        if kind == "stream":
            output.append(msg["content"]["text"])
        elif kind == "error":
            status = "error"
            output.append(msg["content"]["ename"] + "\n")
        elif kind == "status" and msg["content"]["execution_state"] == "idle":
            return status, "".join(output)
        if time.monotonic() > deadline:
            return "timeout", "".join(output)

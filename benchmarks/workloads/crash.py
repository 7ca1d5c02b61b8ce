"""crash: 8 tasks of 50 ms; task 3 SIGKILLs its own worker the first time it runs.

What each library does (the results, an exception, or a hang past 20 s), whether the
pool still works afterwards, and where the killed task was retried: the time from the
kill to that task's retry finishing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from typing import Any

import anyio

import _bench_fns as fns
from workloads import Config, maybe, row_of

TITLE = "crash: a task SIGKILLs its worker - outcome and recovery"
COLUMNS = [("recovery_ms", "kill to retry done ms", "{:.0f}"), ("outcome", "outcome", "{}"),
           ("after", "pool afterwards", "{}")]  # fmt: skip
RATIO = ["recovery_ms"]
CHART = "recovery_ms"
LIMIT_S = 120.0
REPS_IN_PROCESS = True
HANG_S = 20.0
VICTIM = 3


async def _bounded(peer: Any, method: str, *args: Any) -> tuple[str, Any]:
    """("ok", value), ("error", exception) or ("hang", None) after HANG_S seconds."""
    fn = getattr(peer, method)
    try:
        if hasattr(fn, "__code__") and fn.__code__.co_flags & 0x80:  # coroutine function
            with anyio.fail_after(HANG_S):
                return "ok", await fn(*args)
        box: list[Any] = []

        def target() -> None:
            try:
                box.append(("ok", fn(*args)))
            except BaseException as exc:  # reported as the outcome
                box.append(("error", exc))

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        deadline = time.monotonic() + HANG_S
        while thread.is_alive() and time.monotonic() < deadline:  # noqa: ASYNC110
            await anyio.sleep(0.01)
        return box[0] if box else ("hang", None)
    except TimeoutError:
        return "hang", None
    except Exception as exc:
        return "error", exc


async def run(peer: Any, cfg: Config) -> list[dict[str, Any]]:
    await maybe(peer.start(cfg.workers))
    marker = os.path.join(tempfile.mkdtemp(prefix="ashard-bench-"), "killed")
    status = ""
    try:
        args = [(k, VICTIM, marker) for k in range(8)]
        status, value = await _bounded(peer, "starmap", fns.sleep_or_die, args)
        row: dict[str, Any] = {"variant": "8 tasks, 1 killed"}
        if status == "ok":
            killed_at = float(await anyio.Path(marker).read_text())
            done_at = dict(value)[VICTIM]
            row["recovery_ms"] = (done_at - killed_at) * 1000
            row["outcome"] = "all 8 results (the killed task was retried)"
        elif status == "error":
            while isinstance(value, BaseExceptionGroup) and value.exceptions:
                value = value.exceptions[0]
            row["outcome"] = f"raised {type(value).__name__}: {str(value)[:80]}"
        else:
            row["outcome"] = f"hung (no result after {HANG_S:.0f} s)"
        after, _ = await _bounded(peer, "call", fns.noop, 1) if status != "hang" else ("", None)
        row["after"] = {"ok": "usable", "error": "broken", "hang": "hangs", "": "-"}[after]
        return [row]
    finally:
        if status != "hang":
            await maybe(peer.close())
        shutil.rmtree(os.path.dirname(marker), ignore_errors=True)


def targets(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    ours = row_of(results, "ashard")
    if not ours or "recovery_ms" not in ours:
        return ["crash: ashard did not retry the killed task: MISSED"]
    ok = ours["recovery_ms"] <= 500
    return [f"killed task's retry finished {ours['recovery_ms']:.0f} ms after the kill "
            f"(target <= 500 ms): {'met' if ok else 'MISSED'}"]  # fmt: skip

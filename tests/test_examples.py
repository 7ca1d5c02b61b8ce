"""The examples in examples/ run for real: the FastAPI app under HTTP load on
loopback (its `/health` stays fast while every worker is busy; a client that
disconnects cancels its work)."""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.anyio


@pytest.fixture
def server() -> Iterator[str]:
    """The FastAPI example served by uvicorn on 127.0.0.1 (in a thread, with its own
    event loop): its base URL."""
    import uvicorn

    sys.path.insert(0, str(ROOT))
    try:
        from examples.fastapi_app import app
    finally:
        sys.path.remove(str(ROOT))
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(30)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_health_stays_fast_while_every_worker_is_busy(server: str) -> None:
    import httpx

    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=server, timeout=30) as client:
        assert (await client.get("/work", params={"seconds": 0.01})).status_code == 200

        async def ping(until: float) -> None:
            while time.monotonic() < until:
                t0 = time.perf_counter()
                r = await client.get("/health")
                latencies.append(time.perf_counter() - t0)
                assert r.json() == {"ok": True}
                await anyio.sleep(0.02)

        results: list[float] = []

        async def busy() -> None:
            r = await client.get("/work", params={"seconds": 1.0})
            results.append(r.json()["value"])

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for _ in range(4):  # two rounds of both workers busy
                    tg.start_soon(busy)
                tg.start_soon(ping, time.monotonic() + 2.0)
            spread = await client.get("/spread", params={"seconds": 0.1, "parts": 4})
    assert len(results) == 4 and all(v > 0 for v in results)
    assert len(spread.json()["values"]) == 4
    assert len(latencies) > 30
    p99 = statistics.quantiles(latencies, n=100)[98]
    assert p99 < 0.05, f"/health p99 {p99 * 1000:.1f} ms while the workers were busy"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_client_that_disconnects_cancels_its_work(server: str, tmp_path: Path) -> None:
    import httpx

    marker = tmp_path / "finished"
    async with httpx.AsyncClient(base_url=server) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/work", params={"seconds": 3.0, "marker": str(marker)},
                             timeout=0.5)  # fmt: skip
        await anyio.sleep(3.5)
        stats = (await client.get("/stats", timeout=10)).json()
    assert not marker.exists(), "the work of a client that left ran to its end"
    assert stats["alive"] == 2 and stats["crashed"] == 0, stats  # interrupted, not killed


def test_the_notebook_runs_and_worker_output_lands_in_its_cell() -> None:
    import nbclient
    import nbformat

    nb = nbformat.read(ROOT / "examples" / "notebook.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})  # fmt: skip
    client.execute()
    cells = [c for c in nb.cells if c.cell_type == "code"]
    launching = cells[2]  # the cell that awaits shard_map
    printed = "".join(
        o.get("text", "") for o in launching.outputs
        if o.output_type == "stream" and o.get("name") == "stdout"
    )  # fmt: skip
    assert sorted(line for line in printed.splitlines() if line.startswith("shard ")) == [
        f"shard {i}: 50000 rows" for i in range(4)
    ]
    assert any("text/html" in o.get("data", {}) for o in launching.outputs)  # res's table
    # the progress bar: one display, saved in its final state; no frames, no warning
    bars = [o for o in launching.outputs if o.output_type == "display_data"
            and "<progress" in o["data"].get("text/html", "")]  # fmt: skip
    assert len(bars) == 1 and "100%" in bars[0]["data"]["text/plain"], bars
    assert 'value="4" max="4"' in bars[0]["data"]["text/html"]
    errs = "".join(o.get("text", "") for o in launching.outputs if o.get("name") == "stderr")
    assert "\r" not in errs and "IProgress" not in errs and "Warning" not in errs, errs
    for other in cells[:2] + cells[3:]:  # no worker line went anywhere else
        assert "rows" not in "".join(o.get("text", "") for o in other.outputs)
    timeline = cells[4].outputs[0]["data"]["text/html"]
    assert "<svg" in timeline

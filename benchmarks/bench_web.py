"""A web backend under load: `/health` latency while CPU work runs, for the FastAPI
example app (`examples/fastapi_app.py`: ashard's `pool.call` in the handler) against
the same app computing in the handler (the loop blocked) and with
`loop.run_in_executor(ProcessPoolExecutor)`. Each served by uvicorn in a thread, on
loopback; 8 requests of 0.5 s of CPU on 2 workers while `/health` is asked every
20 ms.

    python benchmarks/bench_web.py [--record]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing as mp
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
START, END = "<!-- bench_web:start -->", "<!-- bench_web:end -->"


def make_app(kind: str) -> Any:
    from examples import fastapi_app
    from fastapi import FastAPI

    if kind == "ashard":
        return fastapi_app.app
    app = FastAPI()
    ex = concurrent.futures.ProcessPoolExecutor(2, mp_context=mp.get_context("forkserver"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/work")
    async def work(seconds: float = 0.5) -> dict[str, Any]:
        if kind == "inline":
            return {"value": fastapi_app.burn(seconds)}
        loop = asyncio.get_running_loop()
        return {"value": await loop.run_in_executor(ex, fastapi_app.burn, seconds)}

    app.state.executor = ex
    return app


def serve(app: Any) -> tuple[Any, threading.Thread, str]:
    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    return srv, thread, f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"


async def load(base: str) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        await client.get("/work", params={"seconds": 0.01})
        stop = asyncio.Event()

        async def ping() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                await client.get("/health")
                latencies.append(time.perf_counter() - t0)
                await asyncio.sleep(0.02)

        pinger = asyncio.create_task(ping())
        t0 = time.perf_counter()
        await asyncio.gather(*(client.get("/work", params={"seconds": 0.5}) for _ in range(8)))
        wall = time.perf_counter() - t0
        stop.set()
        await pinger
    q = statistics.quantiles(latencies, n=100)
    top = max(latencies)
    return {"p50": q[49], "p99": min(q[98], top), "max": top, "n": len(latencies), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    rows = {}
    for kind, label in [("ashard", "ashard (pool.call in the handler)"),
                        ("executor", "run_in_executor(ProcessPoolExecutor forkserver)"),
                        ("inline", "CPU work in the handler (loop blocked)")]:  # fmt: skip
        app = make_app(kind)
        srv, thread, base = serve(app)
        try:
            rows[label] = asyncio.run(load(base))
        finally:
            srv.should_exit = True
            thread.join(30)
            ex = getattr(app.state, "executor", None)
            if ex is not None:
                ex.shutdown()
    lines = [
        "## A web backend under load (`benchmarks/bench_web.py`)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; FastAPI + uvicorn on "
        "loopback, 8 requests of 0.5 s CPU each on 2 workers while `/health` is asked "
        "every 20 ms.",
        "",
        "| app | /health p50 ms | p99 ms | max ms | pings | 8 requests s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['p50'] * 1000:.1f} | {r['p99'] * 1000:.1f} | "
                     f"{r['max'] * 1000:.1f} | {r['n']:.0f} | {r['wall']:.2f} |")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.record:
        import suite  # the one place that writes RESULTS.md between markers

        suite.record(text + "\n", START, END, append=True)


if __name__ == "__main__":
    main()

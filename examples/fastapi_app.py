"""A FastAPI app that offloads CPU work to ashard without stalling its event loop.

    pip install fastapi uvicorn
    uvicorn examples.fastapi_app:app

The pool lives in the app's lifespan (workers start with the app, stop with it);
`/work` runs one CPU-bound call on a warm worker, `/spread` maps it over several,
and a client that disconnects cancels its work (the running shard is interrupted,
the worker goes back to the pool). `/health` stays fast while every worker is busy:
the workers are other processes, and ashard never blocks the loop.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request

import ashard

T = TypeVar("T")


def burn(seconds: float, marker: str | None = None) -> float:
    """CPU work for `seconds`; touches `marker` when it finishes (a cancelled run never
    does)."""
    end = time.perf_counter() + seconds
    x = 0.0
    while time.perf_counter() < end:
        x += 1.0
    if marker:
        open(marker, "w").close()
    return x


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with ashard.Pool(int(os.environ.get("WORKERS", "2"))) as pool:
        app.state.pool = pool
        yield


app = FastAPI(lifespan=lifespan)


async def until_disconnect(request: Request, work: Callable[[], Awaitable[T]]) -> T | None:
    """`work()`, cancelled if the client goes away first (None then)."""
    result: list[T] = []

    async def run(scope: anyio.CancelScope) -> None:
        result.append(await work())
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, tg.cancel_scope)
        while not await request.is_disconnected():  # noqa: ASYNC110 - starlette offers no event
            await anyio.sleep(0.05)
        tg.cancel_scope.cancel()  # the client left: interrupt the work
    return result[0] if result else None


@app.get("/health")
async def health() -> dict[str, Any]:
    return {"ok": True}


@app.get("/work")
async def work(request: Request, seconds: float = 0.5, marker: str | None = None) -> Any:
    pool: ashard.Pool = request.app.state.pool
    value = await until_disconnect(request, lambda: pool.call(burn, seconds, marker))
    return {"value": value}


@app.get("/spread")
async def spread(request: Request, seconds: float = 0.2, parts: int = 4) -> Any:
    pool: ashard.Pool = request.app.state.pool
    values = await pool.map(burn, [seconds] * parts, chunk_size=1)
    return {"values": values}


@app.get("/stats")
async def stats(request: Request) -> dict[str, Any]:
    s = request.app.state.pool.stats
    return {"alive": s.alive, "started": s.started, "crashed": s.crashed}

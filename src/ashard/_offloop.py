"""Imports off the caller's event loop.

A module's import holds the loop's thread for as long as it runs (ashard's call layer
takes 10-50 ms), so what a first call needs is imported in a thread of the running
loop's own: asyncio's default executor, or trio's threads (anyio is not used for it:
it may be among what is loaded). This module imports nothing as it is imported, so
that the package's lazy names can use it before anything else of ashard is loaded.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = [
    "STAND_INS",
    "anyio_backend",
    "end_launched_ahead",
    "import_in_a_thread",
    "on_a_loop",
    "stand_in",
]


def on_a_loop() -> bool:
    """Whether this thread is running an asyncio or a trio event loop."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None and asyncio._get_running_loop() is not None:
        return True
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_trio_token()  # (`in_trio_run` is trio 0.23's and later)
    except RuntimeError:
        return False
    return True


def anyio_backend() -> str:
    """The module of anyio's backend for the running loop (anyio loads it on first use)."""
    asyncio = sys.modules.get("asyncio")
    running = asyncio is not None and asyncio._get_running_loop() is not None
    return "anyio._backends._asyncio" if running else "anyio._backends._trio"


async def import_in_a_thread(*modules: str) -> None:
    """Import `modules` in a thread of the running loop's own (at once if all are)."""
    if all(n in sys.modules for n in modules):
        return
    asyncio = sys.modules.get("asyncio")
    loop = asyncio._get_running_loop() if asyncio is not None else None
    if loop is None:  # trio
        import trio

        await trio.to_thread.run_sync(_import_all, modules)
        return
    try:
        await loop.run_in_executor(None, _import_all, modules)
    except RuntimeError:  # its default executor was shut down
        _import_all(modules)


def _import_all(names: tuple[str, ...]) -> None:
    for name in names:
        importlib.import_module(name)


async def end_launched_ahead() -> None:
    """End the worker launched ahead (`ashard._spawn.prestart`) if no pool took it, and
    wait until it is reaped, cancelled or not: a call that leaves leaves no process."""
    from ashard import _spawn

    done = _spawn.discard()
    if done is not None:
        import anyio  # (loaded, but where the call failed before it)

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(done.result)


# The module-level async functions: read on a running loop before `ashard.api` is
# loaded, each is a stand-in (`stand_in`). True: it runs on the default pool unless
# given ``pool=``, so its stand-in launches that pool's first worker ahead.
STAND_INS = {
    "call": True,
    "map": True,
    "shard_map": True,
    "shard_reduce": True,
    "retry_failed": False,
    "shutdown": False,
}


def stand_in(module: str, name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
    """An async function that imports `module` in a thread, then awaits its `name`:
    what ``ashard.<name>`` is when first read on a running loop before `module` is
    loaded (the package's attribute is the function itself once it is). On the
    default pool, the pool's first worker is launched first, so that its interpreter
    starts while `module` loads (`ashard._spawn`; the call itself takes it or ends it
    once it runs); if the import fails or is cancelled, it is ended here."""

    async def deferred(*args: Any, **kwargs: Any) -> Any:
        ahead = STAND_INS[name] and kwargs.get("pool") is None and module not in sys.modules
        if ahead:
            from ashard import _spawn  # light: it imports nothing of ashard's

            _spawn.prestart()
        try:
            await import_in_a_thread(module)
        except BaseException:
            if ahead:
                await end_launched_ahead()
            raise
        return await getattr(sys.modules[module], name)(*args, **kwargs)

    deferred.__name__ = deferred.__qualname__ = name
    deferred.__module__ = module
    deferred.__doc__ = f"`{module}.{name}`, loaded off the event loop when first called."
    return deferred

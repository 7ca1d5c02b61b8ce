"""Shared fixtures: the anyio backends (every async test runs under asyncio and trio),
the leak check that runs after every test, and blockbuster, which fails a test that
makes a blocking call on the event loop."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator

import anyio
import psutil
import pytest

import ashard


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _children() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def _shm_segments() -> set[str]:
    """Named segments in /dev/shm, and the segments (memfd, or unlinked named) this process holds
    (as descriptors or mappings)."""
    try:
        named = {n for n in os.listdir("/dev/shm") if "ashard" in n}
    except FileNotFoundError:
        named = set()
    with open("/proc/self/maps") as f:
        mapped = {
            line.split(None, 5)[-1].strip()
            for line in f
            if "memfd:ashard" in line or "/dev/shm/ashard-" in line
        }
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "memfd:ashard" in target or "/dev/shm/ashard-" in target:
            fds.add(target)
    return named | mapped | fds


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail any test that leaves a child process or a shared-memory segment behind."""
    before = {p.pid for p in _children()}
    shm_before = _shm_segments()
    yield
    anyio.run(ashard.shutdown)
    deadline = time.monotonic() + 5.0
    while True:
        left = [p for p in _children() if p.pid not in before]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for p in left:
        p.kill()
    assert not left, f"test left child processes behind: {[p.pid for p in left]}"
    gc.collect()  # views the test held are gone with its frame; cycles may keep some
    deadline = time.monotonic() + 3.0  # large mappings are unmapped on a helper thread
    while (leaked := _shm_segments() - shm_before) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not leaked, f"test left shared-memory segments behind: {leaked}"


@pytest.fixture(autouse=True)
def no_blocking_calls(request: pytest.FixtureRequest) -> Iterator[None]:
    """Blocking calls on the event loop thread raise during async tests (asyncio)."""
    if request.node.get_closest_marker("anyio") is None:
        yield
        return
    from blockbuster import blockbuster_ctx

    with blockbuster_ctx():
        yield

"""Shared fixtures: the anyio backends (every async test runs under asyncio and trio),
the leak check that runs after every test, blockbuster, which fails a test that
makes a blocking call on the event loop, and an S3 server on loopback."""

from __future__ import annotations

import atexit
import compileall
import gc
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import anyio
import psutil
import pytest

import ashard
import s3server

# A temporary directory of this test session's own: the leak check below looks for
# ashard's temporary directories there, so test runs side by side never see (or remove)
# each other's. Workers and the scripts tests start inherit it through TMPDIR.
_SESSION_TMP = tempfile.mkdtemp(prefix="ashard-tests-")
tempfile.tempdir = _SESSION_TMP
os.environ["TMPDIR"] = _SESSION_TMP
atexit.register(shutil.rmtree, _SESSION_TMP, True)

# Every worker a test starts imports ashard, and often this directory's workloads, from
# source. Where PYTHONDONTWRITEBYTECODE is set (as in CI) no import caches what it
# compiled, so each start compiled them again: about 30 ms a worker, thousands of
# starts a run. Compiled once here, they are read back by every process.
compileall.compile_dir(os.path.dirname(ashard.__file__), quiet=2)
compileall.compile_dir(os.path.dirname(os.path.abspath(__file__)), maxlevels=0, quiet=2)


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
    """Fail any test that leaves a child process, a shared-memory segment or a
    temporary results directory behind."""
    before = {p.pid for p in _children()}
    shm_before = _shm_segments()
    dirs_before = _result_dirs()
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
    leaked = _shm_segments() - shm_before
    if leaked:  # a full collection costs 30-50 ms: only when something seems left
        gc.collect()  # views the test held are gone with its frame; cycles may keep some
        deadline = time.monotonic() + 3.0  # large mappings are unmapped on a helper thread
        while (leaked := _shm_segments() - shm_before) and time.monotonic() < deadline:
            time.sleep(0.02)
    assert not leaked, f"test left shared-memory segments behind: {leaked}"
    left_dirs = _result_dirs() - dirs_before
    for path in left_dirs:
        shutil.rmtree(path, ignore_errors=True)
    assert not left_dirs, f"test left temporary results directories behind: {left_dirs}"


def _result_dirs() -> set[str]:
    """ashard's temporary directories: table sinks (path=None) and results stores."""
    tmp = tempfile.gettempdir()
    return {
        os.path.join(tmp, n)
        for n in os.listdir(tmp)
        if n.startswith(("ashard-results-", "ashard-sink-"))
    }


_SYNC_BY_DESIGN = {
    "ashard/_places.py": {"check_fresh", "resolve"},
    "ashard/tables.py": {"read", "load", "dataset", "table_sink", "close", "gather"},
    "ashard/results.py": {"table", "dataset", "close", "timeline", "shards_table"},
}
"""The sync functions a user calls from async code knowing they touch files (as
`open` would): ashard's own async paths never go through them on the loop."""


@pytest.fixture(autouse=True)
def no_blocking_calls(request: pytest.FixtureRequest) -> Iterator[None]:
    """Blocking calls that ashard makes on the event loop thread raise during async
    tests (asyncio). The test's own code may block; so may the sync functions a user
    calls on purpose: checking a new sink's directory, reading or removing files."""
    if request.node.get_closest_marker("anyio") is None:
        yield
        return
    from blockbuster import blockbuster_ctx

    with blockbuster_ctx("ashard") as bb:
        for function in bb.functions.values():
            for filename, names in _SYNC_BY_DESIGN.items():
                function.can_block_in(filename, names)
        yield


# -- S3: a moto server on loopback, in a thread (tests/s3server.py) ----------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint (``127.0.0.1:port``) of an S3 server that lives for the session; the
    environment holds dummy keys for it (workers inherit them) and disables EC2 metadata."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in s3server.ENV.items():
            mp.setenv(name, value)
        endpoint, stop = s3server.start()
        try:
            yield endpoint
        finally:
            stop()


@pytest.fixture
def s3(s3_server: str) -> Iterator[s3server.Bucket]:
    """A fresh bucket for one test: `.fs`, `.bucket`, `.endpoint`, `.path(prefix)`,
    `.uri(prefix)` (see `s3server.Bucket`); removed afterwards."""
    bucket = s3server.Bucket.create(s3_server)
    yield bucket
    bucket.delete()

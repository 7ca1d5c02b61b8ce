"""The Dask backend: ashard workers hosted by Dask workers (DESIGN.md 2.4).

Dask places work on machines; on each machine ashard supervises. Imported only when
a pool is given ``cluster=``; nothing else in ashard imports dask.

**The caller's side** is `DaskBackend`, an `ashard._backend.Backend`. It owns a
synchronous `distributed.Client` of its own (thread-safe, run by Dask on a loop thread
of Dask's: so the pool serves asyncio and trio, and one event loop after another) and
registers `AshardPlugin` on every Dask worker. Each Dask worker offers `workers`
*slots*; a drive per slot takes a chunk from the job and sends it to that node as one
Dask task, pinned to it, with a deterministic key and no Dask retries, so nothing
Dask does can run a chunk twice. What happened to the chunk comes back as a list of
reports that the drive replays into the job (`deliver`, `worker_lost`, ...): exactly-
once delivery, retries and failure accounting stay the job's, as on one machine. A
node that leaves the cluster (a watcher polls the scheduler) is a lost worker for
every chunk it held. The job's function, options and borrow are scattered once per
call and reach each node once.

**Each node** (inside a Dask worker) runs an ashard `Scheduler` — the local backend:
processes, timeouts, crashes, memory caps — on an event loop thread of its own
(`NodeHost`). A `_Relay` stands for the caller's job in front of it: it hands out the
chunks that tasks bring, one per worker process, and records what the scheduler
reports of them. A node keeps one relay per call, so the borrow is shared into the
node's shared memory once and each worker process loads the function once; the relay
ends when the caller says the call is over (or cancelled: running shards are
interrupted, as on one machine).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import pickle
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
from distributed.diagnostics.plugin import WorkerPlugin

from ashard._handle import WorkerConfig
from ashard._health import HealthPolicy
from ashard._job import Chunk
from ashard._outcomes import CRASHED, Loss, failure
from ashard._output import write_text
from ashard._protocol import TIMEOUT
from ashard.errors import RemoteTraceback, WorkerStartError
from ashard.results import PoolStats

if TYPE_CHECKING:
    from ashard._job import Job
    from ashard._options import CallOptions
    from ashard._protocol import Result, SinkRef
    from ashard._scheduler import Scheduler

__all__ = ["AshardPlugin", "DaskBackend", "check_cluster"]

CONNECT_TIMEOUT = 30.0
"""Seconds to reach the Dask scheduler, and to wait for its first worker."""
TRIP_SECONDS = 0.05
"""What one chunk's trip through Dask costs, with margin: 5-25 ms of time and ~15 ms of
CPU spread over the caller, the scheduler and the node (measured on a loaded 2-core
machine). The job sizes chunks to carry several trips' worth of work, and a node
holds the next chunk while one runs."""
MAX_CHUNKS_PER_SECOND = 250.0
"""About how many chunks a second a pool sends its cluster at most, whatever its size:
each costs the Dask scheduler and the caller's client ~1-3 ms of CPU (measured), and
both are single event loops. A large cluster gets larger chunks instead."""
WATCH_INTERVAL = 0.5
"""Seconds between two looks at which Dask workers are in the cluster."""
PLUGIN_PREFIX = "ashard"
ENDED_KEPT = 10_000
"""Calls a node remembers as over, so that a late task of one does not revive it."""


def check_cluster(cluster: object) -> None:
    """Refuse what cannot be a cluster before anything connects."""
    if isinstance(cluster, str):
        if "://" not in cluster and ":" not in cluster:
            raise ValueError(
                f"cluster={cluster!r} is not a scheduler address: expected 'tcp://host:8786', "
                "a distributed.Client or a cluster object such as LocalCluster"
            )
        return
    if _address_of(cluster) is None:
        raise TypeError(
            "cluster must be a scheduler address ('tcp://host:8786'), a distributed.Client or "
            f"a cluster object (LocalCluster, SSHCluster, ...), got {type(cluster).__name__}"
        )


def _address_of(cluster: object) -> str | None:
    if isinstance(cluster, str):
        return cluster
    address = getattr(cluster, "scheduler_address", None)  # a distributed Cluster
    if isinstance(address, str):
        return address
    scheduler = getattr(cluster, "scheduler", None)  # a distributed.Client
    address = getattr(scheduler, "address", None)
    return address if isinstance(address, str) else None


# -- the caller's side ----------------------------------------------------------------


@dataclass(eq=False)
class _Node:
    """A Dask worker as the caller sees it: where it is and what it runs now."""

    address: str
    host: str
    slots: int
    gone: bool = False
    batches: set[_Batch] = field(default_factory=set)


@dataclass(eq=False)
class _Batch:
    """One chunk sent to a node as a Dask task, and how it ended."""

    chunk: Chunk
    node: _Node
    event: anyio.Event = field(default_factory=anyio.Event)
    on_done: Callable[[], None] | None = None
    reports: list[tuple[Any, ...]] | None = None
    error: BaseException | None = None
    finished: bool = False
    abandoned: bool = False  # the call is over: its result is not wanted


@dataclass(eq=False)
class _Call:
    """One run of a call's job on the cluster: its key and what every task needs."""

    job: Job
    key: str
    spec: bytes  # the pickled `_NodeJob`
    borrow: Any  # the Dask future of the scattered borrow, or None
    nodes: set[_Node] = field(default_factory=set)
    running: dict[_Batch, Any] = field(default_factory=dict)  # batch -> its Dask future


class RemoteWorker:
    """An ashard worker process on a node, as the job's diagnostics report it."""

    def __init__(self, pid: int, host: str, peak_rss: int, end_reason: Any, alive: bool) -> None:
        self.pid, self.host, self.peak_rss = pid, host, peak_rss
        self.end_reason, self.alive = end_reason, alive


class DaskBackend:
    """Runs jobs and calls on ashard workers inside the Dask workers of a cluster."""

    def __init__(
        self, cluster: object, per_node: int | None, config: WorkerConfig, policy: HealthPolicy
    ) -> None:
        self._cluster = cluster
        self._per_node = per_node
        self._config = config
        self._policy = policy
        self._name = f"{PLUGIN_PREFIX}-{secrets.token_hex(6)}"
        self._client: Any = None
        self._nodes: dict[str, _Node] = {}
        self._closed = False
        self._lock = anyio.Lock()
        self._keys = itertools.count()
        self._seq = itertools.count()
        self._started = self._crashed = self._timed_out = self._done = 0
        self._changed: anyio.Event | None = None

    # -- the pool ---------------------------------------------------------------------

    @property
    def size(self) -> int:
        live = [n.slots for n in self._nodes.values() if not n.gone]
        return sum(live) if live else (self._per_node or 1)

    @property
    def closed(self) -> bool:
        return self._closed

    def resize(self, size: int) -> None:
        raise ValueError(
            "workers= of a cluster pool is ashard workers per Dask worker, fixed when the pool "
            "is made: make another Pool(cluster=..., workers=...)"
        )

    async def start(self) -> None:
        async with self._lock:
            if self._closed:
                raise RuntimeError("the pool is closed")
            if self._client is None:
                await anyio.to_thread.run_sync(self._connect)

    def _connect(self) -> None:
        from distributed import Client

        address = _address_of(self._cluster)
        assert address is not None
        security = getattr(self._cluster, "security", None)
        try:
            client = Client(  # type: ignore[no-untyped-call]
                address,
                timeout=CONNECT_TIMEOUT,
                set_as_default=False,
                security=security,
                direct_to_workers=True,
            )
        except (OSError, TimeoutError) as exc:
            raise WorkerStartError(
                f"no Dask scheduler answered at {address} within {CONNECT_TIMEOUT:.0f} s: start "
                "one (`dask scheduler`), check the address, or pass a LocalCluster"
            ) from exc
        try:
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT)
            plugin = AshardPlugin(
                self._name, _version(), self._per_node, self._config, self._policy
            )
            client.register_plugin(plugin, name=self._name)
        except BaseException as exc:
            client.close()  # type: ignore[no-untyped-call]
            raise _start_error(address, exc) from exc
        self._client = client
        self._refresh()

    def _refresh(self) -> tuple[list[_Node], list[_Node]]:
        """Look at the cluster's workers (blocking): the nodes that came and went."""
        info = self._client.scheduler_info()["workers"]
        came = []
        for address, w in info.items():
            if address not in self._nodes:
                slots = self._per_node or int(w.get("nthreads") or 1)
                node = _Node(address, str(w.get("host") or address), slots)
                self._nodes[address] = node
                self._started += slots
                came.append(node)
        went = [n for a, n in self._nodes.items() if a not in info and not n.gone]
        for node in went:
            node.gone = True
            del self._nodes[node.address]
        return came, went

    async def aclose(self) -> None:
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_release, client, self._name)

    def stats(self) -> PoolStats:
        alive = sum(n.slots for n in self._nodes.values() if not n.gone)
        return PoolStats(alive, self._started, self._crashed, self._timed_out, 0, self._done)

    def pids(self) -> list[int]:
        return []  # the processes are on other machines: see diagnostics' per_worker

    # -- jobs -------------------------------------------------------------------------

    async def run(
        self, job: Job, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run `job` on the cluster's nodes until it is over (see the module docstring)."""
        await self.start()
        check_outputs(job.out)
        call = await self._prepare(job)
        job.served_by(self.size, self._trip())
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                for node in list(self._nodes.values()):
                    self._serve(call, node, tg)
                tg.start_soon(self._watch, call, tg)
                while not job.over:
                    await job.wait_change()
                tg.cancel_scope.cancel()
        except BaseException:
            job.abort()
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._end, call, not job.finished)

    def _trip(self) -> float:
        """The trip latency the job sizes chunks by: `TRIP_SECONDS`, or longer on a
        cluster so large that its chunks would come faster than `MAX_CHUNKS_PER_SECOND`."""
        from ashard._job import TRIPS_PER_CHUNK

        return max(TRIP_SECONDS, self.size / MAX_CHUNKS_PER_SECOND / TRIPS_PER_CHUNK)

    async def _prepare(self, job: Job) -> _Call:
        """What every task of the job needs: the job's function and options go with
        each task (small); its borrow is scattered to every node once (off the loop),
        landing in each node's shared memory (`_Landing`)."""
        out = {name: sink.spec() for name, sink in job.out.items()}  # table sinks only
        results = job.store.spec() if job.store is not None else None
        spec = _NodeJob(job.kind, job.fn, job.opts, job.layout, job.sys_path, out, results)
        try:  # once per call here, once per call on each node (not per chunk)
            spec_bytes = pickle.dumps(spec, protocol=5)
        except Exception as exc:
            raise TypeError(f"the call cannot be sent to the cluster: {exc}") from exc
        key = f"{self._name}-{next(self._keys)}"
        borrow = None
        if job.borrow:
            client = self._client
            names = list(job.borrow)
            values = [_landing(value) for value in job.borrow.values()]

            def scatter() -> Any:
                # A list, not the dict: Dask would take the dict's names as the data's
                # keys, and a key the cluster already holds keeps its old data.
                return client.scatter(values, broadcast=True, hash=False)

            try:
                borrow = dict(zip(names, await anyio.to_thread.run_sync(scatter), strict=True))
            except Exception as exc:
                raise TypeError(f"borrow cannot be sent to the cluster: {exc}") from exc
        return _Call(job, key, spec_bytes, borrow)

    def _serve(self, call: _Call, node: _Node, tg: anyio.abc.TaskGroup) -> None:
        call.nodes.add(node)
        tg.start_soon(self._drive, call, node)

    async def _watch(self, call: _Call, tg: anyio.abc.TaskGroup) -> None:
        """Notice nodes that left (their chunks are lost) and nodes that joined."""
        while True:
            await anyio.sleep(WATCH_INTERVAL)
            came, went = await anyio.to_thread.run_sync(self._refresh)
            for node in came:
                self._serve(call, node, tg)
            if came or went:
                call.job.served_by(self.size, self._trip())
                call.job.notify()

    async def _drive(self, call: _Call, node: _Node) -> None:
        """Keep `node` busy: as many chunks in flight as its slots hold (times the job's
        window, so that the next chunk waits on the node while one runs), each told to
        the job as it ends."""
        job = call.job
        token = anyio.lowlevel.current_token()
        inflight: list[_Batch] = []
        while True:
            for batch in [b for b in inflight if b.finished or node.gone]:
                inflight.remove(batch)
                self._settle(call, batch)
            if node.gone or job.over:
                return
            room = node.slots * job.window() - len(inflight)
            while room > 0:
                chunk = job.take_chunk(next(self._seq))
                if chunk is None:
                    break
                batch = _Batch(chunk, node, on_done=job.notify)
                inflight.append(batch)
                self._submit(call, batch, token)
                room -= 1
            await job.wait_change()

    def _settle(self, call: _Call, batch: _Batch) -> None:
        """Tell the job how `batch` ended: its reports, the error that ends the call, or
        (its node left, or Dask lost the task) a lost worker."""
        node, job = batch.node, call.job
        node.batches.discard(batch)
        call.running.pop(batch, None)
        if batch.reports is not None:
            self._replay(job, batch, node)
        elif batch.error is not None and not node.gone:
            job.abort(batch.error)
        else:
            batch.abandoned = True
            loss = Loss(0, None, None, f"its Dask worker {node.address} left the cluster")
            self._crashed += 1
            job.worker_lost([batch.chunk], loss, timed_out=False)

    def _submit(self, call: _Call, batch: _Batch, token: Any) -> None:
        batch.node.batches.add(batch)
        chunk = batch.chunk
        work = (chunk.first, chunk.count, chunk.attempts, chunk.items)
        future = self._client.submit(
            run_chunk, self._name, call.key, call.spec, call.borrow, work,
            key=f"{call.key}-{chunk.seq}", workers=[batch.node.address],
            allow_other_workers=False, retries=0, pure=False,
        )  # fmt: skip

        call.running[batch] = future
        future.add_done_callback(_when_done(batch, token))

    def _replay(self, job: Job, batch: _Batch, node: _Node) -> None:
        """Tell the job what the node's scheduler told the relay, in order."""
        chunk = batch.chunk
        assert batch.reports is not None
        for report in batch.reports:
            kind = report[0]
            if kind == "deliver":
                _, k0, values, errors, elapsed, final, pid, writes, commits = report
                job.deliver(chunk, k0, values, errors, elapsed, final, pid, writes, commits)
                self._done += len(values)
                self._timed_out += sum(1 for e in errors if e[1] == TIMEOUT)
            elif kind == "unreadable":
                _, result, pid, exc = report
                job.deliver_unreadable(chunk, result, pid, exc)
            elif kind == "unsendable":
                job.unsendable(chunk, report[1])
            elif kind == "lost":
                _, loss, timed_out = report
                if timed_out:
                    self._timed_out += 1
                else:
                    self._crashed += 1
                job.worker_lost([chunk], loss, timed_out=timed_out)
            elif kind == "worker":
                _, pid, peak, ended, alive = report
                job.ran_on(RemoteWorker(pid, node.host, peak, ended, alive))
            elif kind == "abort":
                job.abort(report[1])
            elif kind == "output":
                write_text(report[1], report[2])

    def _end(self, call: _Call, cancelled: bool) -> None:
        """The call is over (blocking): stop what runs of it and let its data go."""
        client = self._client
        if client is None:
            return
        for batch in call.running:
            batch.abandoned = True
        try:
            if call.running:
                client.cancel(list(call.running.values()))
            client.run(end_job, self._name, call.key, cancelled, wait=False)
        except Exception:  # the cluster is going away: its workers end ours
            pass

    # -- one-shot calls ---------------------------------------------------------------

    async def call(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        max_retries: int = 0,
    ) -> Any:
        """``fn(*args, **kwargs)`` on a worker of some node; a run lost with its node
        runs again, on another, up to `max_retries` times."""
        await self.start()
        token = anyio.lowlevel.current_token()
        for attempt in range(1, max_retries + 2):
            nodes = [n for n in self._nodes.values() if not n.gone]
            if not nodes:
                raise WorkerStartError("the cluster has no Dask worker left")
            node = min(nodes, key=lambda n: len(n.batches))
            batch = _Batch(Chunk(next(self._seq), 0, 1, None, None), node)
            node.batches.add(batch)
            try:
                future = self._client.submit(
                    run_call, self._name, fn, args, kwargs, timeout, max_retries,
                    key=f"{self._name}-call-{batch.chunk.seq}", workers=[node.address],
                    allow_other_workers=False, retries=0, pure=False,
                )  # fmt: skip
                future.add_done_callback(_when_done(batch, token, wrap=True))
                try:
                    await batch.event.wait()
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(_cancel_call, self._client, future)
                    raise
            finally:
                node.batches.discard(batch)
            if batch.reports is not None:
                outcome = batch.reports[0]
                for name, text in outcome[-1]:
                    write_text(name, text)
                if outcome[0] == "value":
                    return outcome[1]
                raise _rebuilt(outcome)
            if batch.error is not None:
                raise batch.error
            self._crashed += 1
            loss = Loss(0, None, None, f"its Dask worker {node.address} left the cluster")
            error = failure(CRASHED, loss, subject="call", shard=None, attempts=attempt,
                            timeout=timeout)  # fmt: skip
        raise error


def _finish(batch: _Batch, reports: Any, error: BaseException | None) -> None:
    batch.reports, batch.error, batch.finished = reports, error, True
    batch.event.set()
    if batch.on_done is not None:
        batch.on_done()


def _when_done(batch: _Batch, token: Any, wrap: bool = False) -> Callable[[Any], None]:
    """A Dask future's done-callback (it runs in a thread of Dask's): take the task's
    reports, or how it failed, and wake the task waiting for `batch` in the caller's
    loop (`token`). `wrap`: the value is one report (a call's outcome)."""

    def done(f: Any) -> None:
        if batch.abandoned:
            return
        reports: Any = None
        error: BaseException | None = None
        try:
            if f.status == "finished":
                reports = [f.result()] if wrap else f.result()
            elif f.status == "error":
                error = f.exception()
        except BaseException as exc:  # cancelled or released meanwhile
            error = exc
        with contextlib.suppress(Exception):  # the caller's loop is gone: nobody waits
            anyio.from_thread.run_sync(_finish, batch, reports, error, token=token)

    return done


def _cancel_call(client: Any, future: Any) -> None:
    """The caller left mid-call: stop the task and interrupt the shard running it."""
    try:
        client.run(cancel_call, future.key, wait=False)
        client.cancel([future])
    except Exception:
        pass


def _release(client: Any, name: str) -> None:
    """Stop the pool's ashard workers on every node and close our client."""
    try:
        client.unregister_worker_plugin(name)
    except Exception:
        pass
    finally:
        client.close()


def check_outputs(out: dict[str, Any]) -> None:
    """Refuse outputs a cluster cannot take, naming them, before anything runs."""
    from ashard.tables import TableSink

    bad = [name for name, value in out.items() if not isinstance(value, TableSink)]
    if bad:
        raise ValueError(
            f"out={bad!r}: buffers cannot span machines, so a pool with cluster= takes no "
            "out= arrays or buffers; write tables with out={'name': ashard.table_sink(path)} "
            "on a path every node sees, or return the values"
        )


def _version() -> str:
    from ashard._version import __version__

    return __version__


def _start_error(address: str, exc: BaseException) -> WorkerStartError:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TimeoutError | OSError) and "worker" in str(exc).lower():
        return WorkerStartError(
            f"the Dask scheduler at {address} has no worker (waited {CONNECT_TIMEOUT:.0f} s): "
            "start one with `dask worker " + address + "`"
        )
    if "No module named 'ashard'" in text or ("ashard" in text and "ModuleNotFound" in text):
        return WorkerStartError(
            f"a Dask worker of {address} cannot import ashard: install it there, the same "
            f"version as here ({_version()}): pip install 'ashard[dask]=={_version()}'"
        )
    return WorkerStartError(f"the Dask workers of {address} could not start ashard workers: {text}")


def _rebuilt(outcome: tuple[Any, ...]) -> BaseException:
    """A call's exception as the node sent it: itself where it unpickles, with the
    worker's traceback as its cause."""
    _, exc, cause, _lines = outcome
    if cause is not None and exc.__cause__ is None:
        exc.__cause__ = RemoteTraceback(cause)
    return exc  # type: ignore[no-any-return]


LAND_BYTES = 1 << 20
"""Borrowed arrays from this size land in a node's shared memory as they arrive."""


class _Landing:
    """A borrowed array on its way to a node. It unpickles there straight into shared
    memory (a `SharedArray`), so the node holds it once: the copy the Dask worker keeps
    is the very segment its ashard workers map. It pickles again (a peer fetching it,
    Dask spilling it) from that memory, without a copy."""

    def __init__(self, array: Any) -> None:
        self.array = array  # an ndarray, or (on a node) a SharedArray

    def __reduce__(self) -> tuple[Any, ...]:
        import pickle

        import numpy as np

        from ashard.shared import Buffer, SharedArray

        view = self.array.array if isinstance(self.array, SharedArray | Buffer) else self.array
        data = np.ascontiguousarray(view)
        return (_land, (pickle.PickleBuffer(data.data), data.dtype.str, data.shape))

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


def _land(buffer: Any, dtype: str, shape: tuple[int, ...]) -> _Landing:
    import numpy as np

    from ashard.shared import SharedArray

    array = np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape)
    return _Landing(SharedArray.copy_of(array))


def _landing(value: Any) -> Any:
    """`value` as it should travel to the nodes: large plain numeric arrays and
    ashard's shared arrays as a `_Landing`, anything else as it is (pickled)."""
    from ashard._export import _plain_array
    from ashard._shm import SHAREABLE_KINDS
    from ashard.shared import Buffer, SharedArray

    if isinstance(value, SharedArray | Buffer):
        return _Landing(value)
    if _plain_array(value) and value.dtype.kind in SHAREABLE_KINDS and value.nbytes >= LAND_BYTES:
        return _Landing(value)
    return value


def _landed(value: Any) -> Any:
    return value.array if isinstance(value, _Landing) else value


def _sizeof_landing(value: _Landing) -> int:
    return value.nbytes


with contextlib.suppress(ImportError):  # Dask's memory accounting sees the array's size
    from dask.sizeof import sizeof

    sizeof.register(_Landing)(_sizeof_landing)  # type: ignore[no-untyped-call]


# -- on each node -----------------------------------------------------------------------


@dataclass(frozen=True)
class _NodeJob:
    """What a node needs to run chunks of one call (scattered once per call)."""

    kind: int
    fn: Any
    opts: CallOptions
    layout: Any
    sys_path: list[str]
    out: dict[str, SinkRef]  # table sinks, as specs
    results: SinkRef | None  # where results="table" / "disk" go


def _node_host(name: str) -> NodeHost:
    """This node's host of pool `name`, for a task that will wait on it. Where the
    node has more ashard workers than Dask threads, the task leaves Dask's thread pool
    (`secede`, which costs the scheduler a message), so that how many chunks the node
    runs at once is its ashard workers' count."""
    from distributed import get_worker, secede

    plugin: Any = get_worker().plugins.get(name)
    if plugin is None or plugin.host is None:
        raise RuntimeError(f"this Dask worker has no ashard plugin {name!r} (the pool closed?)")
    host: NodeHost = plugin.host
    if host.secede:
        secede()  # type: ignore[no-untyped-call]
    return host


def run_chunk(
    name: str, key: str, spec: bytes, borrow: Any, work: tuple[int, int, Any, Any]
) -> list[tuple[Any, ...]]:
    """A Dask task: run one chunk of call `key` on this node's ashard workers; what
    happened to it, as reports for the caller's job."""
    return _node_host(name).run_chunk(key, spec, borrow, work)


def run_call(
    name: str, fn: Any, args: Any, kwargs: Any, timeout: Any, max_retries: int
) -> tuple[Any, ...]:
    """A Dask task: one `call` on this node's ashard workers."""
    return _node_host(name).run_call(fn, args, kwargs, timeout, max_retries)


async def end_job(name: str, key: str, cancelled: bool, dask_worker: Any = None) -> None:
    """Run by the caller on every Dask worker: call `key` is over (or cancelled)."""
    plugin = dask_worker.plugins.get(name) if dask_worker is not None else None
    if plugin is not None and plugin.host is not None:
        plugin.host.end_job(key, cancelled)


async def cancel_call(key: str, dask_worker: Any = None) -> None:
    """Run by the caller on every Dask worker: interrupt the task `key` if it runs here."""
    for plugin in list(getattr(dask_worker, "plugins", {}).values()):
        host = getattr(plugin, "host", None)
        if isinstance(host, NodeHost):
            host.cancel_call(key)


class AshardPlugin(WorkerPlugin):
    """The Dask worker plugin that hosts a pool's ashard workers on each node."""

    idempotent = False

    def __init__(
        self,
        name: str,
        version: str,
        per_node: int | None,
        config: WorkerConfig,
        policy: HealthPolicy,
    ) -> None:
        self.name = name
        self.version = version
        self.per_node = per_node
        self.config = config
        self.policy = policy
        self.host: NodeHost | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "host": None}

    def setup(self, worker: Any) -> None:
        mine = _version()
        if mine != self.version:
            raise RuntimeError(
                f"ashard {mine} is installed on the Dask worker {worker.address}, the caller "
                f"runs {self.version}: install the same version on every machine"
            )
        state = getattr(worker, "state", worker)
        threads = int(getattr(state, "nthreads", 1) or 1)
        size = self.per_node or threads
        self.host = NodeHost(size, self.config, self.policy, worker.address, threads)

    async def teardown(self, worker: Any) -> None:
        host, self.host = self.host, None
        if host is not None:
            await asyncio.wrap_future(host.close())


@dataclass(eq=False)
class _Work:
    """A chunk a task brought, and what happened to it."""

    first: int
    count: int
    attempts: list[int] | None
    items: list[Any] | None
    done: concurrent.futures.Future[list[tuple[Any, ...]]]
    reports: list[tuple[Any, ...]] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)


class NodeHost:
    """A node's ashard workers: a local `Scheduler` on an event loop thread of its own,
    and a relay per call that runs on them."""

    def __init__(
        self, size: int, config: WorkerConfig, policy: HealthPolicy, where: str, threads: int
    ) -> None:
        from ashard._loopthread import LoopThread
        from ashard._scheduler import Scheduler

        self.where = where
        self.secede = size > threads  # tasks must leave Dask's threads to fill the workers
        self.scheduler: Scheduler = Scheduler(size, config, policy)
        self._thread = LoopThread("ashard-node")
        self._relays: dict[str, _Relay] = {}
        self._ended: dict[str, None] = {}  # calls over, newest last
        self._calls: dict[str, asyncio.Task[Any]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._soon(self._warm)  # the workers start now, not with the first chunk

    def _warm(self) -> None:
        task = asyncio.ensure_future(self._start())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self) -> None:
        with contextlib.suppress(Exception):  # a failing `init` is the first chunk's error
            await self.scheduler.start()

    def _soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self._thread.loop().call_soon_threadsafe(fn, *args)

    def run_chunk(
        self, key: str, spec: bytes, borrow: Any, work: tuple[int, int, Any, Any]
    ) -> list[tuple[Any, ...]]:
        """Blocking, in a Dask worker thread: queue the chunk and wait for its end."""
        first, count, attempts, items = work
        done: concurrent.futures.Future[list[tuple[Any, ...]]] = concurrent.futures.Future()
        work_ = _Work(first, count, attempts, items, done)
        self._soon(self._enqueue, key, spec, borrow, work_)
        return done.result()

    def _enqueue(self, key: str, spec_bytes: bytes, borrow: Any, work: _Work) -> None:
        if key in self._ended:  # a task that Dask started after the call was over
            work.done.set_result([("abort", RuntimeError("the call is over on this node"))])
            return
        relay = self._relays.get(key)
        if relay is None:
            spec: _NodeJob = pickle.loads(spec_bytes)  # once per call on this node
            landed = {name: _landed(value) for name, value in (borrow or {}).items()}
            relay = self._relays[key] = _Relay(spec, landed)
            unseen = _unseen_places(spec, self.where)
            if unseen is not None:
                relay.abort(unseen)
            task = asyncio.ensure_future(self._serve(key, relay))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        relay.push(work)

    async def _serve(self, key: str, relay: _Relay) -> None:
        from ashard._output import redirect

        redirect(relay.output)  # worker lines go back to the caller with the chunks
        try:
            await self.scheduler.run(relay)  # type: ignore[arg-type]
        except BaseException as exc:
            relay.abort(exc if isinstance(exc, Exception) else None)
        finally:
            relay.close(cancelled=True)
            if self._relays.get(key) is relay:
                del self._relays[key]

    def end_job(self, key: str, cancelled: bool) -> None:
        self._soon(self._end_job, key, cancelled)

    def _end_job(self, key: str, cancelled: bool) -> None:
        self._ended[key] = None
        while len(self._ended) > ENDED_KEPT:
            del self._ended[next(iter(self._ended))]
        relay = self._relays.get(key)
        if relay is not None:
            relay.close(cancelled)

    def run_call(
        self, fn: Any, args: Any, kwargs: Any, timeout: Any, max_retries: int
    ) -> tuple[Any, ...]:
        """Blocking, in a Dask worker thread: one call on a worker of this node."""
        from distributed import get_worker

        key = str(get_worker().get_current_task())
        loop = self._thread.loop()
        result: concurrent.futures.Future[tuple[Any, ...]] = concurrent.futures.Future()

        def begin() -> None:
            task = asyncio.ensure_future(self._call(fn, args, kwargs, timeout, max_retries))
            self._calls[key] = task

            def settle(t: asyncio.Task[Any]) -> None:
                self._calls.pop(key, None)
                if t.cancelled():
                    result.set_result(("raised", _cancelled(), None, []))
                elif t.exception() is not None:
                    result.set_exception(t.exception())
                else:
                    result.set_result(t.result())

            task.add_done_callback(settle)

        loop.call_soon_threadsafe(begin)
        return result.result()

    async def _call(
        self, fn: Any, args: Any, kwargs: Any, timeout: Any, max_retries: int
    ) -> tuple[Any, ...]:
        from ashard._output import redirect

        lines: list[tuple[str, str]] = []
        redirect(lambda name, text: lines.append((name, text)))
        try:
            value = await self.scheduler.call(fn, args, kwargs, timeout, max_retries)
        except Exception as exc:
            cause = exc.__cause__
            text = cause.text if isinstance(cause, RemoteTraceback) else None
            exc.__cause__ = None
            return ("raised", _portable(exc), text, lines)
        return ("value", value, lines)

    def cancel_call(self, key: str) -> None:
        self._soon(self._cancel_call, key)

    def _cancel_call(self, key: str) -> None:
        task = self._calls.get(key)
        if task is not None:
            task.cancel()

    def close(self) -> concurrent.futures.Future[None]:
        """Stop every worker process of this node (the pool closed)."""
        return asyncio.run_coroutine_threadsafe(self._close(), self._thread.loop())

    async def _close(self) -> None:
        for relay in list(self._relays.values()):
            relay.close(cancelled=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.scheduler.aclose()


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a RuntimeError that names it."""
    import pickle

    import cloudpickle

    try:
        pickle.loads(cloudpickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _cancelled() -> BaseException:
    return RuntimeError("the call was cancelled")


class _Store:
    """The caller's results store as a node's scheduler needs it: where to write."""

    def __init__(self, ref: SinkRef) -> None:
        self._ref = ref

    def spec(self) -> SinkRef:
        return self._ref


def _unseen_places(spec: _NodeJob, where: str) -> ValueError | None:
    """Why this node cannot write where the call's outputs go (a local directory it
    does not see), or None."""
    named = [(f"out[{name!r}]", ref) for name, ref in spec.out.items()]
    if spec.results is not None:
        named.append(("results_path", spec.results))
    for what, ref in named:
        place = ref.place
        if place.local and not os.path.isdir(place.root):
            return ValueError(
                f"{what}: the directory {place.root} is not visible on the Dask worker "
                f"{where}; with cluster=, table sinks and results_path need a location every "
                "node sees (a shared directory or an object-store URI)"
            )
    return None


class _Relay:
    """The caller's job as a node's local scheduler sees it (`ashard._backend`'s side
    of a job): chunks come from tasks, one per worker process at a time, and each
    report of the scheduler is recorded for the task that brought the chunk."""

    def __init__(self, spec: _NodeJob, borrow: dict[str, Any]) -> None:
        self.kind = spec.kind
        self.fn = spec.fn
        self.borrow = borrow
        self.out: dict[str, Any] = dict(spec.out)
        self.store = None if spec.results is None else _Store(spec.results)
        self.opts = spec.opts
        self.layout = spec.layout
        self.sys_path = spec.sys_path
        self._queue: deque[_Work] = deque()
        self._of: dict[Chunk, _Work] = {}
        self._workers: dict[int, Any] = {}
        self._closed = self._cancelled = False
        self._error: BaseException | None = None  # what ended it early, for late chunks
        self._lines: list[tuple[str, str, str]] = []  # printed while no chunk ran
        self._current: _Work | None = None  # whose lines are being read
        self._changed: anyio.Event | None = None

    def output(self, name: str, text: str) -> None:
        """Lines a worker of this call printed: they go back with a chunk of the call
        that is running (or the next one to end)."""
        work = self._current or next(iter(self._of.values()), None)
        if work is not None:
            work.reports.append(("output", name, text))
        else:
            self._lines.append(("output", name, text))

    def push(self, work: _Work) -> None:
        if self._closed:
            error = self._error or RuntimeError("the call is over on this node")
            work.done.set_result([("abort", error)])
            return
        self._queue.append(work)
        self.notify()

    def close(self, cancelled: bool) -> None:
        if self._closed:
            return
        self._closed, self._cancelled = True, cancelled
        for work in [*self._queue, *self._of.values()]:
            self._end(work)
        self._queue.clear()
        self.notify()

    # -- what the scheduler asks ------------------------------------------------------

    def served_by(self, workers: int) -> None:
        pass

    def notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_change(self) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    @property
    def over(self) -> bool:
        return self._closed

    @property
    def finished(self) -> bool:
        return self._closed and not self._cancelled

    def abort(self, exc: BaseException | None = None) -> None:
        if exc is not None:
            self._error = self._error or exc
            for work in [*self._queue, *self._of.values()]:
                work.reports.append(("abort", exc))
        self.close(cancelled=True)

    def has_work(self) -> bool:
        return bool(self._queue) and not self._closed

    def window(self) -> int:
        return 1

    def take_chunk(self, seq: int, limit: int | None = None) -> Chunk | None:
        if not self.has_work():
            return None
        work = self._queue.popleft()
        if self._lines:
            work.reports.extend(self._lines)
            self._lines.clear()
        chunk = Chunk(seq, work.first, work.count, work.attempts, work.items)
        self._of[chunk] = work
        return chunk

    def ran_on(self, worker: Any) -> None:
        self._workers[worker.pid] = worker

    def deliver(
        self,
        chunk: Chunk,
        k0: int,
        values: list[Any],
        errors: list[Any],
        elapsed: Any,
        final: bool,
        pid: int,
        writes: Any = None,
        commits: Any = None,
    ) -> None:
        work = self._of[chunk]
        chunk.done = k0 + len(values)
        work.pids.add(pid)
        if final:
            self._read_output(work, pid)  # what its shards printed goes back with it
        work.reports.append(("deliver", k0, values, errors, elapsed, final, pid, writes, commits))
        if final:
            self._chunk_over(chunk)

    def deliver_unreadable(self, chunk: Chunk, report: Result, pid: int, exc: Exception) -> None:
        work = self._of[chunk]
        chunk.done = report.k0 + report.n
        work.pids.add(pid)
        work.reports.append(("unreadable", report, pid, exc))
        if report.final:
            self._chunk_over(chunk)

    def sent(self, chunk: Chunk, nbytes: int) -> None:
        pass  # the caller's job bounds what it holds; here the task holds the chunk

    def undelivered(self, chunks: list[Chunk]) -> None:
        """The worker ended before these chunks reached it: they run on another one."""
        for chunk in reversed(chunks):
            self._queue.appendleft(self._of.pop(chunk))
        self.notify()

    def unsendable(self, chunk: Chunk, exc: Exception) -> None:
        work = self._of[chunk]
        work.reports.append(("unsendable", exc))
        self._chunk_over(chunk)

    def worker_lost(self, chunks: list[Chunk], loss: Loss, *, timed_out: bool) -> None:
        for chunk in chunks:
            work = self._of[chunk]
            chunk.done = chunk.count
            work.pids.add(loss.pid)
            work.reports.append(("lost", loss, timed_out))
            self._chunk_over(chunk)

    def _read_output(self, work: _Work, pid: int) -> None:
        worker = self._workers.get(pid)
        output = getattr(worker, "output", None)
        if output is None:
            return
        self._current = work
        try:
            output.drain()
        finally:
            self._current = None

    def _chunk_over(self, chunk: Chunk) -> None:
        work = self._of.pop(chunk)
        self._end(work)
        self.notify()

    def _end(self, work: _Work) -> None:
        if work.done.done():
            return
        for pid in sorted(work.pids):
            w = self._workers.get(pid)
            if w is not None:
                work.reports.insert(0, ("worker", pid, w.peak_rss, w.end_reason, w.alive))
        work.done.set_result(list(work.reports))

"""The caller's side of the Dask backend: `DaskBackend`, an `ashard._backend.Backend`.

It owns a synchronous `distributed.Client` of its own (thread-safe, run by Dask on a
loop thread of Dask's: so the pool serves asyncio and trio, and one event loop after
another) and registers `AshardPlugin` (`ashard._dask.node`) on every Dask worker.
Each Dask worker offers `workers` *slots*; a drive per slot takes a chunk from the job
and sends it to that node as one Dask task, pinned to it, with a deterministic key and
no Dask retries, so nothing Dask does can run a chunk twice. What happened to the
chunk comes back as a list of typed reports (`ashard._dask.wire`) that the drive
replays into the job: exactly-once delivery, retries and failure accounting stay the
job's, as on one machine. A node that leaves the cluster (a watcher polls the
scheduler) is a lost worker for every chunk it held. The job's function and options
go with each task, pickled once per call; its borrow is scattered once per call and
reaches each node once (`ashard._dask.landing`).

This is the only module of the package that the rest of ashard imports. It imports
`node` for the plugin class and the task functions Dask runs there; neither loads
the local backend (`ashard._scheduler`) in the caller's process.
"""

from __future__ import annotations

import contextlib
import itertools
import pickle
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
from distributed import Client

from ashard._backend import OneLoop, on_one_loop
from ashard._dask import wire
from ashard._dask.landing import landing
from ashard._dask.node import (
    AshardPlugin,
    cancel_call,
    end_job,
    node_stacks,
    run_call,
    run_chunk,
)
from ashard._outcomes import CRASHED, Loss, failure
from ashard._output import write_text
from ashard._protocol import TIMEOUT
from ashard._sizing import TRIPS_PER_CHUNK
from ashard.errors import RemoteTraceback, WorkerStartError
from ashard.results import PoolStats
from ashard.tables import TableSink

if TYPE_CHECKING:
    from ashard._backend import CallWork, Chunk, JobPort, JobWork
    from ashard._handle import WorkerConfig
    from ashard._health import EndReason, HealthPolicy

__all__ = ["DaskBackend", "check_cluster", "check_outputs"]

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


def check_outputs(out: Mapping[str, Any]) -> None:
    """Refuse outputs a cluster cannot take, naming them, before anything runs."""
    bad = [name for name, value in out.items() if not isinstance(value, TableSink)]
    if bad:
        raise ValueError(
            f"out={bad!r}: buffers cannot span machines, so a pool with cluster= takes no "
            "out= arrays or buffers; write tables with out={'name': ashard.table_sink(path)} "
            "on a path every node sees, or return the values"
        )


# -- what the caller keeps of the cluster and of each task -----------------------------


@dataclass(eq=False)
class _Node:
    """A Dask worker as the caller sees it: where it is and what it runs now."""

    address: str
    host: str
    slots: int
    gone: bool = False
    tasks: set[_Task] = field(default_factory=set)


@dataclass(eq=False)
class _Task:
    """One Dask task sent to a node (a `call`, or a chunk: `_Batch`), and how it ended."""

    node: _Node
    event: anyio.Event = field(default_factory=anyio.Event)
    on_done: Callable[[], None] | None = None
    answer: Any = None  # what the task returned: a chunk's reports, or a call's `Outcome`
    error: BaseException | None = None
    finished: bool = False
    abandoned: bool = False  # the call is over: its result is not wanted


@dataclass(eq=False)
class _Batch(_Task):
    """One chunk sent to a node as a Dask task."""

    chunk: Chunk = field(kw_only=True)


@dataclass(eq=False)
class _Call:
    """One run of a call's job on the cluster: its key and what every task needs."""

    job: JobPort
    key: str
    spec: bytes  # the pickled `JobWork`, its borrow left out
    borrow: Any  # the Dask future of the scattered borrow, or None
    together: int  # async shards a worker runs at once (`shard_concurrency`)
    nodes: set[_Node] = field(default_factory=set)
    running: dict[_Batch, Any] = field(default_factory=dict)  # batch -> its Dask future


@dataclass(frozen=True)
class RemoteWorker:
    """An ashard worker process on a node, as the job's diagnostics report it."""

    pid: int
    host: str
    peak_rss: int
    end_reason: EndReason | None
    alive: bool


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
        self.one_loop = OneLoop()
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

    async def start(self, up_to: int | None = None) -> None:
        async with self._lock:
            if self._closed:
                raise RuntimeError("the pool is closed")
            if self._client is None:
                await anyio.to_thread.run_sync(self._connect)

    def _connect(self) -> None:
        address = _address_of(self._cluster)
        assert address is not None
        security = getattr(self._cluster, "security", None)
        try:
            client = Client(
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
            version = wire.version()
            plugin = AshardPlugin(self._name, version, self._per_node, self._config, self._policy)
            client.register_plugin(plugin, name=self._name)
        except BaseException as exc:
            client.close()
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

    async def stacks(self) -> dict[int, tuple[int | None, str | None]]:
        """Every busy ashard worker's stack, asked of each node at once (off the loop)."""
        client = self._client
        if client is None:
            return {}
        name = self._name
        per_node = await anyio.to_thread.run_sync(lambda: client.run(node_stacks, name))
        found: dict[int, tuple[int | None, str | None]] = {}
        for stacks in per_node.values():
            found.update(stacks)
        return dict(sorted(found.items()))

    # -- jobs -------------------------------------------------------------------------

    @on_one_loop
    async def run(
        self, job: JobPort, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run `job` on the cluster's nodes until it is over (see the module docstring)."""
        await self.start()
        work = job.work()
        check_outputs(work.out)
        call = await self._prepare(job, work)
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
        return max(TRIP_SECONDS, self.size / MAX_CHUNKS_PER_SECOND / TRIPS_PER_CHUNK)

    async def _prepare(self, job: JobPort, work: JobWork) -> _Call:
        """What every task of the job needs: what to run goes with each task (small:
        the borrow goes on its own, outputs as their specs); its borrow is scattered to
        every node once (off the loop), landing in each node's shared memory
        (`ashard._dask.landing`)."""
        if work.opts.footprint is not None:
            raise ValueError(
                "footprint= is not supported on a cluster pool (cluster=): it needs the "
                "pool's mem_budget, which a cluster pool does not have"
            )
        out = {name: sink.spec() for name, sink in work.out.items()}  # table sinks only
        # the error rules and footprint are the caller's job's: they stay here
        opts = replace(work.opts, retry_errors=False, on_error=None, footprint=None)
        spec = replace(work, borrow={}, out=out, opts=opts)
        try:  # once per call here, once per call on each node (not per chunk)
            spec_bytes = pickle.dumps(spec, protocol=5)
        except Exception as exc:
            raise TypeError(f"the call cannot be sent to the cluster: {exc}") from exc
        key = f"{self._name}-{next(self._keys)}"
        borrow = None
        if work.borrow:
            client = self._client
            names = list(work.borrow)
            values = [landing(value) for value in work.borrow.values()]

            def scatter() -> Any:
                # A list, not the dict: Dask would take the dict's names as the data's
                # keys, and a key the cluster already holds keeps its old data.
                return client.scatter(values, broadcast=True, hash=False)

            try:
                borrow = dict(zip(names, await anyio.to_thread.run_sync(scatter), strict=True))
            except Exception as exc:
                raise TypeError(f"borrow cannot be sent to the cluster: {exc}") from exc
        return _Call(job, key, spec_bytes, borrow, work.opts.shard_concurrency)

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
            while len(inflight) < node.slots * job.window():  # as it is after each chunk
                chunk = job.take_chunk(next(self._seq))
                if chunk is None:
                    break
                batch = _Batch(node, on_done=job.notify, chunk=chunk)
                inflight.append(batch)
                self._submit(call, batch, token)
            await job.wait_change()

    def _settle(self, call: _Call, batch: _Batch) -> None:
        """Tell the job how `batch` ended: its reports, the error that ends the call, or
        (its node left, or Dask lost the task) a lost worker."""
        node, job = batch.node, call.job
        node.tasks.discard(batch)
        call.running.pop(batch, None)
        if batch.answer is not None:
            answer, batch.answer = batch.answer, None  # told once: the job holds it now
            self._replay(job, batch.chunk, node, answer)
        elif batch.error is not None and not node.gone:
            job.abort(batch.error)
        else:
            batch.abandoned = True
            loss = Loss(0, None, None, f"its Dask worker {node.address} left the cluster")
            self._crashed += 1
            job.worker_lost([batch.chunk], loss, timed_out=False)

    def _submit(self, call: _Call, batch: _Batch, token: Any) -> None:
        batch.node.tasks.add(batch)
        chunk = batch.chunk
        work = (chunk.first, chunk.count, chunk.attempts, chunk.items, chunk.trace)
        future = self._client.submit(
            run_chunk, self._name, call.key, call.spec, call.borrow, work, call.together,
            key=f"{call.key}-{chunk.seq}", workers=[batch.node.address],
            allow_other_workers=False, retries=0, pure=False,
        )  # fmt: skip

        call.running[batch] = future
        future.add_done_callback(_when_done(batch, token))

    def _replay(self, job: JobPort, chunk: Chunk, node: _Node, reports: list[wire.Report]) -> None:
        """Tell the job what the node's scheduler told the relay, in order."""
        for report in reports:
            match report:
                case wire.Delivered(result, values, pid):
                    job.deliver(chunk, result, values, pid)
                    self._done += len(values)
                    self._timed_out += sum(1 for e in result.errors if e[1] == TIMEOUT)
                case wire.Unreadable(result, pid, exc):
                    job.deliver_unreadable(chunk, result, pid, exc)
                case wire.Unsendable(exc):
                    job.unsendable(chunk, exc)
                case wire.Lost(loss, timed_out):
                    if timed_out:
                        self._timed_out += 1
                    else:
                        self._crashed += 1
                    job.worker_lost([chunk], loss, timed_out=timed_out)
                case wire.WorkerSeen(pid, peak, ended, alive):
                    job.ran_on(RemoteWorker(pid, node.host, peak, ended, alive))
                case wire.Aborted(exc):
                    job.abort(exc)
                case wire.Printed(name, text):
                    write_text(name, text)

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

    @on_one_loop
    async def call(self, call: CallWork) -> Any:
        """``fn(*args, **kwargs)`` on a worker of some node; a run lost with its node
        runs again, on another, up to `max_retries` times."""
        await self.start()
        token = anyio.lowlevel.current_token()
        for attempt in range(1, call.max_retries + 2):
            nodes = [n for n in self._nodes.values() if not n.gone]
            if not nodes:
                raise WorkerStartError("the cluster has no Dask worker left")
            node = min(nodes, key=lambda n: len(n.tasks))
            task = _Task(node)
            node.tasks.add(task)
            try:
                future = self._client.submit(
                    run_call, self._name, call,
                    key=f"{self._name}-call-{next(self._seq)}", workers=[node.address],
                    allow_other_workers=False, retries=0, pure=False,
                )  # fmt: skip
                future.add_done_callback(_when_done(task, token))
                try:
                    await task.event.wait()
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(_cancel_call, self._client, future)
                    raise
            finally:
                node.tasks.discard(task)
            if task.answer is not None:
                return _answer(task.answer)
            if task.error is not None:
                raise task.error
            self._crashed += 1
            loss = Loss(0, None, None, f"its Dask worker {node.address} left the cluster")
            error = failure(CRASHED, loss, subject="call", shard=None, attempts=attempt,
                            timeout=call.timeout)  # fmt: skip
        raise error


def _answer(outcome: wire.Outcome) -> Any:
    """A call's value as the node sent it, after what its worker printed; or its
    exception, itself where it unpickles, with the worker's traceback as its cause."""
    for name, text in outcome.lines:
        write_text(name, text)
    if isinstance(outcome, wire.Returned):
        return outcome.value
    raise RemoteTraceback.attach(outcome.exc, outcome.traceback)


def _finish(task: _Task, box: list[Any], error: BaseException | None) -> None:
    task.answer, task.error, task.finished = box.pop(), error, True
    task.event.set()
    if task.on_done is not None:
        task.on_done()


def _when_done(task: _Task, token: Any) -> Callable[[Any], None]:
    """A Dask future's done-callback (it runs in a thread of Dask's): take what the
    task returned, or how it failed, and wake the task waiting for `task` in the
    caller's loop (`token`)."""

    def done(f: Any) -> None:
        if task.abandoned:
            return
        answer: Any = None
        error: BaseException | None = None
        try:
            if f.status == "finished":
                answer = f.result()
            elif f.status == "error":
                error = f.exception()
        except BaseException as exc:  # cancelled or released meanwhile
            error = exc
        box = [answer]  # the loop takes the answer out: this thread, still waiting on
        del answer  # it, holds none of the values the caller may have let go by then
        with contextlib.suppress(Exception):  # the caller's loop is gone: nobody waits
            anyio.from_thread.run_sync(_finish, task, box, error, token=token)

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


def _start_error(address: str, exc: BaseException) -> WorkerStartError:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TimeoutError | OSError) and "worker" in str(exc).lower():
        return WorkerStartError(
            f"the Dask scheduler at {address} has no worker (waited {CONNECT_TIMEOUT:.0f} s): "
            "start one with `dask worker " + address + "`"
        )
    if "No module named 'ashard'" in text or ("ashard" in text and "ModuleNotFound" in text):
        version = wire.version()
        return WorkerStartError(
            f"a Dask worker of {address} cannot import ashard: install it there, the same "
            f"version as here ({version}): pip install 'ashard[dask]=={version}'"
        )
    return WorkerStartError(f"the Dask workers of {address} could not start ashard workers: {text}")

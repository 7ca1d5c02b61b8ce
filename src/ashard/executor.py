"""`Executor`: a `concurrent.futures.Executor` on ashard's supervised workers.

It has `ProcessPoolExecutor`'s signature and documented behaviour, so code written for
it (``executor.submit``, ``executor.map``, ``loop.run_in_executor``) runs unchanged;
what differs, on purpose, is what a worker's death does (see `Executor`).

Work items wait in the executor, in submission order, until one of `max_workers`
slots is free; a slot runs one item as an ashard `call` on the executor's own `Pool`.
Everything runs on ashard's loop thread (`ashard._loopthread.SHARED`, the one
`ashard.sync` uses), so the executor needs no event loop of the caller's and any thread may use it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import os
import pickle
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import anyio

from ashard import _calls
from ashard._asyncfn import is_async_fn
from ashard._backend import import_supervisor
from ashard._loopthread import SHARED
from ashard._options import check_count, check_timeout, check_workers
from ashard._serialize import LoadError
from ashard._worker.dropins import apply_star, apply_star_async
from ashard.errors import (
    RemoteTraceback,
    ShardError,
    ShardFailed,
    WorkerCrashed,
    WorkerStartError,
    _rebuild,
)
from ashard.pool import Pool

if TYPE_CHECKING:
    from ashard._job import Job

__all__ = ["Executor", "ExecutorUnpicklingError", "ExecutorWorkerCrashed"]

_P = ParamSpec("_P")
_T = TypeVar("_T")
_E = TypeVar("_E", bound=BaseException)

_CALL_NAMES = {"self", "fn", "timeout", "max_retries"}
"""Keyword arguments `Pool.call` would take as its own."""
_BROKEN = "A child process terminated abruptly, the process pool is not usable anymore"
_BROKEN_PENDING = (
    "A process in the process pool was terminated abruptly while the future was running or pending."
)


class ExecutorWorkerCrashed(WorkerCrashed, BrokenProcessPool):
    """The worker running this task died: an `ashard.WorkerCrashed` that is also the
    `BrokenProcessPool` code written for `ProcessPoolExecutor` expects. Only this task
    failed; the executor goes on."""

    __module__ = "ashard"

    @classmethod
    def of(cls, exc: WorkerCrashed) -> ExecutorWorkerCrashed:
        new = _rebuild(cls, exc.args, exc.__dict__)  # as unpickling it would
        assert isinstance(new, cls)
        new.__cause__, new.__traceback__ = exc.__cause__, exc.__traceback__
        return new


class ExecutorUnpicklingError(pickle.UnpicklingError, BrokenProcessPool):
    """A task's function or arguments did not unpickle in the worker, or its result did
    not unpickle here: a `pickle.UnpicklingError` that is also the `BrokenProcessPool`
    `ProcessPoolExecutor` raises then (its pool breaks; here only this task failed)."""

    __module__ = "ashard"

    @classmethod
    def of(cls, exc: LoadError) -> ExecutorUnpicklingError:
        new = cls(str(exc))
        new.__cause__ = exc.__cause__  # the worker's traceback, or what unpickling raised
        return _as_stdlib_raises(new)


class _Core:
    """An executor's state, apart from the executor object (so that collecting it can
    shut this down)."""

    def __init__(self, pool: Pool, timeout: float | None, max_retries: int) -> None:
        self.pool = pool
        self.timeout = timeout
        self.max_retries = max_retries
        self.runner = SHARED
        self.lock = threading.Lock()
        self.shutdown = False
        self.broken: str | None = None
        self.pending: dict[concurrent.futures.Future[Any], anyio.CancelScope | None] = {}
        self.maps = 0  # map jobs not over yet (their results may all be in)
        self._slots: anyio.Semaphore | None = None
        self._closing: concurrent.futures.Future[None] | None = None

    def submit(
        self, fn: Callable[..., Any], args: Any, kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        with self.lock:
            if self.broken is not None:
                raise BrokenProcessPool(self.broken)
            if self.shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            self.pending[future] = None
        self.runner.start(self._run(future, fn, args, kwargs))
        return future

    async def _run(
        self, future: concurrent.futures.Future[Any], fn: Callable[..., Any], args: Any, kwargs: Any
    ) -> None:
        try:
            if self._slots is None:
                self._slots = anyio.Semaphore(self.pool.workers, fast_acquire=True)  # in order
            async with self._slots:
                if not future.set_running_or_notify_cancel():
                    return
                with anyio.CancelScope() as scope:
                    with self.lock:
                        self.pending[future] = scope
                    await self._call(future, fn, args, kwargs)
                if scope.cancelled_caught and not future.done():
                    stopped = concurrent.futures.CancelledError("the task was stopped while it ran")
                    _settle(future, error=stopped)
        finally:
            with self.lock:
                self.pending.pop(future, None)

    async def _call(
        self, future: concurrent.futures.Future[Any], fn: Callable[..., Any], args: Any, kwargs: Any
    ) -> None:
        if _CALL_NAMES & kwargs.keys():  # the task's own keywords, not `Pool.call`'s
            fn, args, kwargs = functools.partial(fn, *args, **kwargs), (), {}
        try:
            value = await self.pool.call(
                fn, *args, timeout=self.timeout, max_retries=self.max_retries, **kwargs
            )
        except anyio.get_cancelled_exc_class():
            raise
        except WorkerCrashed as exc:
            _settle(future, error=ExecutorWorkerCrashed.of(exc))
        except LoadError as exc:  # its function or arguments: in the worker
            _settle(future, error=ExecutorUnpicklingError.of(exc))
        except ShardFailed as exc:  # ashard's own (a task's errors come as themselves)
            cause = exc.__cause__
            _settle(future, error=ExecutorUnpicklingError.of(cause) if isinstance(cause, LoadError)
                    else exc)  # fmt: skip
        except WorkerStartError as exc:  # `initializer` raised: the executor is broken
            self._break(exc)
            _settle(future, error=_broken_pending(exc))
        except TypeError as exc:
            if "pickle" in str(exc) and not isinstance(exc, pickle.PicklingError):
                error = pickle.PicklingError(str(exc))
                error.__cause__ = exc
                _settle(future, error=error)
            else:
                _settle(future, error=exc)
        except RuntimeError as exc:
            if _no_thread(exc):
                _settle(future, error=_broken_pending(exc))
            else:
                _settle(future, error=_as_stdlib_raises(exc))
        except BaseException as exc:  # the task's own exception, SystemExit included
            _settle(future, error=_as_stdlib_raises(exc))
        else:
            _settle(future, value)

    def map(
        self, fn: Callable[..., Any], items: list[tuple[Any, ...]], deadline: float | None
    ) -> Iterator[Any]:
        """The results of ``fn(*args)`` for `items`, in order: one ashard `map` job on
        the loop, its results handed over in runs as they resolve."""
        with self.lock:
            if self.broken is not None:
                raise BrokenProcessPool(self.broken)
            if self.shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        options = {"timeout": self.timeout, "max_retries": self.max_retries, "errors": "collect"}
        star = apply_star_async if is_async_fn(fn) else apply_star
        job = _calls.map_job(star, items, {"fn": fn}, options)
        results: queue.SimpleQueue[Any] = queue.SimpleQueue()
        with self.lock:
            self.maps += 1  # `_pump` counts it down, once it started
        try:
            pumping = self.runner.submit(self._pump(job, len(items), results))
        except BaseException:
            with self.lock:
                self.maps -= 1
            raise
        return _results(results, len(items), deadline, pumping)

    async def _pump(self, job: Job, n: int, results: queue.SimpleQueue[Any]) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_calls.run_job, self.pool, job)
                pos = 0
                while pos < n:
                    values = job.resolved_from(pos)
                    if values:
                        pos += len(values)
                        results.put(values)
                        del values  # the caller alone holds the results it was given
                    else:
                        await job.wait_change()
        except BaseException as exc:
            results.put(_Failed(exc))
            raise
        finally:
            with self.lock:
                self.maps -= 1

    def _break(self, exc: BaseException) -> None:
        with self.lock:
            self.broken = _BROKEN
            waiting = [f for f, scope in self.pending.items() if scope is None]
        for f in waiting:
            if f.set_running_or_notify_cancel():
                _settle(f, error=_broken_pending(exc))

    def cancel_pending(self) -> None:
        """Cancel the tasks not yet running, but those next in line for a free worker
        (as `ProcessPoolExecutor`, whose next ones are already on their way)."""
        with self.lock:
            running = sum(scope is not None for scope in self.pending.values())
            waiting = [f for f, scope in self.pending.items() if scope is None]
        for f in waiting[max(0, self.pool.workers - running) :]:
            f.cancel()

    def stop_running(self) -> None:
        """Interrupt every running task (their futures fail with CancelledError)."""
        with self.lock:
            scopes = [s for s in self.pending.values() if s is not None]

        def cancel() -> None:
            for scope in scopes:
                scope.cancel()

        self.runner.loop().call_soon_threadsafe(cancel)

    def close(self, wait: bool) -> None:
        """No more work: the pool closes once every pending task is done."""
        with self.lock:
            self.shutdown = True
            if self._closing is None:
                self._closing = self.runner.submit(self._close())
            closing = self._closing
        if wait:
            closing.result()

    async def _close(self) -> None:
        # tasks resolve on this loop; a map's job ends here once its last worker
        # start is settled (the results may all be in before)
        while self.pending or self.maps:  # noqa: ASYNC110 - no thread here
            await anyio.sleep(0.005)
        try:
            await self.pool.aclose()
        except Exception as exc:
            if not _no_thread(exc):  # at interpreter shutdown the workers go anyway
                raise


_callbacks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
_callback_thread: threading.Thread | None = None


def _settle(
    future: concurrent.futures.Future[Any], value: Any = None, error: BaseException | None = None
) -> None:
    """Resolve `future` (on the loop thread). Its done-callbacks are user code that may
    block (joblib dispatches its next batch from one, asyncio hops threads): a future
    that has some is resolved on a thread of its own instead, never on the loop."""
    resolve = functools.partial(
        future.set_result if error is None else future.set_exception,
        value if error is None else error,
    )
    if not future._done_callbacks:  # type: ignore[attr-defined]  # no public way to ask
        resolve()
        return
    global _callback_thread
    if _callback_thread is None or not _callback_thread.is_alive():
        _callback_thread = threading.Thread(target=_run_callbacks, name="ashard-executor",
                                            daemon=True)  # fmt: skip
        _callback_thread.start()
    _callbacks.put(resolve)


def _run_callbacks() -> None:
    while True:
        resolve = _callbacks.get()
        with contextlib.suppress(Exception):  # concurrent.futures logs callback errors
            resolve()


class _Failed:
    """The map's stream itself failed (not one task): `exc` ends the iteration."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _results(
    results: queue.SimpleQueue[Any],
    n: int,
    deadline: float | None,
    pumping: concurrent.futures.Future[None],
) -> Iterator[Any]:
    try:
        given = 0
        while given < n:
            try:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                run = results.get(timeout=wait)
            except queue.Empty:
                raise TimeoutError from None
            if isinstance(run, _Failed):
                exc = run.exc
                while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                    exc = exc.exceptions[0]
                if isinstance(exc, WorkerStartError) or _no_thread(exc):
                    raise _broken_pending(exc)
                raise exc
            values = collections.deque(run)
            del run
            while values:  # nothing here keeps a result the caller has been given
                given += 1
                if isinstance(values[0], ShardError):
                    raise _task_error(values.popleft())
                yield values.popleft()
    finally:
        pumping.cancel()  # what still runs is stopped; a finished job is left alone


def _no_thread(exc: BaseException) -> bool:
    """A thread could not start (the interpreter is shutting down): the executor is
    broken, as `ProcessPoolExecutor` says then."""
    return isinstance(exc, RuntimeError) and "can't create new thread" in str(exc)


def _as_stdlib_raises(exc: _E) -> _E:
    """The task's exception with the worker's traceback as `ProcessPoolExecutor` gives
    it: a `concurrent.futures.process._RemoteTraceback` cause holding the text."""
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        text = f'\n"""\n{cause.text}"""'
        exc.__cause__ = _RemoteTraceback(text)  # type: ignore[arg-type]  # typeshed: a traceback; it is the text
    return exc


def _task_error(error: BaseException) -> BaseException:
    """A failed task's exception as `concurrent.futures` gives it: the task's own for
    one that raised, the dual-typed crash for one whose worker died."""
    if isinstance(error, WorkerCrashed):
        return ExecutorWorkerCrashed.of(error)
    if isinstance(error, ShardFailed) and isinstance(error.__cause__, LoadError):
        return ExecutorUnpicklingError.of(error.__cause__)  # its arguments or its result
    if isinstance(error, ShardFailed) and error.__cause__ is not None:
        return _as_stdlib_raises(error.__cause__)
    return error


def _broken_pending(cause: BaseException) -> BrokenProcessPool:
    error = BrokenProcessPool(_BROKEN_PENDING)
    error.__cause__ = cause
    return error


_live: weakref.WeakSet[_Core] = weakref.WeakSet()
_exit_lock = threading.Lock()


def _forget_live() -> None:
    """In a forked child: the parent's executors are not the child's to finish, and
    its callback thread is not there."""
    global _exit_lock, _callbacks, _callback_thread
    _live.clear()
    _exit_lock = threading.Lock()
    _callbacks, _callback_thread = queue.SimpleQueue(), None


os.register_at_fork(after_in_child=_forget_live)
_exit_registered = False


def _at_exit() -> None:
    """At interpreter exit, pending work is finished, as `ProcessPoolExecutor` does."""
    for core in list(_live):
        core.close(wait=True)


class Executor(concurrent.futures.Executor):
    """A `concurrent.futures.Executor` on ashard workers, with `ProcessPoolExecutor`'s
    signature and documented behaviour: `submit`, `map` (`timeout`, `chunksize`),
    `shutdown(wait, cancel_futures)`, the context manager, `initializer`/`initargs`,
    `max_tasks_per_child`, ``loop.run_in_executor(executor, ...)``; a future raises the
    task's own exception (`SystemExit` included) with the worker's traceback as its
    cause; arguments that cannot be pickled set a `pickle.PicklingError`; a failing
    `initializer` breaks the executor (`BrokenProcessPool`), as documented.

    Different on purpose: a worker that dies fails only the future of the task it was
    running, with an `ashard.WorkerCrashed` that is also a `BrokenProcessPool`; tasks
    queued behind it run on other workers and the executor stays usable. `timeout`
    (seconds, counted from a task's start) stops a task that overruns, with
    `ashard.ShardTimeout`; `max_retries` re-runs tasks whose worker crashed or hung
    (for idempotent work); `pool_options` are `ashard.Pool`'s (`mem_cap`,
    `idle_timeout`, `env`, ...). `mp_context` is accepted and ignored: workers are
    always fresh interpreters (spawn semantics).
    """

    __module__ = "ashard"

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        timeout: float | None = None,
        max_retries: int = 0,
        **pool_options: Any,
    ) -> None:
        if max_workers is not None:
            if not isinstance(max_workers, int) or isinstance(max_workers, bool):
                raise TypeError(f"max_workers must be an int or None, got {max_workers!r}")
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
            check_workers("max_workers", max_workers, local=pool_options.get("cluster") is None)
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int) or isinstance(max_tasks_per_child, bool):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        seconds = check_timeout("timeout", timeout)
        retries = check_count("max_retries", max_retries)
        init = None if initializer is None else functools.partial(initializer, *initargs)
        pool = Pool(max_workers, init=init, max_tasks=max_tasks_per_child, **pool_options)
        # Now, not on first use: work still pending at interpreter exit must run, and a
        # module imported after shutdown began cannot start threads or register at exit.
        import_supervisor()
        self._max_workers = pool.workers
        self._core = _Core(pool, seconds, retries)
        _live.add(self._core)
        weakref.finalize(self, self._core.close, False)
        global _exit_registered
        with _exit_lock:
            if not _exit_registered:
                threading._register_atexit(_at_exit)  # type: ignore[attr-defined]  # as CPython's own
                _exit_registered = True

    def submit(
        self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> concurrent.futures.Future[_T]:
        """Schedule ``fn(*args, **kwargs)``; a `Future` of its result."""
        return self._core.submit(fn, args, kwargs)

    def map(
        self,
        fn: Callable[..., _T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[_T]:
        """Like `map(fn, *iterables)`: the results in order, each raising its task's
        exception when reached; `timeout` (seconds from this call) bounds the wait.

        Every item is taken at once, as `ProcessPoolExecutor` does (each copied as it is
        drawn from an iterable that may change one object in place), and the items run
        as one ashard job that sizes its own chunks (as ``chunk_size="auto"``): small
        tasks are as cheap with ``chunksize=1`` as with a large one, which is
        accepted and checked but need not be tuned. Leaving the iterator early stops
        the tasks still running."""
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        deadline = None if timeout is None else time.monotonic() + timeout
        from ashard._positions import drawn_args  # the supervisor's: loaded by now

        items = drawn_args(iterables)
        if not items:
            return iter(())
        return self._core.map(fn, items, deadline)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new tasks; with `cancel_futures`, tasks not yet running are cancelled;
        with `wait`, return once every task is done and the workers have stopped."""
        if cancel_futures:
            with self._core.lock:
                self._core.shutdown = True
            self._core.cancel_pending()
        self._core.close(wait)

    def __repr__(self) -> str:
        state = "shut down" if self._core.shutdown else f"{len(self._core.pending)} pending"
        return f"<ashard.Executor {self._max_workers} workers, {state}>"

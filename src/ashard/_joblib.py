"""The joblib backend ``"ashard"`` (`ashard.register_joblib`): `joblib.Parallel` on
ashard workers.

Batches of joblib tasks go to an `ashard.Executor` (one per worker count, kept warm
between `Parallel` calls, closed at exit); joblib's auto-batching keeps tiny tasks
cheap. An exception in one task makes joblib abort: the tasks still running are
interrupted and the queued ones cancelled, but the workers stay up (loky replaces
its workers instead). The backend registers itself in the workers too, so a nested
``Parallel(backend="ashard")`` inside a task works there; a nested `Parallel` with the
default backend runs as under loky (threads one level down, then sequentially).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import Any

import cloudpickle
from joblib import cpu_count, register_parallel_backend
from joblib._parallel_backends import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
)

from ashard.executor import Executor

__all__ = ["AshardBackend", "register", "register_joblib"]

_executors: dict[int, tuple[bytes, Executor]] = {}  # n_jobs -> (its setup, the executor)
_lock = threading.Lock()


def _forget_executors() -> None:
    """In a forked child (a task of joblib's "multiprocessing" backend): the parent's
    warm executors are not the child's; it makes its own."""
    global _lock
    _executors.clear()
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_executors)


def register_joblib() -> None:
    """Register the joblib backend ``"ashard"``: ``with joblib.parallel_config(
    backend="ashard", n_jobs=4):`` then runs `joblib.Parallel` (and scikit-learn's
    ``n_jobs``) on warm ashard workers. Needs joblib (``pip install "ashard[joblib]"``)."""
    register_parallel_backend("ashard", AshardBackend)


register = register_joblib  # what the workers run first (`Executor(initializer=...)`)


def _init_worker(initializer: Callable[..., Any] | None, initargs: tuple[Any, ...]) -> None:
    """A new worker's setup: the backend registered there (for nested `Parallel`),
    then joblib's `initializer`, once per worker as under loky."""
    register()
    if initializer is not None:
        initializer(*initargs)


def _executor(
    n_jobs: int,
    env: dict[str, str],
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Executor:
    """The warm executor of `n_jobs` workers, made on first use; `env` limits the
    threads of native libraries in each worker, as joblib does for loky. Another
    `initializer` or `initargs` (compared pickled, so arguments changed in place
    count as other ones) replaces it with a fresh one, as loky does."""

    if initializer is not None and not callable(initializer):
        raise TypeError(f"initializer must be a callable, got: {initializer!r}")
    setup = cloudpickle.dumps((sorted(env.items()), initializer, tuple(initargs)))
    with _lock:
        kept = _executors.get(n_jobs)
        if kept is not None and kept[0] == setup:
            ex = kept[1]
            if not ex._core.shutdown and ex._core.broken is None:
                return ex
        init = functools.partial(_init_worker, initializer, tuple(initargs))
        _executors[n_jobs] = setup, Executor(n_jobs, initializer=init, env=env)
    if kept is not None:
        kept[1].shutdown(wait=False)  # what it still runs finishes; nothing new goes there
    return _executors[n_jobs][1]


def _cpu_count() -> int:
    """The CPUs this process may run on (joblib's own count where it has one)."""
    try:
        return max(1, int(cpu_count()))
    except Exception:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


def shutdown_all() -> None:
    """Stop the warm executors (tests; interpreter exit does it too)."""
    with _lock:
        executors = [ex for _, ex in _executors.values()]
        _executors.clear()
    for ex in executors:
        ex.shutdown(wait=True)


class AshardBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's `ParallelBackendBase` on an `ashard.Executor`."""

    supports_retrieve_callback = True
    supports_inner_max_num_threads = False
    supports_timeout = True
    supports_return_generator = True

    def __init__(self, nesting_level: int | None = None, **kwargs: Any) -> None:
        super().__init__(nesting_level=nesting_level, **kwargs)
        self._ex: Executor | None = None
        self.parallel: Any = None

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        if n_jobs < 0:
            return max(_cpu_count() + 1 + n_jobs, 1)
        return int(n_jobs)

    def configure(self, n_jobs: int | None = 1, parallel: Any = None, **kwargs: Any) -> int:
        """`initializer` / `initargs` come from `Parallel(...)` or `parallel_config(...)`
        (joblib 1.5+), as for loky; joblib's memmapping options do not apply here."""
        n = self.effective_n_jobs(n_jobs)
        if n == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        options = {**self.backend_kwargs, **kwargs}
        self.parallel = parallel
        self._n_jobs = n
        env = {k: str(v) for k, v in self._prepare_worker_env(n_jobs=n).items()}
        initializer = options.get("initializer")
        self._ex = _executor(n, env, initializer, tuple(options.get("initargs") or ()))
        return n

    def submit(self, func: Any, callback: Any = None) -> Any:
        if self._ex is None:
            raise RuntimeError("the ashard joblib backend is not configured (terminated?)")
        future = self._ex.submit(func)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, future: Any) -> Any:
        return future.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A task failed (or the caller stopped): stop what runs, cancel what waits;
        the workers stay warm for the next call."""
        if self._ex is not None:
            self._ex._core.cancel_pending()
            self._ex._core.stop_running()
        if ensure_ready and self.parallel is not None:
            self.configure(
                n_jobs=self.parallel.n_jobs,
                parallel=self.parallel,
                **self.parallel._backend_kwargs,
            )

    def terminate(self) -> None:
        self._ex = None
        self.reset_batch_stats()

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

import os
import threading
from typing import Any

from joblib import register_parallel_backend
from joblib._parallel_backends import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
)

from ashard.executor import Executor

__all__ = ["AshardBackend", "register", "register_joblib"]

_executors: dict[int, Executor] = {}
_lock = threading.Lock()


def register_joblib() -> None:
    """Register the joblib backend ``"ashard"``: ``with joblib.parallel_config(
    backend="ashard", n_jobs=4):`` then runs `joblib.Parallel` (and scikit-learn's
    ``n_jobs``) on warm ashard workers. Needs joblib (``pip install "ashard[joblib]"``)."""
    register_parallel_backend("ashard", AshardBackend)


register = register_joblib  # what the workers run first (`Executor(initializer=...)`)


def _executor(n_jobs: int, env: dict[str, str]) -> Executor:
    """The warm executor of `n_jobs` workers, made on first use; `env` limits the
    threads of native libraries in each worker, as joblib does for loky."""
    with _lock:
        ex = _executors.get(n_jobs)
        if ex is None or ex._core.shutdown or ex._core.broken is not None:
            ex = _executors[n_jobs] = Executor(n_jobs, initializer=register, env=env)
        return ex


def _cpu_count() -> int:
    """The CPUs this process may run on (joblib's own count where it has one)."""
    try:
        from joblib import cpu_count

        return max(1, int(cpu_count()))
    except Exception:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


def shutdown_all() -> None:
    """Stop the warm executors (tests; interpreter exit does it too)."""
    with _lock:
        executors = list(_executors.values())
        _executors.clear()
    for ex in executors:
        ex.shutdown(wait=True)


class AshardBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
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
        n = self.effective_n_jobs(n_jobs)
        if n == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        self._n_jobs = n
        env = {k: str(v) for k, v in self._prepare_worker_env(n_jobs=n).items()}
        self._ex = _executor(n, env)
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
            self.configure(n_jobs=self.parallel.n_jobs, parallel=self.parallel)

    def terminate(self) -> None:
        self._ex = None
        self.reset_batch_stats()

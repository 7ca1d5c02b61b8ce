"""CPython's own concurrent.futures tests with `ashard.Executor` as the process pool.

Not part of the test run (it needs CPython's `test` package, shipped with 3.13):

    cd tests/conformance && python3.13 -m unittest cpython_futures

The test classes live in this importable module because the tests pickle their own
test case's methods. Known differences (see docs/reference.md): tests that read
`ProcessPoolExecutor` internals (`_processes`, `_mp_context`), that import the class
from `concurrent.futures` by name in a subprocess, that expect a killed worker to
break the pool, or that pass a `multiprocessing.Queue` through `initargs` (only
multiprocessing's own children can inherit one)."""

import multiprocessing

from test.test_concurrent_futures import (  # type: ignore[import-not-found]
    test_as_completed,
    test_deadlock,
    test_init,
    test_process_pool,
    test_shutdown,
    test_wait,
    util,
)

import ashard


class AshardMixin(util.ExecutorMixin):
    executor_type = ashard.Executor
    ctx = "spawn"

    def get_context(self):
        return multiprocessing.get_context("spawn")


for mixin in (
    test_process_pool.ProcessPoolExecutorTest,
    test_wait.WaitTests,
    test_as_completed.AsCompletedTests,
    test_init.InitializerMixin,
    test_init.FailingInitializerMixin,
    test_shutdown.ProcessPoolShutdownTest,
    test_deadlock.ExecutorDeadlockTest,
):
    name = "Ashard" + mixin.__name__
    globals()[name] = type(name, (mixin, AshardMixin, util.BaseTestCase), {"__module__": __name__})

"""The joblib backend "ashard": `joblib.Parallel` and scikit-learn's `n_jobs` on ashard
workers, with real processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import ashard
import workloads

joblib = pytest.importorskip("joblib")  # the test extra installs it


@pytest.fixture(autouse=True)
def registered() -> Iterator[None]:
    ashard.register_joblib()
    yield
    from ashard._joblib import shutdown_all

    shutdown_all()  # the warm executors: the leak check wants no worker left


def _parallel(n_jobs: int = 2, **kwargs: object) -> object:
    return joblib.Parallel(n_jobs=n_jobs, backend="ashard", **kwargs)


@pytest.mark.parametrize("return_as", ["list", "generator", "generator_unordered"])
def test_parallel_returns_as_joblib_says(return_as: str) -> None:
    out = _parallel(return_as=return_as)(joblib.delayed(workloads.square)(i) for i in range(30))  # type: ignore[operator]
    got = list(out)
    if return_as == "generator_unordered":
        got.sort()
    assert got == [i * i for i in range(30)]


def test_parallel_config_n_jobs_and_negative_values() -> None:
    from ashard._joblib import AshardBackend

    backend = AshardBackend()
    cpus = joblib.cpu_count()
    assert backend.effective_n_jobs(-1) == cpus
    assert backend.effective_n_jobs(-2) == max(cpus - 1, 1)
    assert backend.effective_n_jobs(3) == 3
    with pytest.raises(ValueError, match="n_jobs == 0"):
        backend.effective_n_jobs(0)
    with joblib.parallel_config(backend="ashard", n_jobs=-1):
        pids = set(joblib.Parallel()(joblib.delayed(os.getpid)() for _ in range(40)))
    assert os.getpid() not in pids  # ran on workers, not in this process


def test_an_error_stops_the_rest_and_keeps_the_workers_warm(tmp_path: Path) -> None:
    log = str(tmp_path)
    with joblib.parallel_config(backend="ashard", n_jobs=2):
        before = set(joblib.Parallel()(joblib.delayed(os.getpid)() for _ in range(20)))
        t0 = time.monotonic()
        with pytest.raises(ValueError, match="bad item 5") as info:
            joblib.Parallel(batch_size=1)(
                joblib.delayed(workloads.fail_at)(i, 5, log) for i in range(200)
            )
        assert time.monotonic() - t0 < 5  # not 200 x 50 ms / 2
        assert "fail_at" in str(info.value.__cause__)  # the worker's traceback
        started = len(os.listdir(log))
        assert started < 100, started  # the rest were cancelled
        time.sleep(0.3)
        assert len(os.listdir(log)) == started  # and nothing runs on afterwards
        after = set(joblib.Parallel()(joblib.delayed(os.getpid)() for _ in range(20)))
    assert after <= before  # the same warm workers (loky would have replaced them)


def test_timeout_and_nested_parallel() -> None:
    with joblib.parallel_config(backend="ashard", n_jobs=2):
        t0 = time.monotonic()
        with pytest.raises(multiprocessing.TimeoutError):  # what joblib raises, as with loky
            joblib.Parallel(timeout=0.5)(joblib.delayed(time.sleep)(5) for _ in range(2))
        assert time.monotonic() - t0 < 4
        nested = joblib.Parallel()(joblib.delayed(workloads.nested_sum)(n) for n in range(5))
    assert nested == [sum(i * i for i in range(n)) for n in range(5)]


def test_initializer_runs_once_per_worker_as_under_loky(tmp_path: Path) -> None:
    from concurrent.futures.process import BrokenProcessPool

    log = str(tmp_path / "inits")
    marks = _parallel(initializer=workloads.mark_init, initargs=(log, 7))(  # type: ignore[operator]
        joblib.delayed(workloads.init_marker)(i) for i in range(40)
    )
    assert marks == ["7"] * 40
    again = _parallel(initializer=workloads.mark_init, initargs=(log, 7))(  # type: ignore[operator]
        joblib.delayed(workloads.init_marker)(i) for i in range(10)
    )
    assert again == ["7"] * 10
    pids = Path(log).read_text().split()
    assert len(pids) == len(set(pids)) <= 2  # once per worker, the same workers reused
    with joblib.parallel_config(backend="ashard", n_jobs=2, initializer=workloads.mark_init,
                                initargs=(log, 8)):  # fmt: skip
        assert (
            joblib.Parallel()(joblib.delayed(workloads.init_marker)(i) for i in range(6))
            == ["8"] * 6
        )
    assert len(Path(log).read_text().split()) > len(pids)  # other initargs: fresh workers
    with pytest.raises(BrokenProcessPool):  # as loky (TerminatedWorkerError) says
        _parallel(initializer=workloads.failing_init)(  # type: ignore[operator]
            joblib.delayed(workloads.square)(i) for i in range(4)
        )
    assert _parallel()(joblib.delayed(workloads.square)(i) for i in range(4)) == [0, 1, 4, 9]  # type: ignore[operator]
    with pytest.raises(TypeError, match="initializer must be a callable"):
        _parallel(initializer=42)(joblib.delayed(workloads.square)(i) for i in range(4))  # type: ignore[operator]


NESTED_UNDER_MULTIPROCESSING = """
import json, joblib, ashard, workloads
ashard.register_joblib()
# the parent uses ashard first: its loop thread, spawner and warm executor exist when
# multiprocessing forks the workers that then run Parallel(backend="ashard")
squares = [joblib.delayed(workloads.square)(i) for i in range(4)]
first = joblib.Parallel(n_jobs=2, backend="ashard")(squares)
out = joblib.Parallel(n_jobs=2, backend="multiprocessing")(
    joblib.delayed(workloads.nested_ashard)(n) for n in range(2, 6)
)
again = joblib.Parallel(n_jobs=2, backend="ashard")(squares)
print(json.dumps({"first": first, "out": out, "again": again}))
"""


def test_ashard_inside_a_multiprocessing_task_works() -> None:
    """A task of joblib's "multiprocessing" backend (a forked, daemonic process) runs
    its own Parallel(backend="ashard"): it starts workers of its own (not the
    parent's), and the parent's workers are unharmed; no worker outlives the run."""
    tests = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-c", NESTED_UNDER_MULTIPROCESSING], cwd=tests, capture_output=True,
        text=True, timeout=90, env={**os.environ, "PYTHONPATH": tests},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["first"] == got["again"] == [0, 1, 4, 9]
    assert [v for v, _ in got["out"]] == [sum(i * i for i in range(n)) for n in range(2, 6)]
    pids = {p for _, ps in got["out"] for p in ps}
    deadline = time.monotonic() + 10
    while (alive := [p for p in pids if _runs(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive  # the forked tasks' own workers ended with them


def _runs(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_tiny_tasks_are_batched() -> None:
    with joblib.parallel_config(backend="ashard", n_jobs=2):
        out = joblib.Parallel()(joblib.delayed(workloads.square)(i) for i in range(20_000))
    assert out[-1] == 19_999**2 and len(out) == 20_000


GRID_SEARCH = """
import json, sys
import joblib
import ashard
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV

ashard.register_joblib()
X, y = make_classification(n_samples=300, n_features=8, random_state=0)
with joblib.parallel_config(backend=sys.argv[1], n_jobs=2):
    search = GridSearchCV(LogisticRegression(max_iter=500), {"C": [0.01, 0.1, 1.0, 10.0]}, cv=3)
    search.fit(X, y)
print(json.dumps(list(search.cv_results_["mean_test_score"])))
"""


def test_grid_search_scores_equal_lokys() -> None:
    pytest.importorskip("sklearn")
    scores = {}
    for backend in ("loky", "ashard"):  # each in an interpreter of its own (loky keeps its
        out = subprocess.run(  # workers for reuse after the search)
            [sys.executable, "-c", GRID_SEARCH, backend], capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        scores[backend] = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(scores["ashard"]) == 4
    assert scores["ashard"] == scores["loky"]

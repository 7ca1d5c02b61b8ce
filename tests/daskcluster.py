"""A Dask cluster of separate processes on 127.0.0.1 — `dask scheduler` and `dask worker`
(no nanny), started by a test — so that a test can SIGKILL one Dask worker's whole
process tree, as a machine that dies would take it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

TESTS = str(Path(__file__).resolve().parent)


class CliCluster:
    """``with CliCluster(tmp, workers=2) as c:`` — `c.address`, `c.kill_worker(i)`."""

    def __init__(
        self, tmp: Path, workers: int = 2, nthreads: int = 1, preload: str | None = None
    ) -> None:
        self.tmp = tmp
        self.n = workers
        self.nthreads = nthreads
        self.preload = preload
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workers: list[subprocess.Popen[bytes]] = []
        self.address = ""

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = TESTS + (os.pathsep + path if path else "")
        return env

    def __enter__(self) -> CliCluster:
        file = self.tmp / "scheduler.json"
        log = open(self.tmp / "scheduler.log", "wb")
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
             "--port", "0", "--no-dashboard", "--scheduler-file", str(file)],
            stdout=log, stderr=subprocess.STDOUT, env=self._env(),
        ))  # fmt: skip
        deadline = time.monotonic() + 60
        while not file.exists() or not file.read_text().strip():
            if time.monotonic() > deadline or self.procs[0].poll() is not None:
                self.__exit__(None, None, None)
                raise RuntimeError("dask scheduler did not start")
            time.sleep(0.05)
        time.sleep(0.05)
        self.address = json.loads(file.read_text())["address"]
        for _ in range(self.n):
            self.add_worker()
        self.wait_for(self.n)
        return self

    def add_worker(self) -> subprocess.Popen[bytes]:
        i = len(self.workers)
        log = open(self.tmp / f"worker-{i}.log", "wb")  # noqa: SIM115 - lives with the process
        cmd = [sys.executable, "-m", "distributed.cli.dask_worker", self.address, "--host",
               "127.0.0.1", "--nthreads", str(self.nthreads), "--no-nanny", "--no-dashboard",
               "--name", f"w{i}"]  # fmt: skip
        if self.preload:
            cmd += ["--preload", self.preload]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env())
        self.workers.append(proc)
        self.procs.append(proc)
        return proc

    def wait_for(self, n: int, timeout: float = 60.0) -> None:
        from distributed import Client

        with Client(self.address, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(n, timeout=timeout)

    def kill_worker(self, i: int) -> list[int]:
        """SIGKILL Dask worker `i` and every process under it (its ashard workers):
        the pids killed."""
        proc = psutil.Process(self.workers[i].pid)
        tree = [proc, *proc.children(recursive=True)]
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        self.workers[i].wait(10)
        return [p.pid for p in tree]

    def ashard_workers(self) -> list[psutil.Process]:
        """The ashard worker processes under the Dask workers still alive."""
        found = []
        for w in self.workers:
            if w.poll() is None:
                found += [
                    c
                    for c in psutil.Process(w.pid).children(recursive=True)
                    if "ashard._worker" in " ".join(c.cmdline())
                ]
        return found

    def __exit__(self, *exc: object) -> None:
        below = []
        for p in self.procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                below += psutil.Process(p.pid).children(recursive=True)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for child in below:  # what they left (their ashard workers die with them anyway)
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()

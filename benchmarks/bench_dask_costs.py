"""Where one chunk's trip through Dask costs CPU: the caller, the Dask scheduler, the
Dask workers and the ashard workers, each measured apart (the scheduler and the Dask
workers are separate processes here: ``dask scheduler`` / ``dask worker``), for a
pool with ``cluster=`` and for plain Dask tasks — the inputs of the scaling plan in
RESULTS.md.

``python benchmarks/bench_dask_costs.py [--chunks 1000]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.append(str(ROOT / "tests"))  # daskcluster (after benchmarks/: its workloads wins)

import psutil  # noqa: E402

import _bench_fns as fns  # noqa: E402
import ashard  # noqa: E402


def cpu_by_role(cluster: object) -> dict[str, float]:
    """CPU seconds so far of the caller, the scheduler, the Dask workers, ashard's."""
    me = psutil.Process()
    roles = {"caller": 0.0, "scheduler": 0.0, "dask workers": 0.0, "ashard workers": 0.0}
    for p in [me, *me.children(recursive=True)]:
        try:
            cmd = " ".join(p.cmdline())
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        role = ("caller" if p.pid == me.pid else "scheduler" if "dask_scheduler" in cmd
                else "ashard workers" if "ashard._worker" in cmd else "dask workers")  # fmt: skip
        roles[role] += t.user + t.system
    return roles


def main() -> None:
    from distributed import Client

    from daskcluster import CliCluster

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=1000)
    args = parser.parse_args()
    n = args.chunks
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(ROOT / "benchmarks") + (os.pathsep + path if path else "")
    with tempfile.TemporaryDirectory() as tmp, CliCluster(Path(tmp), workers=2, nthreads=2) as c:

        async def ashard_side() -> tuple[float, dict[str, float]]:
            async with ashard.Pool(cluster=c.address) as pool:
                await pool.map(fns.noop, range(100), chunk_size=1)
                before = cpu_by_role(c)
                t0 = time.perf_counter()
                await pool.map(fns.noop, range(n), chunk_size=1)
                wall = time.perf_counter() - t0
                after = cpu_by_role(c)
            return wall, {k: (after[k] - before[k]) / n * 1e3 for k in after}

        wall, per = asyncio.run(ashard_side())
        print(
            f"ashard on Dask, {n} chunks of 1 item: {wall / n * 1e3:.2f} ms of wall each; CPU ms "
            "per chunk: " + ", ".join(f"{k} {v:.2f}" for k, v in per.items())
        )
        with Client(c.address, set_as_default=False) as client:
            client.gather(client.map(fns.noop, range(100), pure=False))
            before = cpu_by_role(c)
            t0 = time.perf_counter()
            client.gather(client.map(fns.noop, range(n), pure=False))
            wall = time.perf_counter() - t0
            after = cpu_by_role(c)
        per = {k: (after[k] - before[k]) / n * 1e3 for k in after}
        print(
            f"plain Dask, {n} tasks: {wall / n * 1e3:.2f} ms of wall each; CPU ms per task: "
            + ", ".join(f"{k} {v:.2f}" for k, v in per.items())
        )


if __name__ == "__main__":
    main()

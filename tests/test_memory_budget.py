"""The memory budget (DESIGN 2.5): `mem_budget` and `footprint=` cap how many shards run
at once, a shard larger than the budget runs alone with one warning, "auto" reads the
host or the cgroup, and bad values are refused naming the option."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

import ashard
from workloads import interval, interval_of_item, most_overlapping, spike

pytestmark = pytest.mark.anyio

MB = 10**6


async def test_the_budget_caps_how_many_shards_run_at_once() -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(4, mem_budget="300MB") as pool:
            res = await pool.shard_map(ashard.shards(12, block_size=1), interval, footprint="100MB")
    assert res.ok
    assert most_overlapping(res.results) <= 3
    memory = res.diagnostics.memory
    assert memory.budget == 300 * MB and memory.budget_source == "given"
    assert memory.peak_reserved == 300 * MB  # three at once, never four
    assert memory.admission_waits >= 1 and memory.admission_wait_s > 0
    assert memory.footprint_per_shard == 100 * MB


async def test_a_footprint_callable_sizes_each_shard_and_the_largest_runs_alone() -> None:
    big = {5}

    def footprint(shard: ashard.Shard) -> int:
        return 900 * MB if shard.id in big else 100 * MB

    with anyio.fail_after(60):
        async with ashard.Pool(3, mem_budget="500MB") as pool:
            with pytest.warns(ResourceWarning, match=r"shard 5 \(858 MiB\).*ran alone") as seen:
                res = await pool.shard_map(
                    ashard.shards(8, block_size=1), interval, footprint=footprint
                )
    assert res.ok
    assert len([w for w in seen if issubclass(w.category, ResourceWarning)]) == 1
    s5, e5 = res.results[5]
    others = [iv for i, iv in enumerate(res.results) if i != 5]
    assert not any(s < e5 and s5 < e for s, e in others)  # nothing ran beside it
    assert most_overlapping(others) <= 3
    assert res.diagnostics.memory.footprint_per_shard == 900 * MB


async def test_map_takes_a_footprint_of_each_item() -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(3, mem_budget="1GB") as pool:
            out = await pool.map(partial(interval_of_item, seconds=0.2), [600, 300, 300, 300],
                                 chunk_size=1, footprint=lambda mb: mb * MB)  # fmt: skip
    # item 0 (600 MB) fits beside one 300 MB item at a time, never two
    assert most_overlapping(out, [600, 300, 300, 300]) <= 1000


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (-1, TypeError, "footprint must be bytes per shard"),
        ("lots", ValueError, "footprint must be a number of bytes or a size"),
        (True, TypeError, "footprint must be bytes per shard"),
        (1.5, TypeError, "footprint must be bytes per shard"),
        ("learnt", ValueError, "footprint must be a number of bytes"),
    ],
)
async def test_a_bad_footprint_is_refused_before_any_worker_runs(
    value: object, error: type[Exception], match: str
) -> None:
    pool = ashard.Pool(2)
    try:
        with pytest.raises(error, match=match):
            await pool.shard_map(4, interval, footprint=value)  # type: ignore[arg-type]
        assert pool.stats.started == 0
    finally:
        await pool.aclose()


@pytest.mark.parametrize("bad", [-1, 2.5, "x", None])
async def test_a_footprint_callable_giving_a_bad_value_fails_the_call_naming_it(
    bad: object,
) -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(2, mem_budget="1GB") as pool:
            with pytest.raises(TypeError, match=r"footprint must give a number of bytes"):
                await pool.shard_map(4, interval, footprint=lambda shard: bad)
            res = await pool.shard_map(2, partial(interval, seconds=0.01))  # still usable
            assert res.ok


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("lots", ValueError, r"mem_budget must be a number of bytes .* \(or 'auto', or None\)"),
        (-5, ValueError, "mem_budget must be a positive size"),
        (True, TypeError, "mem_budget must be a number of bytes"),
        ([1], TypeError, "mem_budget must be a number of bytes"),
    ],
)
def test_a_bad_mem_budget_is_refused_naming_it(
    value: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        ashard.Pool(2, mem_budget=value)  # type: ignore[arg-type]


def test_mem_budget_is_refused_on_a_cluster_pool_naming_both() -> None:
    with pytest.raises(
        ValueError, match=r"mem_budget is not supported on a cluster pool \(cluster=\)"
    ):
        ashard.Pool(2, mem_budget="1GB", cluster="tcp://127.0.0.1:1")


async def test_auto_is_a_share_of_what_the_host_has_free() -> None:
    free = psutil.virtual_memory().available
    with anyio.fail_after(60):
        async with ashard.Pool(2, mem_budget="auto") as pool:
            res = await pool.shard_map(2, partial(interval, seconds=0.01))
    memory = res.diagnostics.memory
    in_cgroup_limit = memory.budget_source == "cgroup"
    assert memory.budget_source in ("host", "cgroup")
    if not in_cgroup_limit:
        assert 0.75 * 0.85 * free < memory.budget < 1.25 * 0.85 * free


async def test_a_footprint_without_mem_budget_means_auto() -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(2) as pool:
            res = await pool.shard_map(2, partial(interval, seconds=0.01), footprint="1MB")
    memory = res.diagnostics.memory
    assert memory.budget is not None and memory.budget_source in ("host", "cgroup")
    assert memory.peak_reserved == 2 * MB


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A memory cgroup of its own (v2, or v1 here) limited to `limit` bytes, swap
    included; the test is skipped where none can be made."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    name = f"ashard-test-{uuid.uuid4().hex[:8]}"
    if v2.exists() and "memory" in v2.read_text():
        group, limits = Path("/sys/fs/cgroup") / name, {"memory.max": limit, "memory.swap.max": 0}
    elif Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists():
        group = Path("/sys/fs/cgroup/memory") / name
        limits = {"memory.limit_in_bytes": limit, "memory.memsw.limit_in_bytes": limit}
    else:
        pytest.skip("no memory cgroup controller on this machine")
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a memory cgroup here: {exc}")
    try:
        for file, value in limits.items():
            if (group / file).exists():
                (group / file).write_text(str(value))
        yield group
    finally:
        for _ in range(50):  # the processes leave the group as they exit
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def run_in(group: Path, body: str) -> Any:
    """Run `body` (which prints one JSON line) in a fresh interpreter inside `group`."""
    code = f"import os\nopen({str(group / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    out = subprocess.run([sys.executable, "-c", code + textwrap.dedent(body)],
                         capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_auto_inside_a_cgroup_with_a_memory_limit_is_the_limit_less_its_use() -> None:
    """In a memory cgroup of its own limited to 1 GB, a fresh interpreter's "auto"
    budget is 0.85 x (1 GB less what the cgroup uses)."""
    with memory_cgroup(1000 * MB) as group:
        budget, source = run_in(group, """
            import anyio, json, ashard
            async def main():
                async with ashard.Pool(1, mem_budget="auto") as pool:
                    res = await pool.shard_map(1, len)
                m = res.diagnostics.memory
                print(json.dumps([m.budget, m.budget_source]))
            anyio.run(main)
        """)  # fmt: skip
    assert source == "cgroup"
    assert 0.5 * 0.85 * 1000 * MB < budget < 0.85 * 1000 * MB


def test_a_kernel_oom_kill_in_a_limited_cgroup_is_named_oom() -> None:
    """A worker the kernel's out-of-memory killer ends, in a memory cgroup limited to
    300 MB, fails its shard with `WorkerCrashed.oom` True."""
    with memory_cgroup(300 * MB) as group:
        kind, oom, signum = run_in(group, """
            import anyio, json, ashard
            from workloads import hoard
            async def main():
                async with ashard.Pool(1) as pool:
                    res = await pool.shard_map(1, lambda s: hoard(s, 2000), max_retries=0,
                                               errors="collect")
                (f,) = res.failures
                print(json.dumps([type(f).__name__, f.oom, f.signal]))
            anyio.run(main)
        """)  # fmt: skip
    assert (kind, oom, signum) == ("WorkerCrashed", True, 9)


async def test_learn_runs_the_first_chunk_alone_then_admits_by_the_peak_it_saw() -> None:
    with anyio.fail_after(90):
        async with ashard.Pool(3, mem_budget="1000MB") as pool:
            res = await pool.shard_map(
                ashard.shards(9, block_size=1), partial(spike, mib=400), footprint="learn"
            )
    assert res.ok
    learned = res.diagnostics.memory.footprint_per_shard
    assert learned is not None and 0.95 * 400 * 2**20 <= learned < 1.2 * 400 * 2**20
    first = min(res.results)
    others = [iv for iv in res.results if iv is not first]
    assert not any(s < first[1] and first[0] < e for s, e in others)  # it ran alone
    assert most_overlapping(others) <= 2  # 3 x 420 MB would not fit in 1000 MB


async def test_an_elastic_pool_starts_no_more_workers_than_the_budget_can_use() -> None:
    with anyio.fail_after(60):
        async with ashard.Pool(4, min_workers=0, mem_budget="300MB") as pool:
            res = await pool.shard_map(ashard.shards(12, block_size=1), interval, footprint="100MB")
            assert res.ok and most_overlapping(res.results) <= 3
            assert pool.stats.started == 3

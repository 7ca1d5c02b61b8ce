"""`pool.stacks()` (DESIGN 2.6): the current stack of every busy worker, by pid, with
the shard it runs - read from the worker's faulthandler, without disturbing the shard.
Real workers, asyncio and trio; the sync pool and a Dask cluster pool too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

import ashard
import ashard.sync
import workloads

pytestmark = pytest.mark.anyio


async def _started(directory: Path, keys: list[str]) -> None:
    """Until every `keys` shard has touched its start file (a hang: 30 s, then fail)."""
    with anyio.fail_after(30):
        while not all((directory / f"started-{k}").exists() for k in keys):  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def test_busy_workers_show_where_they_are_and_their_shards_go_on(tmp_path: Path) -> None:
    async with ashard.Pool(2) as pool:
        assert await pool.stacks() == {}  # started, idle
        result: list[Any] = []

        async def run() -> None:
            result.append(
                await pool.shard_map(
                    ashard.shards(2, block_size=1),
                    workloads.shard_waiting_here,
                    borrow={"directory": str(tmp_path)},
                    chunk_size=1,
                )
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await _started(tmp_path, ["0", "1"])
            stacks = await pool.stacks()
            again = await pool.stacks()  # asking twice disturbs nothing either
            (tmp_path / "release").touch()
        assert sorted(stacks) == sorted(pool.pids)
        assert sorted(shard for shard, _ in stacks.values()) == [0, 1]
        for _, text in stacks.values():
            assert text is not None and "waiting_here" in text and "shard_waiting_here" in text
        assert all("waiting_here" in (text or "") for _, text in again.values())
        res = result[0]
        assert res.results == ["0", "1"] and res.ok
        d = res.diagnostics
        assert (d.retries, d.timeouts, d.crashes) == (0, 0, 0)  # undisturbed
        assert await pool.stacks() == {}  # idle again


async def test_a_call_and_a_map_item_are_named_as_such(tmp_path: Path) -> None:
    async with ashard.Pool(2) as pool:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.call, workloads.waiting_here, str(tmp_path), "call")
            tg.start_soon(
                lambda: pool.map(
                    workloads.waiting_here,
                    [str(tmp_path)] * 3,
                    chunk_size=1,
                    borrow={"key": "item"},
                )
            )
            await _started(tmp_path, ["call", "item"])
            stacks = await pool.stacks()
            (tmp_path / "release").touch()
        assert sorted((shard for shard, _ in stacks.values()), key=repr) == [0, None]
        assert all("waiting_here" in (text or "") for _, text in stacks.values())


async def test_an_unstarted_or_closed_pool_has_no_stacks() -> None:
    pool = ashard.Pool(1)
    assert await pool.stacks() == {}
    await pool.aclose()
    assert await pool.stacks() == {}


def test_the_sync_pool_gives_stacks(tmp_path: Path) -> None:
    with ashard.sync.Pool(1) as pool:
        assert pool.stacks() == {}
        with ashard.sync.shard_stream(
            ashard.shards(1, block_size=1), workloads.shard_waiting_here,
            borrow={"directory": str(tmp_path)}, pool=pool,
        ) as stream:  # fmt: skip
            anyio.run(_started, tmp_path, ["0"])
            ((shard, text),) = pool.stacks().values()
            (tmp_path / "release").touch()
            assert [done.value for done in stream] == ["0"]
        assert shard == 0 and text is not None and "shard_waiting_here" in text

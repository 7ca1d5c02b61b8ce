"""The public surface: the contract's names exist and only public names are exported,
public objects say they are `ashard`'s, signatures show every option, and the package
ships its types."""

from __future__ import annotations

import importlib
import importlib.resources
import inspect
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ashard

CONTRACT = {
    "shard_map", "shard_stream", "map", "call", "Pool", "default_pool", "shutdown",
    "shards", "Shard", "Shards", "ShardResult", "ShardDone", "ShardError", "ShardFailed",
    "ShardTimeout", "WorkerCrashed", "ShardMapError",
    "table_sink", "TableSink", "TableRef", "ResultRef", "shard_reduce", "ReduceResult",
    "SchemaMismatch", "GatherTooLarge", "retry_failed", "Retry", "Backoff",
}  # fmt: skip


def test_contract_names_are_exported() -> None:
    assert set(ashard.__all__) >= CONTRACT
    assert ashard.__all__ == sorted(ashard.__all__)
    for name in ashard.__all__:
        assert getattr(ashard, name) is not None


def test_shard_map_signature_matches_the_contract() -> None:
    params = inspect.signature(ashard.shard_map).parameters
    assert list(params)[:2] == ["shards", "fn"]
    expected = {
        "borrow": None, "out": None, "pool": None, "workers": None, "chunk_size": "auto",
        "timeout": None, "max_retries": 3, "retry_errors": False, "seed": None, "cow": "deny",
        "errors": "raise", "progress": False, "on_error": None,
    }  # fmt: skip
    for name, default in expected.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[name].default == default
    stream = inspect.signature(ashard.shard_stream).parameters
    assert stream["ordered"].default is False and stream["max_pending"].default is None


def test_error_hierarchy() -> None:
    assert issubclass(ashard.ShardFailed, ashard.ShardError)
    assert issubclass(ashard.ShardTimeout, ashard.ShardError)
    assert issubclass(ashard.ShardTimeout, TimeoutError)
    assert issubclass(ashard.WorkerCrashed, ashard.ShardError)
    assert issubclass(ashard.ShardMapError, ExceptionGroup)


def test_worker_import_is_light() -> None:
    import subprocess
    import sys

    heavy = ("anyio", "numpy", "cloudpickle", "psutil", "pyarrow")
    code = (
        f"import sys, ashard._worker.loop; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_local_pool_never_imports_dask() -> None:
    code = (
        "import sys, asyncio, ashard\n"
        "async def main():\n"
        "    async with ashard.Pool(1) as pool:\n"
        "        assert await pool.call(abs, -1) == 1\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in ('dask', 'distributed') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_all_is_exactly_the_public_names() -> None:
    for module in pkgutil.walk_packages(ashard.__path__, "ashard."):
        if module.name != "ashard.__main__" and not module.name.startswith("ashard._worker.__"):
            importlib.import_module(module.name)
    for name in ashard.__all__:
        exec(f"from ashard import {name}", {})
    public = {
        name
        for name, value in vars(ashard).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public <= set(ashard.__all__)
    assert dir(ashard) == sorted([*ashard.__all__, "__version__"])


def test_public_classes_report_the_public_module() -> None:
    classes = [getattr(ashard, n) for n in ashard.__all__ if inspect.isclass(getattr(ashard, n))]
    assert len(classes) > 15
    for cls in classes:
        assert cls.__module__ == "ashard", cls
        assert repr(cls) == f"<class 'ashard.{cls.__name__}'>"
    assert "ashard.ShardTimeout: " in "".join(
        __import__("traceback").format_exception_only(
            ashard.ShardTimeout("late", shard=None, attempts=1)
        )
    )


@pytest.mark.parametrize(
    ("fn", "options"),
    [
        (ashard.shard_map, ["borrow", "out", "pool", "workers", "chunk_size", "cow", "profile"]),
        (
            ashard.shard_stream,
            ["borrow", "out", "pool", "workers", "cow", "ordered", "max_pending"],
        ),
        (ashard.map, ["borrow", "pool", "workers", "chunk_size", "timeout", "errors", "seed"]),
        (ashard.Pool.shard_map, ["borrow", "out", "chunk_size", "timeout", "max_retries", "cow"]),
        (ashard.Pool.shard_stream, ["borrow", "out", "errors", "ordered", "max_pending"]),
        (ashard.Pool.map, ["borrow", "chunk_size", "retry_errors", "progress", "profile"]),
        (ashard.shard_map, ["results", "results_path"]),
        (ashard.shard_stream, ["results", "results_path"]),
        (ashard.shard_reduce, ["init", "ordered", "borrow", "out", "max_pending", "results"]),
        (ashard.Pool.shard_reduce, ["init", "ordered", "max_pending", "timeout", "errors"]),
        (ashard.retry_failed, ["only", "pool", "on_error", "retry_errors", "timeout"]),
        (ashard.Pool.retry_failed, ["only", "on_error", "errors", "seed"]),
    ],
)
def test_signatures_show_every_option_with_its_default(fn: object, options: list[str]) -> None:
    params = inspect.signature(fn).parameters  # type: ignore[arg-type]
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
    for name in options:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert "max_retries: int = 3" in str(inspect.signature(fn))  # type: ignore[arg-type]
    assert "errors: Literal['raise', 'collect'] = 'raise'" in str(inspect.signature(fn))  # type: ignore[arg-type]
    assert "cow" not in inspect.signature(ashard.map).parameters


@pytest.mark.anyio
async def test_an_unknown_option_is_refused_by_name() -> None:
    pool = ashard.Pool(1)
    with pytest.raises(TypeError, match=r"map\(\) got an unexpected keyword argument 'cow'"):
        await ashard.map(abs, [1], cow="allow", pool=pool)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'ordered'"):
        await pool.shard_map(2, abs, ordered=True)  # type: ignore[call-arg]
    assert pool.stats.started == 0
    await pool.aclose()


@pytest.mark.anyio
async def test_shard_stream_returns_the_public_stream_to_use_in_async_with() -> None:
    stream = ashard.shard_stream(4, abs)
    assert isinstance(stream, ashard.ShardStream)
    with pytest.raises(TypeError, match="inside its async with"):
        async for _ in stream:
            pass
    with pytest.raises(ValueError, match="max_pending must be a positive int"):
        ashard.shard_stream(4, abs, max_pending=0)


def test_the_package_ships_its_types() -> None:
    assert (importlib.resources.files("ashard") / "py.typed").is_file()


USER_SCRIPT = """
    import anyio
    import numpy as np

    import ashard
    import ashard.sync


    def total(shard: ashard.Shard, X: np.ndarray) -> float:
        return float(X[shard.idx].sum())


    def noisy(shard: ashard.Shard) -> float:
        first: int = shard.idx.start
        return float(shard.rng.random(3).sum()) + first + len(shard)


    async def main() -> None:
        X = np.arange(1000.0)
        res: ashard.ShardResult = await ashard.shard_map(
            100, total, borrow={"X": X}, timeout=5.0, max_retries=1, errors="collect"
        )
        print(sum(res.results), res.diagnostics.summary())
        async with ashard.shard_stream(10, total, borrow={"X": X}, ordered=True) as stream:
            async for done in stream:
                print(done.shard.id, done.value)
        values: list[int] = await ashard.map(abs, [-1, -2], chunk_size=1)
        print(ashard.sync.shard_map(4, noisy).results, res.diagnostics.shards_table().num_rows)
        async with ashard.Pool(2, mem_cap="1GB") as pool:
            await pool.shard_map(4, total, borrow={"X": X}, cow="allow")
            print(pool.stats.alive, values)
        with ashard.table_sink(format="arrow") as sink:
            await ashard.shard_map(4, total, borrow={"X": X}, out={"rows": sink})
            refs: list[ashard.TableRef] = sink.refs
            print(sink.read().num_rows, [ref.rows for ref in refs])
        with await ashard.shard_map(4, total, results="disk", results_path=None) as disk:
            print(disk.results[0], disk.refs[0])
        red: ashard.ReduceResult = await ashard.shard_reduce(
            4, total, lambda a, b: a + b, init=0.0, ordered=True, borrow={"X": X}, max_pending=8
        )
        print(red.value, red.ok)


    anyio.run(main)
"""
MISTAKES = """
    import ashard


    async def main() -> None:
        await ashard.shard_map(10, abs, timeout="soon")
        await ashard.map(abs, [1], cow="allow")
        await ashard.shard_map(10, abs, chunk_size="big")
        async with ashard.shard_stream(3, abs, errors="ignore") as stream:
            pass
"""


def _mypy(tmp_path: Path, name: str, code: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / name
    script.write_text(textwrap.dedent(code))
    cmd = [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / ".mypy"),
           "--no-error-summary", str(script)]  # fmt: skip
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_a_user_script_type_checks_and_its_mistakes_are_caught(tmp_path: Path) -> None:
    good = _mypy(tmp_path, "good.py", USER_SCRIPT)
    assert good.returncode == 0, good.stdout + good.stderr
    bad = _mypy(tmp_path, "bad.py", MISTAKES)
    lines = [line for line in bad.stdout.splitlines() if ": error:" in line]
    assert [line.split(":")[1] for line in lines] == ["6", "7", "8", "9"], bad.stdout
    assert '"timeout"' in lines[0] and '"cow"' in lines[1] and '"chunk_size"' in lines[2]
    assert '"errors"' in lines[3]


def test_dir_of_ashard_sync_lists_only_its_public_names() -> None:
    import ashard.sync

    assert dir(ashard.sync) == sorted(ashard.sync.__all__)
    assert "asyncio" not in dir(ashard.sync) and "Any" not in dir(ashard.sync)

"""The public names of the contract exist, and only they are exported."""

from __future__ import annotations

import inspect

import ashard

CONTRACT = {
    "shard_map", "shard_stream", "map", "call", "Pool", "default_pool", "shutdown",
    "shards", "Shard", "Shards", "ShardResult", "ShardDone", "ShardError", "ShardFailed",
    "ShardTimeout", "WorkerCrashed", "ShardMapError",
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
        "errors": "raise", "progress": False,
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
    code = f"import sys, ashard._worker; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

"""The benchmark suite itself: it runs workloads against peers in separate interpreters,
reports a case that hangs as a hang, and writes its tables and JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_suite(tmp_path: Path, *args: str) -> dict:  # type: ignore[type-arg]
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "suite.py"), "--quick", "--out",
         str(tmp_path), *args],
        check=True, timeout=180, capture_output=True,
    )  # fmt: skip
    return json.loads((tmp_path / "suite.json").read_text())  # type: ignore[no-any-return]


def test_suite_measures_every_peer_and_writes_tables_and_json(tmp_path: Path) -> None:
    data = run_suite(tmp_path, "--only", "latency,crash", "--peers", "ashard,ppe")
    latency = data["workloads"]["latency"]["results"]
    assert latency["ashard"][0]["median_us"] > 0 and latency["ppe"][0]["median_us"] > 0
    crash = data["workloads"]["crash"]["results"]
    assert crash["ashard"][0]["outcome"].startswith("all 8 results")
    assert crash["ppe"][0]["outcome"].startswith("raised BrokenProcessPool")
    md = (tmp_path / "latest.md").read_text()
    assert "| ashard | call |" in md and "ProcessPoolExecutor (fork)" in md
    assert "- target: median: ashard" in md


def test_a_case_that_hangs_is_reported_and_killed(tmp_path: Path) -> None:
    # multiprocessing.Pool never returns when a worker is killed; the 3 s case limit
    # ends it, and the suite still finishes with every other row.
    data = run_suite(tmp_path, "--only", "crash", "--peers", "mp-pool,ashard", "--limit", "3")
    crash = data["workloads"]["crash"]["results"]
    assert crash["mp-pool"][0]["error"].startswith("hang: no result within 3 s")
    assert "recovery_ms" in crash["ashard"][0]


def test_missing_peers_are_named_and_results_stay_out_of_tracked_files() -> None:
    import importlib.util

    optional = {"mpire": "mpire", "ray": "ray", "aiomultiprocess": "aiomultiprocess"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "suite.py"), "--quick", "--only", "latency",
         "--peers", "ashard," + ",".join(optional)],
        check=True, timeout=180, capture_output=True, text=True,
    )  # fmt: skip
    written = out.stdout.splitlines()[-1]
    assert written.startswith("written: ") and str(ROOT) not in written  # not the tracked files
    json_path = Path(written.split(", ")[-1])
    results = json.loads(json_path.read_text())["workloads"]["latency"]["results"]
    assert "ashard" in results
    for peer, module in optional.items():
        if importlib.util.find_spec(module) is None:
            assert f"{peer} (needs {module})" in out.stderr and peer not in results
        else:
            assert peer in results
    if any(importlib.util.find_spec(m) is None for m in optional.values()):
        assert "pip install -e '.[bench]'" in out.stderr

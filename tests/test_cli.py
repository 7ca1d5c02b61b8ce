"""`python -m ashard demo | info`."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_a_real_workload_and_prints_diagnostics() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ashard", "demo", "--items", "200", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "pi ~ 3.1" in out.stdout
    assert "shards on 2 worker processes" in out.stdout
    assert "a chunk is one message" in out.stdout  # the words of the summary, explained
    assert "retries" in out.stdout


def test_info_prints_versions_and_cpu_count() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ashard", "info"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "cpu count" in out.stdout and "anyio" in out.stdout and "start method" in out.stdout


def test_demo_help_explains_its_options() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ashard", "demo", "--help"], capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 0
    assert "worker processes to start" in out.stdout and "random points each" in out.stdout

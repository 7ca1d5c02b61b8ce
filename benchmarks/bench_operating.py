"""What operating features cost (issue 25): hygiene ``"check"`` against ``"off"``, and
tracing - opentelemetry not loaded, loaded without a provider, a provider that does not
sample, one that samples - on the tiny row (a `map` of tiny items), a `chunk_size=1`
map and call latency. Each tracing case runs in a fresh interpreter (whether the
application imported opentelemetry is the point); rounds alternate the cases, medians.

    python benchmarks/bench_operating.py [--rounds 5] [--items 2000000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

CHILD = r"""
import json, os, sys, time
import anyio
tracing, hygiene, items, tasks, calls = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
if tracing != "absent":
    from opentelemetry import trace
if tracing in ("off", "on"):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

    class Dropping(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    provider = TracerProvider(sampler=ALWAYS_ON if tracing == "on" else ALWAYS_OFF)
    provider.add_span_processor(BatchSpanProcessor(Dropping()))
    trace.set_tracer_provider(provider)
import ashard

def inc(x):
    return x + 1

async def main():
    out = {}
    async with ashard.Pool(2, hygiene=hygiene) as pool:
        await pool.map(inc, range(10_000))
        await pool.call(abs, -1)
        t0 = time.perf_counter()
        await pool.map(inc, range(items))
        out["tiny_us"] = (time.perf_counter() - t0) / items * 1e6
        t0 = time.perf_counter()
        await pool.map(inc, range(tasks), chunk_size=1)
        out["task_us"] = (time.perf_counter() - t0) / tasks * 1e6
        t0 = time.perf_counter()
        for _ in range(calls):
            await pool.call(abs, -1)
        out["call_us"] = (time.perf_counter() - t0) / calls * 1e6
    print(json.dumps(out))

anyio.run(main)
"""

CASES = [
    ("hygiene off", "absent", "off"),
    ("hygiene check (default)", "absent", "check"),
    ("opentelemetry loaded, no provider", "imported", "check"),
    ("provider, not sampling", "off", "check"),
    ("provider, sampling every span", "on", "check"),
]


def run(tracing: str, hygiene: str, items: int, tasks: int, calls: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, "..", "src"))
    args = [tracing, hygiene, str(items), str(tasks), str(calls)]
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True,
                         env=env, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--items", type=int, default=2_000_000)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--calls", type=int, default=3_000)
    a = parser.parse_args()
    seen: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in CASES}
    for _ in range(a.rounds):
        for name, tracing, hygiene in CASES:
            seen[name].append(run(tracing, hygiene, a.items, a.tasks, a.calls))
    print(f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}; 2 workers; medians of "
          f"{a.rounds} rounds (each case a fresh interpreter, cases alternating).\n")  # fmt: skip
    base = {k: statistics.median(r[k] for r in seen["hygiene off"]) for k in seen["hygiene off"][0]}
    print(
        "| case | tiny map, µs/item | vs off | chunk_size=1, µs/task | vs off | call, µs | vs off |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, _, _ in CASES:
        med = {k: statistics.median(r[k] for r in seen[name]) for k in base}
        keys = ("tiny_us", "task_us", "call_us")
        cells = [f"{med[k]:.3f} | {med[k] / base[k]:.2f}x" for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

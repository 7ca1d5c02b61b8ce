"""The suite's output: a Markdown table per workload (absolute figures and the ratio to
ashard), the JSON of everything, and a PNG bar chart per workload (if matplotlib is
installed)."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import peers

Results = dict[str, list[dict[str, Any]]]
VERSIONED = ["ashard", "anyio", "numpy", "loky", "joblib", "mpire", "aiomultiprocess",
             "distributed", "ray", "matplotlib"]  # fmt: skip


def machine() -> dict[str, Any]:
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) << 10
    except (OSError, StopIteration):
        pass
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "cpu": model, "cpu_count": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
        "platform": platform.platform(), "python": sys.version.split()[0], "versions": versions,
    }  # fmt: skip


def _ashard_row(results: Results, variant: str | None) -> dict[str, Any] | None:
    rows = [r for r in results.get("ashard", []) if "error" not in r and "na" not in r]
    for r in rows:
        if r.get("variant") == variant:
            return r
    return rows[0] if rows else None


def table(workload: ModuleType, results: Results) -> str:
    heads = [h for _, h, _ in workload.COLUMNS]
    ratio_head = "ratio to ashard (" + " / ".join(
        h for k, h, _ in workload.COLUMNS if k in workload.RATIO) + ")"  # fmt: skip
    lines = [
        "| library | variant | " + " | ".join(heads) + f" | {ratio_head} |",
        "|---|---|" + "---:|" * len(heads) + "---:|",
    ]
    for peer, rows in results.items():
        label = peers.label(peer)
        for row in rows:
            variant = row.get("variant", "")
            if "error" in row or "na" in row:
                text = f"error: {row['error']}" if "error" in row else f"n/a: {row['na']}"
                lines.append(f"| {label} | {variant} | {text} |" + " |" * len(heads))
                continue
            cells = []
            for key, _, fmt in workload.COLUMNS:
                value = row.get(key)
                cells.append("" if value is None else fmt.format(value))
            ref = _ashard_row(results, variant)
            ratios = []
            for key in workload.RATIO:
                mine, theirs = row.get(key), (ref or {}).get(key)
                ok = isinstance(mine, int | float) and isinstance(theirs, int | float) and theirs
                ratios.append(f"{mine / theirs:.2f}" if ok else "-")
            note = f" ({row['note']})" if row.get("note") else ""
            lines.append(
                f"| {label}{note} | {variant} | " + " | ".join(cells) + f" | {' / '.join(ratios)} |"
            )
    return "\n".join(lines)


def chart(workload: ModuleType, name: str, results: Results, path: Path) -> str | None:
    """A horizontal bar chart of the workload's headline figure; None if it was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart"
    key = workload.CHART
    bars = [(f"{peers.label(p)} [{r.get('variant', '')}]", r[key]) for p, rows in results.items()
            for r in rows if isinstance(r.get(key), int | float)]  # fmt: skip
    if not bars:
        return "nothing to draw"
    header = next(h for k, h, _ in workload.COLUMNS if k == key)
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(bars) + 1.2))
    labels, values = zip(*bars, strict=True)
    colors = ["#d62728" if label.startswith("ashard") else "#7f7f7f" for label in labels]
    ax.barh(range(len(bars)), values, color=colors)
    ax.set_yticks(range(len(bars)), labels, fontsize=8)
    ax.invert_yaxis()
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_xscale("log")
        header += " (log scale)"
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
    ax.set_xlabel(header)
    ax.set_title(workload.TITLE, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")

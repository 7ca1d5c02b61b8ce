"""How much memory this process may use: the machine's, or less under a cgroup memory
limit (v2 or v1, the tightest from its own cgroup up to the root)."""

from __future__ import annotations

import os

__all__ = ["limit_bytes", "physical_bytes"]

_V2_ROOT, _V1_ROOT = "/sys/fs/cgroup", "/sys/fs/cgroup/memory"


def physical_bytes() -> int:
    """The machine's memory."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def limit_bytes() -> int:
    """The machine's memory, or the tightest cgroup memory limit above this process."""
    limit = physical_bytes()
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return limit
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            root, name = _V2_ROOT, "memory.max"
        elif "memory" in controllers.split(","):
            root, name = _V1_ROOT, "memory.limit_in_bytes"
        else:
            continue
        for folder in _up_from(path):
            limit = min(limit, _read_limit(f"{root}{folder}/{name}"))
    return limit


def _up_from(path: str) -> list[str]:
    """`path` and each cgroup above it, as folders under the hierarchy's root."""
    folders = []
    path = path.rstrip("/")
    while path:
        folders.append(path)
        path = path.rpartition("/")[0]
    return folders


def _read_limit(file: str) -> int:
    """The limit in `file`; no limit ("max", a v1 "unlimited" number, unreadable) is huge."""
    try:
        with open(file) as f:
            text = f.read().strip()
    except OSError:
        return 1 << 62
    return int(text) if text.isdigit() else 1 << 62

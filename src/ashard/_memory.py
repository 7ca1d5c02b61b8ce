"""How much memory this process may use: the machine's, or less under a cgroup memory
limit (v2 or v1, the tightest from its own cgroup up to the root); and how much of it is
still free (`available_bytes`, for ``mem_budget="auto"``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

__all__ = ["available_bytes", "limit_bytes", "oom_kills", "physical_bytes"]

_V2_ROOT, _V1_ROOT = "/sys/fs/cgroup", "/sys/fs/cgroup/memory"
_NO_LIMIT = 1 << 62


def physical_bytes() -> int:
    """The machine's memory."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def limit_bytes() -> int:
    """The machine's memory, or the tightest cgroup memory limit above this process."""
    limit = physical_bytes()
    for limit_file, _ in _cgroups():
        limit = min(limit, _read_number(limit_file))
    return limit


def available_bytes() -> tuple[int, str]:
    """What this process may still use, and where that figure comes from: the host's
    available memory ("host"), or less under a cgroup memory limit: the limit less the
    cgroup's current use, the tightest from this process's cgroup up ("cgroup")."""
    import psutil  # on first use: `import ashard` loads no psutil

    room, source = int(psutil.virtual_memory().available), "host"
    for limit_file, usage_file in _cgroups():
        limit = _read_number(limit_file)
        if limit >= _NO_LIMIT:
            continue
        left = max(0, limit - min(limit, _read_number(usage_file, 0)))
        if left < room:
            room, source = left, "cgroup"
    return room, source


def oom_kills() -> int:
    """Processes the kernel's out-of-memory killer ended in this process's memory
    cgroups so far (v2 ``memory.events``, v1 ``memory.oom_control``; 0 if unreadable)."""
    total = 0
    for limit_file, _ in _cgroups():
        folder = os.path.dirname(limit_file)
        for name in ("memory.events", "memory.oom_control"):
            try:
                with open(f"{folder}/{name}") as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            for line in lines:
                key, _, value = line.partition(" ")
                if key == "oom_kill" and value.strip().isdigit():
                    total += int(value)
    return total


def _cgroups() -> Iterator[tuple[str, str]]:
    """(limit file, usage file) of each memory cgroup from this process's up to the
    root, v2 and v1."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            root, limit, usage = _V2_ROOT, "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            root, limit, usage = _V1_ROOT, "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        for folder in _up_from(path):
            yield f"{root}{folder}/{limit}", f"{root}{folder}/{usage}"


def _up_from(path: str) -> list[str]:
    """`path` and each cgroup above it, as folders under the hierarchy's root."""
    folders = []
    path = path.rstrip("/")
    while path:
        folders.append(path)
        path = path.rpartition("/")[0]
    return folders


def _read_number(file: str, missing: int = _NO_LIMIT) -> int:
    """The number in `file`; none ("max", unreadable) is `missing` (no limit)."""
    try:
        with open(file) as f:
            text = f.read().strip()
    except OSError:
        return missing
    return int(text) if text.isdigit() else missing

"""Worker health: memory caps, drift recycling, task limits, idle exit, profiles.

A worker's memory is its *private* resident memory (RSS minus shared pages): shared
inputs mapped by every worker exist once on the machine and are not charged to any
of them. It is read two ways: each worker reports it with every finished chunk (a
check between chunks at no cost to the parent), and a monitor thread reads every
worker with psutil each `health_check_interval` seconds, so a shard that allocates
without end is killed mid-shard, long before it takes the machine down.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ashard._handle import WorkerHandle

__all__ = ["PROFILES", "HealthPolicy", "Profile", "parse_bytes"]

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6,
    "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(name: str, value: object) -> int | None:
    """Bytes from an int or a string such as "512MB", "2GB" or "1.5GiB"; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number of bytes or a size like '2GB', got bool")
    if isinstance(value, numbers.Real):
        size = float(value)
    elif isinstance(value, str):
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"{name} must be a number of bytes or a size like '512MB' or '2GB', got {value!r}"
            )
        size = float(match.group(1)) * _UNITS[unit]
    else:
        raise TypeError(
            f"{name} must be a number of bytes or a size like '2GB', got {type(value).__name__}"
        )
    if not size > 0 or math.isinf(size):
        raise ValueError(f"{name} must be a positive size, got {value!r}")
    return int(size)


@dataclass(frozen=True, slots=True)
class Profile:
    """How hard a call watches its workers (R shard's profiles).

    `interval`: factor on `health_check_interval`; `drift`: factor on the drift
    threshold; `floor`: growth in bytes below which drift never recycles; `chunk`:
    factor on the work per chunk (fewer, larger chunks mean fewer checks between them).
    """

    interval: float
    drift: float
    floor: int
    chunk: float


PROFILES = {
    "default": Profile(interval=1.0, drift=1.0, floor=100 * 2**20, chunk=1.0),
    "memory": Profile(interval=0.25, drift=0.5, floor=25 * 2**20, chunk=0.25),
    "speed": Profile(interval=4.0, drift=2.0, floor=400 * 2**20, chunk=4.0),
}


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """A pool's limits. `mem_cap` in bytes (soft: recycle between shards); past
    ``mem_cap * hard_factor`` a worker is killed at once. `drift`: recycle when
    private memory grows by this fraction over its post-`init` baseline (None: off)."""

    mem_cap: int | None = None
    hard_factor: float = 1.5
    drift: float | None = 0.5
    interval: float = 1.0
    max_tasks: int | None = None
    idle_timeout: float | None = None

    @property
    def hard_cap(self) -> int | None:
        return None if self.mem_cap is None else int(self.mem_cap * self.hard_factor)

    def over_hard_cap(self, rss: int) -> bool:
        hard = self.hard_cap
        return hard is not None and rss > hard

    def soft_reason(self, w: WorkerHandle, profile: Profile) -> str | None:
        """Why `w` should be replaced once its current work is done, if it should."""
        if self.max_tasks is not None and w.tasks >= self.max_tasks:
            return "max_tasks"
        if self.mem_cap is not None and w.rss > self.mem_cap:
            return "mem_cap"
        if self.drift is not None and w.baseline_rss:
            growth = w.rss - w.baseline_rss
            if growth > max(self.drift * profile.drift * w.baseline_rss, profile.floor):
                return "drift"
        return None

"""The ``"ashard"`` logger: what happens to pools and workers, for people reading logs.

INFO: a worker started, is ready, exited (with the reason), was recycled (with the
reason). WARNING: a worker crashed (signal or exit code), a shard or call timed out,
a shard runs again. Every record names the worker's pid (and the shard and reason
where they apply) in its message and carries them as attributes (``record.pid``,
``record.shard_id``, ``record.reason``). Silent unless the application configures
logging, as for any library (a `NullHandler` is attached).
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["logger", "worker_event"]

logger = logging.getLogger("ashard")
logger.addHandler(logging.NullHandler())


def worker_event(level: int, message: str, pid: int, **attrs: Any) -> None:
    """Log `message` about worker `pid` (with `attrs` as record attributes)."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={"pid": pid, **attrs})

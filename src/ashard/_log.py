"""The ``"ashard"`` logger: what happens to pools and workers, for people reading logs.

INFO: a worker started, is ready, exited (with the reason), was recycled (with the
reason). WARNING: a worker crashed (signal or exit code), a shard or call timed out,
a shard runs again. Every record names the worker's pid (and the shard and reason
where they apply) in its message and carries them as attributes (``record.pid``,
``record.shard_id``, ``record.reason``). Silent unless the application configures
logging, as for any library (a `NullHandler` is attached).

Warnings go to the caller's own line (`warn_user`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from types import FrameType
from typing import Any

__all__ = ["logger", "warn_user", "worker_event"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_CONTEXTLIB = contextlib.__file__  # ashard's `with` blocks end in its frames
# where the frames of event loops and threads are, not a caller's (POSIX paths)
_MACHINERY = ("/asyncio/", "/anyio/", "/trio/", "/concurrent/", "/threading.py")

logger = logging.getLogger("ashard")
logger.addHandler(logging.NullHandler())


def worker_event(level: int, message: str, pid: int, **attrs: Any) -> None:
    """Log `message` about worker `pid` (with `attrs` as record attributes)."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={"pid": pid, **attrs})


def warn_user(message: str | Warning, category: type[Warning] | None = None) -> None:
    """`warnings.warn`, at the first frame outside ashard: the line of the caller's code
    that made the call, where the shown location and `module=` filters should point
    (a warning raised on ashard's own loop thread, for `ashard.sync`, has none)."""
    level = 1
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and _ours(frame):
        frame = frame.f_back
        level += 1
    if frame is None or any(part in frame.f_code.co_filename for part in _MACHINERY):
        level = 1  # no caller's line in this thread (ashard's loop): ashard's own line
    warnings.warn(message, category, stacklevel=level + 1)


def _ours(frame: FrameType) -> bool:
    name = frame.f_code.co_filename
    return name.startswith(_PACKAGE) or name == _CONTEXTLIB

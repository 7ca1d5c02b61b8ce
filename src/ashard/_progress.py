"""The `progress=True` bar on stderr: tqdm when installed, else a plain status line."""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["Progress"]


class Progress:
    """Counts finished shards; redraws at most ten times a second."""

    def __init__(self, total: int | None, desc: str) -> None:
        self.total = total
        self.done = 0
        self._desc = desc
        self._bar: Any = None
        self._last = 0.0
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, desc=desc, unit=desc, file=sys.stderr, mininterval=0.1)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= 0.1:
            self._last = now
            self._draw(end="")

    def _draw(self, end: str) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        sys.stderr.write(f"\r{self._desc}: {self.done}{of}{end}")
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._draw(end="\n")

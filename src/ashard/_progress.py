"""The `progress=True` bar: tqdm's when it is installed (`tqdm.auto`: a widget in a
notebook with ipywidgets, made in the calling cell), else a bar of ashard's own on
stderr, so a fresh install shows one too. (tqdm stays optional: the runtime
dependencies are kept to what the engine needs.)"""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["Progress"]

_WIDTH = 24


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"


class Progress:
    """Counts finished shards; redraws at most ten times a second."""

    def __init__(self, total: int | None, desc: str) -> None:
        self.total = total
        self.done = 0
        self._desc = desc
        self._bar: Any = None
        self._last = 0.0
        self._t0 = time.monotonic()
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
        sys.stderr.write(f"\r{self.line()}{end}")
        sys.stderr.flush()

    def line(self) -> str:
        """``shards  42%|########          | 420/1000 [00:03<00:04, 131.2/s]``"""
        elapsed = time.monotonic() - self._t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        speed = f"{rate:,.1f} {self._desc}/s"
        if not self.total:
            return f"{self._desc}: {self.done:,} [{_clock(elapsed)}, {speed}]"
        frac = min(self.done / self.total, 1.0)
        filled = int(frac * _WIDTH)
        bar = "#" * filled + " " * (_WIDTH - filled)
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        return (
            f"{self._desc} {frac:4.0%}|{bar}| {self.done:,}/{self.total:,} "
            f"[{_clock(elapsed)}<{_clock(left)}, {speed}]"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._draw(end="\n")

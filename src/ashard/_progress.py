"""The `progress=True` bar. In a notebook (an IPython kernel) a display of ashard's own,
updated in place in the calling cell: an HTML progress bar with the counts, no
ipywidgets needed, and a saved notebook keeps its final state (not every frame).
Elsewhere tqdm's text bar on stderr when tqdm is installed, else a text bar of ashard's
own, so a fresh install shows one too. (tqdm stays optional: the runtime dependencies
are kept to what the engine needs.) A bar that cannot be drawn (no stderr, as under
pythonw or a service; stderr closed, or a pipe nobody reads any more) is not drawn:
a progress bar never fails a call."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

__all__ = ["Progress"]

_WIDTH = 24
_REDRAW_SECONDS = 0.1


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"


def _notebook_display() -> Any:
    """IPython's `display`, where this runs in a kernel whose front end shows display
    data (Jupyter, VS Code); None elsewhere (a terminal IPython included)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None or getattr(shell, "kernel", None) is None:
        return None
    from IPython.display import display  # optional: notebooks only

    return display


_UNDRAWABLE = (OSError, ValueError)
"""What writing to a closed stream, or a pipe nobody reads, raises."""


class Progress:
    """Counts finished shards; redraws at most ten times a second. `load()` first, off
    the caller's loop: importing tqdm takes tens of milliseconds."""

    @staticmethod
    def load() -> Any:
        """tqdm's bar, where it is installed and no notebook shows ashard's own; else
        None. Called in a thread (`ashard._job.Job.prepare`)."""
        if _notebook_display() is not None:
            return None
        try:
            from tqdm.std import tqdm  # optional
        except ImportError:
            return None
        tqdm.get_lock()  # its first bar makes a multiprocessing lock: imports, a semaphore
        return tqdm

    def __init__(self, total: int | None, desc: str, tqdm: Any = None) -> None:
        """`tqdm`: the class `load()` gave, or None for ashard's own text bar."""
        self.total = total
        self.done = 0
        self._desc = desc
        self._bar: Any = None  # tqdm's
        self._shown: Any = None  # the notebook display's handle
        self._stream: Any = None  # where ashard's own text bar goes; None: nowhere
        self._last = 0.0
        self._t0 = time.monotonic()
        display = _notebook_display()
        if display is not None:
            self._shown = display(self._bundle(), raw=True, display_id=True)
            return
        stream = sys.stderr
        if stream is None:
            return
        if tqdm is None:
            self._stream = stream
            return
        with contextlib.suppress(*_UNDRAWABLE):
            self._bar = tqdm(total=total, desc=desc, unit=desc, file=stream,
                             mininterval=_REDRAW_SECONDS)  # fmt: skip

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            try:
                self._bar.update(n)
            except _UNDRAWABLE:
                self._bar = None
            return
        now = time.monotonic()
        if now - self._last >= _REDRAW_SECONDS:
            self._last = now
            self._draw(end="")

    def _draw(self, end: str) -> None:
        if self._shown is not None:
            self._shown.update(self._bundle(), raw=True)
            return
        if self._stream is None:
            return
        try:
            self._stream.write(f"\r{self.line()}{end}")
            self._stream.flush()
        except _UNDRAWABLE:
            self._stream = None

    def _bundle(self) -> dict[str, str]:
        """The notebook display: an HTML bar with the line beside it, and the line."""
        import html  # in a notebook only

        line = self.line()
        value = f' value="{self.done}" max="{self.total}"' if self.total else ""
        bar = f'<progress{value} style="width:16em;vertical-align:middle"></progress>'
        return {
            "text/plain": line,
            "text/html": f"<div>{bar} <code>{html.escape(line)}</code></div>",
        }

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
            bar, self._bar = self._bar, None
            with contextlib.suppress(*_UNDRAWABLE):
                bar.close()
        else:
            self._draw(end="\n")

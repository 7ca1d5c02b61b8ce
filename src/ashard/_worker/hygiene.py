"""Hygiene between tasks (DESIGN 2.6): after each chunk or call, put back what user code
changed in process-wide state that is cheap to restore, and say what it cannot.

Restored, each to its *baseline* (the state after `init` and after a job was loaded:
work done there is not a change): `os.environ` (and the time zone, when `TZ` was
changed), the working directory, `sys.path`, the `warnings` filters, the root logger's
handlers and level, `sys.settrace` / `sys.setprofile`, signal handlers (ashard's own
too: its timeout and interrupt handlers, and the faulthandler of its stack dumps), the
`random` module after `random.seed` or `random.setstate` (reseeded from fresh entropy,
unless the call has a `seed=`, which sets it per shard anyway), and the settings a
later shard would compute or write differently under (`_SETTINGS`): decimal's context,
numpy's error handling and print options, the locale, the umask, socket's default
timeout, the garbage collector's switch and thresholds. Reported, not restored:
non-daemon threads left running,
tasks left pending on the worker's asyncio loop (a shard's `create_task` never awaited:
it would run again during the next ``async def`` task), child processes left running,
file descriptors left open.

Every check is cheap, so the tiny-task cost stays small: dict and list comparisons, one
`getcwd`, a thread count, one `pread` of the main thread's children, a few microseconds
of settings (those of modules loaded only), and the lowest free descriptor number before
and after (a descriptor left open takes the lowest free
number, so it moves). Signal handlers and the `random` seeding are watched by wrapping
`signal.signal`, `random.seed` and `random.setstate`: nothing to compare per chunk.
"""

from __future__ import annotations

import _locale  # noqa: F401  # (with gc: loaded here, so `_SETTINGS` has them from the start)
import faulthandler
import gc  # noqa: F401
import os
import random
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

from ashard._protocol import DUMP_SIGNAL, INTERRUPT_SIGNAL

__all__ = ["Hygiene", "Notes"]

Notes = tuple[list[str], bool]
"""What one chunk or call left: one-line notes, and whether it left something that could
not be put back (threads, processes, descriptors)."""

_MAX_NOTES = 20
_OWN_SIGNALS = frozenset({signal.SIGALRM, INTERRUPT_SIGNAL, DUMP_SIGNAL})
"""The handlers ashard's timeouts, interrupts and stack dumps need: put back always."""


class Hygiene:
    """The baseline of one worker process, and the check after each task."""

    def __init__(self, mode: str, keep_fds: Callable[[], set[int]], dump_fd: int | None) -> None:
        self.mode = mode
        self._keep_fds = keep_fds  # descriptors ashard itself opened meanwhile
        self._dump_fd = dump_fd
        self.seq: int | None = None  # the chunk or call being run (None: none)
        self._together = ""  # the tasks that ran with it, if others did
        self._seeded = False
        self._low = 0
        self._fds = _open_fds()  # the descriptors open when last looked at
        self._end_low = _lowest_free()  # the lowest free one then
        self._touched_signals: dict[int, Any] = {}  # signum -> its handler before
        self._random_set = False
        self._seen_threads: set[int] = set()
        # threads that run nothing now and belong to the worker's loop (its executor)
        self.idle_threads: Callable[[], set[threading.Thread]] = set
        # the tasks pending on the worker's event loop, once it has one (`asyncrun`)
        self.loop_tasks: Callable[[], list[Any]] = list
        self._seen_tasks: weakref.WeakSet[Any] = weakref.WeakSet()
        self._seen_children: set[int] = set()
        self._children_fd = _open_children()
        self._wrap()
        self.rebase()

    # -- baseline ---------------------------------------------------------------------

    def rebase(self) -> None:
        """Take what is now as the baseline (after `init`, after a job is loaded)."""
        self._env = dict(os.environ._data)  # type: ignore[attr-defined]
        self._cwd = _cwd()
        self._path = list(sys.path)
        self._filters = _warning_filters()
        self._logging = _root_logger()
        self._trace = sys.gettrace(), sys.getprofile()
        self._threads = threading.active_count()
        self._seen_threads = {t.ident for t in threading.enumerate() if t.ident is not None}
        self._seen_tasks = weakref.WeakSet(self.loop_tasks())
        self._modules = len(sys.modules)
        self._umask = _umask()
        # (setting, its module, its baseline) for the settings of the modules loaded
        self._watched = [
            (setting, module, setting.get(module))
            for setting in _SETTINGS
            if (module := sys.modules.get(setting.module)) is not None
        ]
        self._watched_at = len(sys.modules)

    def _wrap(self) -> None:
        """Watch `signal.signal`, `random.seed` and `random.setstate` from now on."""
        real_signal = signal.signal
        touched = self._touched_signals

        def watched_signal(signum: Any, handler: Any) -> Any:
            number = int(signum)
            if number not in touched:
                touched[number] = signal.getsignal(number)
            return real_signal(signum, handler)

        watched_signal.__doc__ = real_signal.__doc__
        signal.signal = watched_signal  # type: ignore[assignment]
        self._real_signal = real_signal
        real_seed, real_setstate = random.seed, random.setstate

        def watched_seed(*args: Any, **kwargs: Any) -> None:
            self._random_set = True
            real_seed(*args, **kwargs)

        def watched_setstate(state: Any) -> None:
            self._random_set = True
            real_setstate(state)

        watched_seed.__doc__, watched_setstate.__doc__ = real_seed.__doc__, real_setstate.__doc__
        random.seed, random.setstate = watched_seed, watched_setstate
        self._real_seed = real_seed

    # -- around each task ---------------------------------------------------------------

    def begin(self, seq: int, seeded: bool, fds: bool = True, loaded: bool = False) -> None:
        """Task `seq` starts (`seeded`: its call has a `seed=`, which sets `random`;
        `fds`: look for descriptors it leaves open - not while ashard's own outputs
        open files and connections of their own; `loaded`: its own code was just
        unpickled - a call's function - and what that did, importing, is baseline)."""
        self.seq = seq
        self._together = ""
        if self.mode == "off":
            return
        self._seeded = seeded
        modules = len(sys.modules)
        if (loaded or modules != self._modules) and self._moved():
            self.rebase()  # loading it (unpickling its items) imported what changed it
        self._modules = modules
        self._low = _lowest_free() if fds else -1
        if self._low >= 0 and self._low != self._end_low:  # opened or closed meanwhile
            self._fds = _open_fds()

    def carry(self, seq: int, together: str) -> None:
        """Task `seq` joins the one under way (async chunks of a job run together): they
        are checked as one, when `seq`'s final report goes; `together` says which ran."""
        if self.seq is not None:
            self.seq = seq
            self._together = together

    def end(self, seq: int) -> Notes | None:
        """Task `seq` is over: put back what it changed; what it left, or None."""
        if seq != self.seq:
            return None
        self.seq = None
        notes: list[str] = []
        if self.mode == "off":  # ashard's own handlers only, silently: its timeouts,
            if self._touched_signals:  # interrupts and stack dumps depend on them
                self._restore_signals(notes, only=_OWN_SIGNALS)
            return None
        self._restore(notes)
        left = self._left_behind(notes)
        self._modules = len(sys.modules)
        if not notes:
            return None
        if self._together:
            notes = [f"{note} ({self._together})" for note in notes]
        if len(notes) > _MAX_NOTES:
            notes[_MAX_NOTES:] = [f"... and {len(notes) - _MAX_NOTES} more"]
        return notes, left

    def _moved(self) -> bool:
        """Is the restorable state other than the baseline?"""
        warnings, logging = sys.modules.get("warnings"), sys.modules.get("logging")
        return (
            os.environ._data != self._env  # type: ignore[attr-defined]
            or _cwd() != self._cwd
            or sys.path != self._path
            or (warnings is not None and warnings.filters != self._filters)
            or (logging is not None and _root_logger() != self._logging)
            or (sys.gettrace(), sys.getprofile()) != self._trace
        )

    def _restore(self, notes: list[str]) -> None:
        env = os.environ._data  # type: ignore[attr-defined]
        if env != self._env:
            zone = env.get(b"TZ")
            _restore_env(env, self._env, notes)
            if env.get(b"TZ") != zone:
                time.tzset()  # the zone a `time.tzset()` took from the TZ put back
        if (cwd := _cwd()) != self._cwd and self._cwd is not None:
            try:
                os.chdir(self._cwd)
                notes.append(f"the working directory was changed to {cwd!r}; restored")
            except OSError as exc:
                notes.append(f"the working directory was changed to {cwd!r}; not restored: {exc}")
        if sys.path != self._path:
            sys.path[:] = self._path
            notes.append("sys.path was changed; restored")
        warnings = sys.modules.get("warnings")
        if warnings is not None and self._filters is not None and warnings.filters != self._filters:
            if len(sys.modules) != self._modules:
                # a module imported meanwhile added them (numpy does): that is not the
                # task's change to put back, but what importing it does, as in `init`
                self._filters = list(warnings.filters)
            else:
                warnings.filters[:] = self._filters
                mutated = getattr(warnings, "_filters_mutated", None)
                if mutated is not None:
                    mutated()
                notes.append("the warnings filters were changed; restored")
        self._restore_logging(notes)
        self._restore_settings(notes)
        if (sys.gettrace(), sys.getprofile()) != self._trace:
            sys.settrace(self._trace[0])
            sys.setprofile(self._trace[1])
            notes.append("sys.settrace or sys.setprofile was called; restored")
        if self._touched_signals:
            self._restore_signals(notes)
        if self._random_set:
            self._random_set = False
            if not self._seeded:
                self._real_seed()
                notes.append(
                    "random.seed or random.setstate was called; the random module was "
                    "reseeded from fresh entropy"
                )

    def _restore_settings(self, notes: list[str]) -> None:
        if (mask := os.umask(self._umask)) != self._umask:
            notes.append(f"the umask was changed to {mask:03o}; restored")
        if len(sys.modules) != self._watched_at:
            self._watch_new()
        for setting, module, base in self._watched:
            if setting.same(module, base):
                continue
            try:
                setting.put(module, base)
            except Exception as exc:  # (a locale that cannot be set again, say)
                notes.append(f"{setting.what} was changed; not restored: {exc}")
                continue
            notes.append(f"{setting.what} was changed; restored")

    def _watch_new(self) -> None:
        """Watch the settings of modules loaded since: a task loaded them, so their
        baseline is what a fresh process starts with (or, if that is not known, what
        the task left)."""
        self._watched_at = len(sys.modules)
        known = {setting for setting, _, _ in self._watched}
        for setting in _SETTINGS:
            module = sys.modules.get(setting.module)
            if module is not None and setting not in known:
                fresh = setting.fresh(module) if setting.fresh else setting.get(module)
                self._watched.append((setting, module, fresh))

    def _restore_logging(self, notes: list[str]) -> None:
        logging = sys.modules.get("logging")
        if logging is None:
            return
        root = logging.root
        handlers, level = self._logging if self._logging is not None else ([], logging.WARNING)
        if root.handlers != handlers:
            root.handlers[:] = handlers
            notes.append("the root logger's handlers were changed; restored")
        if root.level != level:
            root.setLevel(level)
            notes.append("the root logger's level was changed; restored")

    def _restore_signals(self, notes: list[str], only: frozenset[int] | None = None) -> None:
        touched = dict(self._touched_signals)
        self._touched_signals.clear()  # the same dict: the wrapper writes to it
        for number, before in sorted(touched.items()):
            if signal.getsignal(number) == before or (only is not None and number not in only):
                continue
            try:
                self._real_signal(number, before if before is not None else signal.SIG_DFL)
                if number == DUMP_SIGNAL and self._dump_fd is not None:
                    # faulthandler believes it still holds the signal: it re-installs
                    # its handler only once it has let go of it
                    faulthandler.unregister(number)
                    faulthandler.register(number, file=self._dump_fd, all_threads=True,
                                          chain=False)  # fmt: skip
            except (OSError, ValueError, TypeError) as exc:
                notes.append(f"the handler of {_signal_name(number)} was changed; not restored: "
                             f"{exc}")  # fmt: skip
                continue
            notes.append(f"the handler of {_signal_name(number)} was changed; restored")

    def _left_behind(self, notes: list[str]) -> bool:
        left = False
        if threading.active_count() > self._threads:
            idle = self.idle_threads()
            for t in threading.enumerate():
                if t.ident not in self._seen_threads and t.is_alive() and t not in idle:
                    if t.ident is not None:
                        self._seen_threads.add(t.ident)
                    if not t.daemon:
                        notes.append(f"a non-daemon thread {t.name!r} was left running")
                        left = True
        for task in self.loop_tasks():
            if task not in self._seen_tasks:
                self._seen_tasks.add(task)
                notes.append(f"an asyncio task {_task_name(task)} was left running")
                left = True
        if self._children_fd is not None:
            try:
                listed = os.pread(self._children_fd, 4096, 0)
            except OSError:
                listed = b""
            for pid in (int(p) for p in listed.split()):
                if pid not in self._seen_children and _running(pid):
                    self._seen_children.add(pid)
                    notes.append(f"child process {pid} ({_command(pid)}) was left running")
                    left = True
        low = _lowest_free() if self._low >= 0 else -1
        if low > self._low:  # something took the lowest free one: which are new?
            keep, now = self._keep_fds(), _open_fds()
            new = sorted(now - self._fds - keep)
            self._fds = now
            opened = [fd for fd in new if _is_users(fd)]
            for fd in opened[:5]:
                notes.append(f"file descriptor {fd} ({_target(fd)}) was left open")
            if len(opened) > 5:
                notes.append(f"... and {len(opened) - 5} more file descriptors were left open")
            left = left or bool(opened)
        if low >= 0:
            self._end_low = low
        return left


# -- the pieces -----------------------------------------------------------------------


class _Setting(NamedTuple):
    """A process-wide setting of `module`, looked at once the module is loaded: `get`
    and `put` its value; `fresh` gives the value a fresh process has (the baseline when
    a task loaded the module itself), None: as first seen; `equal`, if given, tells
    whether the value is a baseline more cheaply than `get` and ``==``."""

    module: str
    what: str
    get: Callable[[Any], Any]
    put: Callable[[Any, Any], None]
    fresh: Callable[[Any], Any] | None = None
    equal: Callable[[Any, Any], bool] | None = None

    def same(self, module: Any, base: Any) -> bool:
        return self.equal(module, base) if self.equal else bool(self.get(module) == base)


def _decimal_of(context: Any) -> tuple[Any, ...]:
    """A decimal context's settings (not its flags: ordinary arithmetic raises those)."""
    return (context.prec, context.rounding, context.Emin, context.Emax, context.capitals,
            context.clamp, dict(context.traps))  # fmt: skip


def _decimal_is(decimal: Any, base: tuple[Any, ...]) -> bool:
    c = decimal.getcontext()
    return bool(c.traps == base[6]) and (c.prec, c.rounding, c.Emin, c.Emax, c.capitals,
                                         c.clamp) == base[:6]  # fmt: skip


def _put_decimal(decimal: Any, value: tuple[Any, ...]) -> None:
    context = decimal.getcontext()
    (context.prec, context.rounding, context.Emin, context.Emax, context.capitals,
     context.clamp, traps) = value  # fmt: skip
    context.traps.update(traps)


def _put_gc(module: Any, value: tuple[bool, tuple[int, ...]]) -> None:
    (module.enable if value[0] else module.disable)()
    module.set_threshold(*value[1])


_NUMPY_PRINT = {"edgeitems": 3, "threshold": 1000, "floatmode": "maxprec", "precision": 8,
                "suppress": False, "linewidth": 75, "nanstr": "nan", "infstr": "inf",
                "sign": "-", "formatter": None, "legacy": False}  # fmt: skip
"""numpy's documented print options by default."""

_SETTINGS = (
    _Setting("decimal", "decimal's context (precision, rounding, traps)",
             lambda d: _decimal_of(d.getcontext()), _put_decimal,
             lambda d: _decimal_of(d.DefaultContext), _decimal_is),
    _Setting("numpy", "numpy's floating-point error handling (numpy.seterr)",
             lambda np: np.geterr(), lambda np, v: np.seterr(**v),
             lambda np: {"divide": "warn", "over": "warn", "under": "ignore", "invalid": "warn"}),
    _Setting("numpy", "numpy's print options", lambda np: np.get_printoptions(),
             lambda np, v: np.set_printoptions(**v),
             lambda np: {k: _NUMPY_PRINT.get(k, v) for k, v in np.get_printoptions().items()}),
    _Setting("_locale", "the locale", lambda m: m.setlocale(m.LC_ALL, None),
             lambda m, v: m.setlocale(m.LC_ALL, v)),
    _Setting("socket", "socket's default timeout", lambda m: m.getdefaulttimeout(),
             lambda m, v: m.setdefaulttimeout(v), lambda m: None),
    _Setting("gc", "the garbage collector's switch or thresholds",
             lambda m: (m.isenabled(), m.get_threshold()), _put_gc),
)  # fmt: skip
"""What a later shard would compute or write differently under (`decimal` precision,
numpy raising instead of warning, a locale's number format, file modes), if one shard's
change to it stayed with its worker."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _task_name(task: Any) -> str:
    """A task as a note names it: what it runs, and its name."""
    coro = task.get_coro()
    what = getattr(coro, "__qualname__", None) or type(coro).__name__
    return f"{task.get_name()!r} ({what})"


def _open_children() -> int | None:
    """The main thread's list of child processes (Linux), kept open to re-read."""
    try:
        path = f"/proc/self/task/{threading.get_native_id()}/children"
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (OSError, AttributeError):
        return None


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # removed under it
        return None


def _warning_filters() -> list[Any] | None:
    warnings = sys.modules.get("warnings")
    return None if warnings is None else list(warnings.filters)


def _root_logger() -> tuple[list[Any], int] | None:
    logging = sys.modules.get("logging")
    if logging is None:
        return None
    return list(logging.root.handlers), logging.root.level


def _restore_env(env: dict[bytes, bytes], base: dict[bytes, bytes], notes: list[str]) -> None:
    """Put `os.environ` (its bytes mapping `env`) back to `base`, through putenv."""
    for key in [k for k in env if k not in base]:
        os.unsetenv(key)
        del env[key]
        notes.append(f"os.environ[{_text(key)!r}] was set; restored")
    for key, value in base.items():
        now = env.get(key)
        if now != value:
            os.putenv(key, value)
            env[key] = value
            what = "removed" if now is None else "changed"
            notes.append(f"os.environ[{_text(key)!r}] was {what}; restored")


def _text(key: bytes) -> str:
    return key.decode(sys.getfilesystemencoding(), "surrogateescape")


def _open_fds() -> set[int]:
    """The open descriptors (less the one listing them takes: the lowest free)."""
    listing = _lowest_free()
    try:
        return {int(name) for name in os.listdir("/proc/self/fd")} - {listing}
    except OSError:
        return set()


def _lowest_free() -> int:
    """The lowest free descriptor number (where the next `open` lands)."""
    try:
        fd = os.dup(0)
    except OSError:  # fd 0 closed (user code did it; the guard puts it back after)
        try:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return 0
    os.close(fd)
    return fd


def _is_users(fd: int) -> bool:
    """Is `fd` open, and not one of ashard's shared-memory segments?"""
    target = _target(fd)
    return target is not None and not target.startswith("/memfd:ashard")


def _target(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _running(pid: int) -> bool:
    """Is child `pid` running (not a zombie)?"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X", b"")


COMMAND_TRIES = 20
"""How many times a child's empty command line is read again, a millisecond apart.

A child whose `exec` has closed its close-on-exec pipe (so `subprocess.Popen` returned)
has no arguments mapped yet for a few microseconds; a zombie has none for good."""


def _command(pid: int) -> str:
    for _ in range(COMMAND_TRIES):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                words = f.read().split(b"\0")
        except OSError:
            return "?"
        text = b" ".join(w for w in words if w).decode("utf-8", "replace")
        if text:
            return text[:60] + "..." if len(text) > 60 else text
        time.sleep(0.001)
    try:  # a zombie or a kernel thread: its name is all there is, bracketed as ps does
        with open(f"/proc/{pid}/comm", "rb") as f:
            return "[" + f.read().strip().decode("utf-8", "replace") + "]"
    except OSError:
        return "?"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"

"""Where workers write tables and results: a directory on this machine or in any
filesystem `pyarrow.fs` resolves (``s3://bucket/prefix``), and the one way files
appear there.

A file is written by one attempt under a temporary name, ``.{name}.{token}.tmp`` in
the directory (a leading "." hides it from pyarrow's dataset discovery), and
committed whole: locally by a rename; on an object store by one server-side copy to
its name (an upload cannot be abandoned once started - closing it, even on an error,
publishes what was written - so the partial object is only ever the hidden one). A
worker killed mid-write leaves at most a hidden temporary file, which the parent
sweeps away when the call ends (`Place.sweep`).

Used in the parent (resolve, check, sweep, read) and in workers (write, commit).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import pickle
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["Pending", "Place", "commit_all", "file_name", "temporary_path", "write_bytes"]

_writing: set[tuple[str, str]] = set()  # the directories running calls write (`Place.claim`)
_writing_lock = threading.Lock()


_OWNER_FILE = re.compile(r"ashard-owner-([0-9a-f]{12})\.lock")
_OWNED_DIR = re.compile(r"ashard-(?:results|sink)-([0-9a-f]{12})-.+")
_owner: tuple[int, str, int] | None = None  # (pid, token, the held lock's fd): `_own`
_owner_lock = threading.Lock()


def temporary_path(kind: str, make: bool) -> str:
    """A new path for a temporary directory of `kind` ("results", "sink") in the
    system's temporary directory, made now if `make`. Its name carries this process's
    owner token, whose lock file the process holds while it lives: once it is gone,
    even killed, the next process to make one removes what it left (`_sweep_orphans`)."""
    prefix = f"ashard-{kind}-{_own()}-"
    if make:
        return tempfile.mkdtemp(prefix=prefix)
    return os.path.join(tempfile.gettempdir(), prefix + secrets.token_hex(8))


def _own() -> str:
    """This process's owner token: on first use, a lock file is made (under another name,
    locked, then renamed: no process ever sees it unlocked while its owner lives), and
    what processes that are gone left behind is swept in the background."""
    global _owner
    with _owner_lock:
        if _owner is not None and _owner[0] == os.getpid():
            return _owner[1]
        token = secrets.token_hex(6)
        lock = os.path.join(tempfile.gettempdir(), f"ashard-owner-{token}.lock")
        try:
            fd = os.open(lock + ".new", os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        except OSError:  # no lock (a read-only temporary directory): nothing to sweep either
            _owner = (os.getpid(), token, -1)
            return token
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(lock + ".new", lock)
        _owner = (os.getpid(), token, fd)
    threading.Thread(target=_sweep_orphans, args=(token,), name="ashard-sweep", daemon=True).start()
    return token


def _sweep_orphans(mine: str) -> None:
    """Remove the temporary directories of owners whose lock is free (their process is
    gone), then their lock files. Blocking: a thread's."""
    tmp = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        names = os.listdir(tmp)
        for name in names:
            m = _OWNER_FILE.fullmatch(name)
            if m is None or m[1] == mine:
                continue
            try:
                fd = os.open(os.path.join(tmp, name), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue  # another sweep removed it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # its process lives
            try:
                _remove_owned(tmp, names, m[1])
                os.unlink(os.path.join(tmp, name))
            except OSError:
                pass
            finally:
                os.close(fd)


def _remove_owned(tmp: str, names: list[str], token: str) -> None:
    for name in names:
        m = _OWNED_DIR.fullmatch(name)
        if m is not None and m[1] == token:
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)  # (never a link's target)


@atexit.register
def _let_go() -> None:
    """At exit: what this process still holds goes (its results and sinks would, one by
    one, as their finalizers run), then its lock file."""
    if _owner is None or _owner[0] != os.getpid() or _owner[2] < 0:
        return
    _, token, fd = _owner
    tmp = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        _remove_owned(tmp, os.listdir(tmp), token)
        os.unlink(os.path.join(tmp, f"ashard-owner-{token}.lock"))
    with contextlib.suppress(OSError):
        os.close(fd)


def _after_fork_in_child() -> None:
    """The parent's lock is the parent's: a child holding its copy would keep it taken."""
    global _owner, _owner_lock
    if _owner is not None and _owner[2] >= 0:
        with contextlib.suppress(OSError):
            os.close(_owner[2])
    _owner, _owner_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def file_name(fmt: str, shard_id: int) -> str:
    """The committed name of a shard's file in format `fmt` ("parquet", "arrow" or
    "pickle")."""
    stem = "result" if fmt == "pickle" else "part"
    return f"{stem}-{shard_id:06d}.{fmt}"


@dataclass(frozen=True, slots=True)
class Place:
    """A directory: `root` is its path, in `fs` (a `pyarrow.fs.FileSystem`) or on this
    machine when `fs` is None."""

    root: str
    fs: Any = None

    @classmethod
    def resolve(cls, path: object, filesystem: object, what: str) -> Place:
        """The place named by `path` (a local path or a URI) inside `filesystem`."""
        if filesystem is not None:
            from pyarrow import fs as pafs  # pyarrow on first use: its import is slow

            if not isinstance(filesystem, pafs.FileSystem):
                raise TypeError(
                    f"filesystem must be a pyarrow.fs.FileSystem or None, got "
                    f"{type(filesystem).__name__}"
                )
            if not isinstance(path, str | os.PathLike):
                raise TypeError(f"{what} must be a path inside filesystem=, got {path!r}")
            root = os.fspath(path)
            if isinstance(filesystem, pafs.LocalFileSystem):
                return cls(os.path.abspath(root))
            return cls(root.rstrip("/"), filesystem)
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"{what} must be a path, a URI or None, got {type(path).__name__}")
        text = os.fspath(path)
        if isinstance(text, bytes):
            raise TypeError(f"{what} must be a str path, got bytes")
        if "://" in text and not text.startswith("file://"):
            from pyarrow import fs as pafs  # pyarrow on first use: its import is slow

            try:
                remote, root = pafs.FileSystem.from_uri(text)
            except Exception as exc:
                raise ValueError(
                    f"{what} {text!r} is not a URI pyarrow.fs resolves: {exc}"
                ) from exc
            if isinstance(remote, pafs.LocalFileSystem):
                return cls(os.path.abspath(root))
            return cls(root.rstrip("/"), remote)
        if text.startswith("file://"):
            text = text[len("file://") :]
        return cls(os.path.abspath(text))

    @property
    def local(self) -> bool:
        return self.fs is None

    def __reduce__(self) -> Any:
        if self.fs is None:
            return Place, (self.root,)

        return _remote_place, (self.root, pickle.dumps(self.fs))

    def describe(self) -> str:
        if self.fs is None:
            return self.root
        return f"{self.fs.type_name}://{self.root}"

    def path_of(self, name: str) -> str:
        return f"{self.root}/{name}" if self.fs is not None else os.path.join(self.root, name)

    # -- the parent's side ---------------------------------------------------------------

    def check_fresh(self, what: str) -> None:
        """Refuse a directory that holds anything (ashard never overwrites data), or a
        path that is a file."""
        if self.fs is None:
            if os.path.isfile(self.root):
                raise ValueError(f"{what} {self.root!r} is a file, not a directory")
            if os.path.isdir(self.root) and os.listdir(self.root):
                raise ValueError(
                    f"{what} {self.root!r} is a directory that is not empty: ashard writes "
                    "only into a new or empty directory (it never overwrites data)"
                )
            return
        from pyarrow import fs as pafs  # pyarrow on first use: its import is slow

        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.File:
            raise ValueError(f"{what} {self.describe()!r} is a file, not a directory")
        if info.type == pafs.FileType.Directory and self.names():
            raise ValueError(
                f"{what} {self.describe()!r} is a directory that is not empty: ashard writes "
                "only into a new or empty directory (it never overwrites data)"
            )

    def claim(self, what: str) -> tuple[str, str]:
        """Mark the directory as written by a running call of this process, or refuse it
        if another running call writes there: each would take the other's files for its
        own (a commit replaces a file of the same name, and a call's end sweeps the
        files it did not keep). Returns what `unclaim` takes."""
        local = self.fs is None
        key = ("", os.path.realpath(self.root)) if local else (self.fs.type_name, self.root)
        with _writing_lock:
            if key in _writing:
                raise ValueError(
                    f"{what} {self.describe()!r} is being written by another call that is "
                    "still running: two calls never write into one directory"
                )
            _writing.add(key)
        return key

    @staticmethod
    def unclaim(key: tuple[str, str]) -> None:
        """The call that claimed the directory is over (or never ran)."""
        with _writing_lock:
            _writing.discard(key)

    def check_own(self, what: str, pattern: re.Pattern[str], kept: Any) -> None:
        """Refuse a directory that holds a committed-looking file whose shard
        (`pattern`'s first group) is not in `kept`: a retry writes beside its own first
        run's files only, and its end would sweep anyone else's."""
        foreign = [name for name in self.names() if (m := pattern.fullmatch(name)) is not None
                   and int(m.group(1)) not in kept]  # fmt: skip
        if foreign:
            raise ValueError(
                f"{what} {self.describe()!r} holds {len(foreign)} file(s) the call did not "
                f"write (such as {sorted(foreign)[0]!r}): ashard never overwrites data"
            )

    def create(self) -> None:
        if self.fs is None:
            os.makedirs(self.root, exist_ok=True)
        else:
            self.fs.create_dir(self.root, recursive=True)

    def names(self) -> list[str]:
        """The names in the directory (none if it does not exist)."""
        if self.fs is None:
            try:
                return os.listdir(self.root)
            except FileNotFoundError:
                return []
        from pyarrow import fs as pafs  # pyarrow on first use: its import is slow

        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return [info.base_name for info in infos]

    def remove(self, names: Iterable[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError, OSError):
                if self.fs is None:
                    os.unlink(self.path_of(name))
                else:
                    self.fs.delete_file(self.path_of(name))

    def remove_tree(self, made_by: int | None = None) -> None:
        """Remove the directory and all in it; `made_by`: only in the process of that
        pid (a forked child's copy of a temporary result, finalized when the child
        exits, must leave its parent's files alone)."""
        if made_by is not None and made_by != os.getpid():
            return
        if self.fs is None:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                self.fs.delete_dir(self.root)

    def sweep(self, pattern: re.Pattern[str], kept: Any) -> None:
        """Remove what no committed shard owns: every hidden temporary file ashard
        wrote, and every committed-looking file whose shard (`pattern`'s first group)
        is not in `kept` (an attempt that committed but was not accepted)."""
        stray = []
        for name in self.names():
            if name.startswith(".") and name.endswith(".tmp"):
                stray.append(name)
                continue
            match = pattern.fullmatch(name)
            if match is not None and int(match.group(1)) not in kept:
                stray.append(name)
        self.remove(stray)

    def open_input(self, name: str) -> Any:
        if self.fs is None:
            return open(self.path_of(name), "rb")
        return self.fs.open_input_file(self.path_of(name))

    # -- the worker's side ---------------------------------------------------------------

    def pending(self, name: str, token: str) -> Pending:
        """A file to write `name` through, invisible until `Pending.commit`."""
        return Pending(self, name, token)


def _remote_place(root: str, fs: bytes) -> Place:
    """Unpickle a remote place; pyarrow.fs first, so its S3 cleanup runs at exit."""

    import pyarrow.fs  # noqa: F401

    return Place(root, pickle.loads(fs))


class Pending:
    """One attempt's file: `target` is what to write to (a local path, or an output
    stream of the filesystem); `commit` makes it `name` whole, `discard` nothing."""

    def __init__(self, place: Place, name: str, token: str) -> None:
        self.place = place
        self.name = name
        self._tmp = place.path_of(f".{name}.{token}.tmp")
        self._stream: Any = None
        if place.fs is None:
            self.target: Any = self._tmp
        else:
            self._stream = self.target = place.fs.open_output_stream(self._tmp)

    def commit(self) -> int:
        """Publish the file under its name; its size in bytes."""
        final = self.place.path_of(self.name)
        if self.place.fs is None:
            os.replace(self._tmp, final)
            return os.stat(final).st_size
        stream, self._stream = self._stream, None
        if stream is not None and not stream.closed:
            stream.close()
        fs = self.place.fs
        fs.move(self._tmp, final)
        return int(fs.get_file_info(final).size)

    def discard(self) -> None:
        if self.place.fs is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            return
        stream, self._stream = self._stream, None
        with contextlib.suppress(Exception):
            if stream is not None and not stream.closed:
                stream.close()
            self.place.fs.delete_file(self._tmp)


def commit_all(pending: list[Pending]) -> list[int]:
    """Commit every file in `pending` (their sizes); on a failure the rest are dropped."""
    sizes = []
    try:
        for p in pending:
            sizes.append(p.commit())
    except BaseException:
        for p in pending[len(sizes) :]:
            p.discard()
        raise
    return sizes


def write_bytes(place: Place, name: str, token: str, data: Any) -> Pending:
    """A pending file holding `data` (bytes or buffers)."""
    pending = place.pending(name, token)
    try:
        if pending._stream is not None:
            pending._stream.write(data)
        else:
            with open(pending.target, "wb") as f:
                f.write(data)
    except BaseException:
        pending.discard()
        raise
    return pending

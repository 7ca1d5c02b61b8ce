"""Frames over one Unix socketpair per worker: encoding, the reader, fd passing.

A frame is a fixed header ``<IIQ`` (magic, buffer count, payload length), one ``<Q``
length per out-of-band buffer, the pickle (protocol 5) payload, then the buffers::

    | magic | nbuf | plen | blen_1 .. blen_n | payload | buf_1 | ... | buf_n |

Frames go out with one `sendmsg` (scatter-gather, no concatenation). The reader pulls
as many bytes as are available into a reusable buffer and parses every complete frame
at once, so a burst of small results costs one wake-up. A frame too large for that
buffer is read straight into an anonymous mapping of its own, which its numpy buffers
then view without a copy.

The reader trusts no byte: a frame without the magic, with more buffers than
`MAX_BUFFERS`, larger than its `max_frame`, or whose payload does not unpickle is a
`ProtocolViolation`. A claimed size costs nothing until the bytes arrive (the mapping
is faulted in by the data itself, never zero-filled up front).

The worker uses `send_frames` and `FrameReader` on a blocking socket; the parent's
non-blocking end is `ashard._channel.Channel`. This module imports no anyio, so
a worker starts light.
"""

from __future__ import annotations

import array
import contextlib
import mmap
import os
import pickle
import socket
import struct
from collections import deque
from collections.abc import Sequence
from typing import Any

from ashard._fds import above_stdio
from ashard._protocol import ProtocolViolation
from ashard._serialize import MAX_BUFFERS, dumps, load_failure, loads

__all__ = [
    "DEFAULT_MAX_FRAME",
    "IOV_MAX",
    "ChannelClosed",
    "FrameReader",
    "RawFrame",
    "Unreadable",
    "encode",
    "encode_many",
    "frame_size",
    "send_frames",
]

MAGIC = 0x64687361  # b"ashd", little-endian
_HEAD = struct.Struct("<IIQ")
_HEAD_SIZE = _HEAD.size
_SCRATCH = 1 << 18
_BIG = 1 << 20
_MIN_READ = 1 << 12
IOV_MAX = 1024
"""Buffers one `sendmsg` takes at most (Linux's UIO_MAXIOV): a frame may hold more."""
MAX_FDS = 200
"""File descriptors sent with one message at most (the kernel's limit is 253)."""
MAX_QUEUED_FDS = 4 * MAX_FDS
"""Descriptors received and not yet claimed by a message, at most."""
_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)
_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: IntFlag arithmetic is slow per message
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_SOL_SOCKET = int(socket.SOL_SOCKET)
INLINE_DECODE_LIMIT = 1 << 19
"""Payloads larger than this are left as `RawFrame`s for the parent to unpickle in a thread."""
Buffer = bytes | bytearray | memoryview
DEFAULT_MAX_FRAME = 2 << 30
"""Bytes one frame may hold, by default (`Pool(max_message=...)`)."""


class ChannelClosed(EOFError):
    """The other end closed the channel (the worker or the parent is gone)."""


def encode(msg: Any, *, by_value: bool = False) -> list[Buffer]:
    """The frame for `msg` as a list of buffers for `sendmsg`. Messages hold no user
    objects (those travel as pre-pickled `Payload`s), so this is a plain pickle; a CALL
    carries its function and arguments itself (`by_value`: functions from `__main__`
    are pickled by value)."""
    bufs: list[pickle.PickleBuffer] = []
    if by_value:
        payload = dumps(msg, bufs)
    else:
        payload = pickle.dumps(msg, protocol=5, buffer_callback=bufs.append)
    if not bufs:
        return [_HEAD.pack(MAGIC, 0, len(payload)), payload]
    raws = [b.raw() for b in bufs]
    lens = struct.pack(f"<{len(raws)}Q", *(r.nbytes for r in raws))
    return [_HEAD.pack(MAGIC, len(raws), len(payload)) + lens, payload, *raws]


def frame_size(parts: list[Buffer]) -> int:
    """Bytes of an encoded frame (its parts are bytes or flat byte views)."""
    return sum(map(len, parts))


def offered(parts: list[Buffer], limit: int) -> tuple[list[Buffer], int]:
    """The first `limit` bytes of `parts` (in `IOV_MAX` buffers at most), for one
    `sendmsg`, and their size: `advance` takes what it sent off the whole."""
    room = limit
    for i, part in enumerate(parts):
        if i == IOV_MAX or not room:
            return parts[:i], limit - room
        size = memoryview(part).nbytes if isinstance(part, memoryview) else len(part)
        if size > room:
            return [*parts[:i], memoryview(part).cast("B")[:room]], limit
        room -= size
    return parts, limit - room


def advance(parts: list[Buffer], sent: int) -> list[Buffer]:
    """What remains of `parts` after `sent` bytes went out."""
    i = 0
    while i < len(parts):
        size = memoryview(parts[i]).nbytes
        if sent < size:
            break
        sent -= size
        i += 1
    rest = parts[i:]
    if rest and sent:
        rest[0] = memoryview(rest[0]).cast("B")[sent:]
    return rest


def send_frames(sock: socket.socket, parts: list[Buffer], fds: Sequence[int] = ()) -> None:
    """Blocking send of whole frames (worker side), `fds` with their first byte."""
    anc = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))] if fds else []
    while parts:
        sent = sock.sendmsg(parts[:IOV_MAX], anc)
        anc = []
        parts = advance(parts, sent)


class FrameReader:
    """Accumulates bytes from a socket and cuts them into decoded messages."""

    def __init__(self, *, accept_fds: bool = False, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.fds: deque[int] | None = deque() if accept_fds else None  # SCM_RIGHTS, in order
        self.max_frame = max_frame
        self._buf = bytearray(_SCRATCH)
        self._view = memoryview(self._buf)
        self._lo = 0
        self._hi = 0
        self._big: mmap.mmap | None = None
        self._big_fill = 0
        self._done: list[Any] = []  # big frames completed by `fill`, not yet handed out
        self.drained = False  # the last `fill` got less than it asked for: likely no more

    def fill(self, sock: socket.socket, flags: int = 0, limit: int = 1 << 62) -> int:
        """One `recv_into` of `limit` bytes at most; returns the byte count (0 at end of
        stream). May raise `BlockingIOError` on a non-blocking socket."""
        if self._big is not None:
            if self._big_fill < len(self._big):
                want = min(len(self._big) - self._big_fill, limit)
                into = memoryview(self._big)[self._big_fill : self._big_fill + want]
                n = self._recv(sock, into, flags)
                self._big_fill += n
                self.drained = n < want
                return n
            self._done.append(_decode_whole(self._big))  # complete: back to the scratch
            self._big = None
        if len(self._buf) - self._hi < _MIN_READ:
            self._compact()
            if len(self._buf) - self._hi < _MIN_READ:  # full of unread messages: grow
                self._compact(self._hi + _SCRATCH)
        want = min(len(self._buf) - self._hi, limit)
        n = self._recv(sock, self._view[self._hi : self._hi + want], flags)
        self._hi += n
        self.drained = n < want
        return n

    @property
    def partial(self) -> bool:
        """Is part of a frame buffered, waiting for the rest?"""
        return self._big is not None or self._hi > self._lo

    def _recv(self, sock: socket.socket, into: memoryview, flags: int) -> int:
        if self.fds is None:
            return sock.recv_into(into, 0, flags)
        n, ancdata, msg_flags, _ = sock.recvmsg_into([into], _ANC_SPACE, flags)
        for level, kind, data in ancdata:
            if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                self.fds.extend(above_stdio(fd) for fd in fds)
        if msg_flags & _CTRUNC or len(self.fds) > MAX_QUEUED_FDS:
            self.close_fds()
            raise ProtocolViolation("more file descriptors than any message claims")
        return n

    def take_fds(self, count: int) -> list[int]:
        """The next `count` descriptors received, in order (a message claims them)."""
        fds = self.fds
        if fds is None or len(fds) < count:
            raise ProtocolViolation(f"a message that claims {count} file descriptors not sent")
        return [fds.popleft() for _ in range(count)]

    def close_fds(self) -> None:
        """Close every descriptor received and not claimed."""
        while self.fds:
            with contextlib.suppress(OSError):
                os.close(self.fds.popleft())

    def messages(self) -> list[Any]:
        """Every complete message received so far."""
        out, self._done = self._done, []
        if self._big is not None:
            if self._big_fill < len(self._big):
                return out
            out.append(_decode_whole(self._big))
            self._big = None
        while True:
            msg = self._next()
            if msg is _INCOMPLETE:
                return out
            out.append(msg)

    def _next(self) -> Any:
        avail = self._hi - self._lo
        if avail < _HEAD_SIZE:
            return _INCOMPLETE
        magic, nbuf, plen = _HEAD.unpack_from(self._buf, self._lo)
        if magic != MAGIC or nbuf > MAX_BUFFERS:
            raise ProtocolViolation(
                "bytes that are not a frame" if magic != MAGIC else f"a frame of {nbuf} buffers"
            )
        hlen = _HEAD_SIZE + 8 * nbuf
        if avail < hlen:
            return _INCOMPLETE
        total = hlen + plen
        if nbuf:
            total += sum(struct.unpack_from(f"<{nbuf}Q", self._buf, self._lo + _HEAD_SIZE))
        if total > self.max_frame:
            raise ProtocolViolation(
                f"a frame of {total:,} bytes, over the limit of {self.max_frame:,}"
            )
        if avail < total:
            self._reserve(total)
            return _INCOMPLETE
        lo = self._lo
        self._lo += total
        if nbuf or plen > INLINE_DECODE_LIMIT:
            return _decode_whole(bytearray(self._view[lo : lo + total]))
        with self._view[lo + hlen : lo + hlen + plen] as payload:
            try:
                return loads(payload)
            except (Exception, SystemExit) as exc:
                return Unreadable(load_failure(exc))

    def _reserve(self, total: int) -> None:
        """Make room for a frame of `total` bytes whose start is at `_lo`."""
        if total > _BIG:
            have = self._hi - self._lo
            self._big = mmap.mmap(-1, total)  # lazily zeroed: costs what arrives
            self._big[:have] = self._view[self._lo : self._hi]
            self._big_fill = have
            self._lo = self._hi = 0
        elif total > len(self._buf) - self._lo:
            self._compact(total)

    def _compact(self, need: int = 0) -> None:
        have = self._hi - self._lo
        size = max(len(self._buf), need)
        if size != len(self._buf):
            self._view.release()
            new = bytearray(size)
            new[:have] = self._buf[self._lo : self._hi]
            self._buf = new
            self._view = memoryview(self._buf)
        elif self._lo:
            self._view[:have] = self._view[self._lo : self._hi]
        self._lo, self._hi = 0, have


_INCOMPLETE = object()


class RawFrame:
    """A frame left undecoded because its payload is large: `decode` it off the loop."""

    __slots__ = ("frame",)

    def __init__(self, frame: bytearray | mmap.mmap) -> None:
        self.frame = frame

    def decode(self) -> Any:
        return _decode_frame(self.frame)


def _decode_whole(frame: bytearray | mmap.mmap) -> Any:
    """A message from a frame that owns its memory, or a `RawFrame` if it is large."""
    if _HEAD.unpack_from(frame, 0)[2] > INLINE_DECODE_LIMIT:
        return RawFrame(frame)
    return _decode_frame(frame)


def _decode_frame(frame: bytearray | mmap.mmap) -> Any:
    """Decode a frame that owns its memory: out-of-band buffers view it, uncopied."""
    view = memoryview(frame)
    _, nbuf, plen = _HEAD.unpack_from(frame, 0)
    pos = _HEAD_SIZE + 8 * nbuf
    blens = struct.unpack_from(f"<{nbuf}Q", frame, _HEAD_SIZE)
    payload = view[pos : pos + plen]
    pos += plen
    buffers: list[memoryview] = []
    for n in blens:
        buffers.append(view[pos : pos + n])
        pos += n
    return _loads_message(payload, buffers)


class Unreadable:
    """Stands in for a message whose frame was whole but whose pickle does not load:
    the parent takes it for a protocol violation, a worker answers it (a CALL whose
    function or arguments cannot be unpickled there)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _loads_message(payload: memoryview, buffers: Sequence[memoryview] = ()) -> Any:
    try:
        return loads(payload, buffers)
    except (Exception, SystemExit) as exc:
        return Unreadable(load_failure(exc))


def encode_many(msgs: Sequence[Any]) -> list[Buffer]:
    """Frames for several messages, for one `send`."""
    parts: list[Buffer] = []
    for m in msgs:
        parts.extend(encode(m))
    return parts

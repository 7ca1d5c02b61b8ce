"""The parent's end of a worker socketpair: non-blocking, awaited through anyio, so it
works under asyncio, uvloop and trio alike, and belongs to no particular event loop.

What arrives is untrusted (`ashard._framing`): besides the reader's checks, a frame
that stays incomplete for `FRAME_STALL_SECONDS` — a worker never pauses inside one of
its own frames — is a `ProtocolViolation`, so garbage that claims more bytes than
will ever come cannot hang a call.

While it waits for a worker, an asyncio loop is woken every `WAKE_SECONDS`: a signal
handler that only schedules a callback (Jupyter's interrupt, which cancels the cell)
is otherwise served only when the worker next speaks — seconds or minutes later.
"""

from __future__ import annotations

import array
import contextlib
import select
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.lowlevel

from ashard._framing import (
    DEFAULT_MAX_FRAME,
    Buffer,
    ChannelClosed,
    FrameReader,
    advance,
    offered,
)
from ashard._protocol import ProtocolViolation

__all__ = ["FRAME_STALL_SECONDS", "Channel"]

_EITHER = select.EPOLLIN | select.EPOLLOUT if hasattr(select, "epoll") else 0
"""What a full socket's sender waits for, in one epoll wait (Linux): room or an answer."""

FRAME_STALL_SECONDS = 10.0
"""Seconds a frame may stay incomplete with nothing more arriving."""
READ_BYTES = 128 << 10
"""Bytes read (and decoded, when they make small messages) in one step at most: the rest
is read after the event loop had its turn."""
WAKE_SECONDS = 0.25
"""How often an asyncio loop waiting on workers wakes, to serve what signals scheduled."""
SEND_BYTES = 512 << 10
"""Bytes one `sendmsg` is offered at most. A worker that reads as fast as the parent
writes keeps the socket from ever filling, so one call offered a whole large frame
would copy all of it before it returned (a 200 MB argument: a quarter of a second
with the event loop stopped)."""
YIELD_SECONDS = 0.0002
"""A reader whose messages are always there already (a fast worker) still lets the event
loop have its turn this often: `receive` then yields before it reads. The same as the
budgets of decoding and delivering, so that one step of a job's drive (receive, deliver,
send more) stays well under a millisecond."""


class Channel:
    """The parent's end of a worker socketpair: non-blocking, awaited through anyio."""

    def __init__(self, sock: socket.socket, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._reader = FrameReader(accept_fds=True, max_frame=max_frame)
        self._eof = False
        self._early: list[Any] = []  # messages read while a send was waiting
        self._backlog: list[Buffer] = []  # the rest of a `post` the socket did not take
        self._either: Any = None  # `_wait_either`'s epoll set (Linux)
        self._yielded = 0.0  # time.monotonic() when this reader last let the loop run
        self.broken = False

    def fileno(self) -> int:
        return self._sock.fileno()

    async def send(self, parts: list[Buffer], fds: Sequence[int] = ()) -> None:
        """Send whole frames, and `fds` with their first byte (SCM_RIGHTS); if cancelled
        halfway the channel is marked `broken`."""
        if self._backlog:
            parts, self._backlog = self._backlog + parts, []
        parts, anc, full = self._send_some(parts, _rights(fds))
        if parts:
            await self._send_rest(parts, anc, full)

    def _send_some(
        self, parts: list[Buffer], anc: list[Any]
    ) -> tuple[list[Buffer], list[Any], bool]:
        """What the socket did not take of `parts` (all of them when it is full), the
        fds still to go with the next byte, and whether the socket is full (it took
        less than it was offered); `ChannelClosed` if the socket is gone."""
        offer, size = offered(parts, SEND_BYTES)
        try:
            sent = self._sock.sendmsg(offer, anc)
        except BlockingIOError:
            return parts, anc, True
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc
        return advance(parts, sent), [], sent < size

    def post(self, parts: list[Buffer]) -> bool:
        """Send small control frames now, from synchronous code, if no send is under way;
        what the socket does not take goes out first with the next `send`."""
        if self.broken or self._backlog or self._sock.fileno() < 0:
            return False
        try:
            self._backlog = advance(parts, self._sock.sendmsg(offered(parts, SEND_BYTES)[0]))
        except BlockingIOError:
            self._backlog = list(parts)
        except OSError:
            return False
        return True

    async def _send_rest(self, parts: list[Buffer], anc: list[Any], full: bool) -> None:
        """Send the rest of a send: after the loop's turn while the socket takes what it
        is offered, else once it takes more (reading meanwhile)."""
        self.broken = True
        while parts:
            if full:
                await self._wait_writable_draining()
            else:
                await anyio.lowlevel.checkpoint()
            parts, anc, full = self._send_some(parts, anc)
        self.broken = False

    async def _wait_writable_draining(self) -> None:
        """Wait until the socket takes more bytes, reading what arrives meanwhile.

        A worker blocked writing its results reads nothing, so a parent that only
        waited to write while the worker only waited to write would deadlock.
        """
        if self._eof:
            await anyio.wait_writable(self._sock)
            return
        if _EITHER:
            readable = await self._wait_either()
        else:
            readable = await self._wait_both_ways()
        if readable:
            with contextlib.suppress(ChannelClosed):  # the next send or receive reports it
                self._early.extend(self._read_available())

    async def _wait_either(self) -> bool:
        """Wait until the socket is writable or readable, with one wait: on an epoll set
        of the socket for both (made once). True if it is readable (or hung up)."""
        if self._either is None:
            self._either = select.epoll()
            self._either.register(self._sock.fileno(), _EITHER)
        await anyio.wait_readable(self._either.fileno())
        return any(events & ~select.EPOLLOUT for _, events in self._either.poll(0))

    async def _wait_both_ways(self) -> bool:
        """`_wait_either` without epoll: a task waits for the socket to be readable
        while this one waits for it to be writable."""
        readable = False
        async with anyio.create_task_group() as tg:

            async def wait_readable() -> None:
                nonlocal readable
                await anyio.wait_readable(self._sock)
                readable = True
                tg.cancel_scope.cancel()

            tg.start_soon(wait_readable)
            await anyio.wait_writable(self._sock)
            tg.cancel_scope.cancel()
        return readable

    async def receive(self, *, wait_first: bool = False, wake: int | None = None) -> list[Any]:
        """At least one message; raises `ChannelClosed` once the stream has ended.

        `wait_first` skips the read attempt that would only find the socket empty
        (right after sending a request, say). `wake`: a descriptor readable whenever
        the socket is, and at other times too (`WorkerOutput.fileno`), waited on instead
        of the socket: then what came after one wait is returned, maybe nothing.
        """
        waited = False
        if wait_first and not self._early:
            await self._wait_readable(wake)
            waited = True
        elif self._early or time.monotonic() - self._yielded >= YIELD_SECONDS:
            await self.checkpoint()  # what the last step left: after the loop's turn
        while True:
            msgs = self.receive_nowait()
            if msgs or (waited and wake is not None):
                return msgs
            await self._wait_readable(wake)
            waited = True

    async def checkpoint(self) -> None:
        """Let the event loop have its turn, as this channel's reader: the next
        `receive` counts its time from here."""
        await anyio.lowlevel.checkpoint()
        self._yielded = time.monotonic()

    async def _wait_readable(self, wake: int | None = None) -> None:
        if self._sock.fileno() < 0:
            raise ChannelClosed("worker channel closed")
        ticker = _ticking()
        try:
            if not self._reader.partial:  # (within a frame: only the socket has a say)
                await anyio.wait_readable(self._sock if wake is None else wake)
                self._yielded = time.monotonic()
                return
            with anyio.move_on_after(FRAME_STALL_SECONDS):
                await anyio.wait_readable(self._sock)
                self._yielded = time.monotonic()
                return
        except (anyio.ClosedResourceError, OSError, ValueError) as exc:  # ValueError: fd -1
            raise ChannelClosed("worker channel closed") from exc
        finally:
            if ticker is not None:
                ticker.waiting -= 1
        raise ProtocolViolation(
            f"a frame stayed incomplete for {FRAME_STALL_SECONDS:.0f} s with nothing more coming"
        )

    def unread(self, msgs: list[Any]) -> None:
        """Put `msgs` back, to be received first next time."""
        self._early[:0] = msgs

    def receive_nowait(self) -> list[Any]:
        """Whatever complete messages can be read without waiting (maybe none)."""
        if self._early:
            msgs, self._early = self._early, []
            return msgs
        return self._read_available()

    def _read_available(self) -> list[Any]:
        if self._eof or self._sock.fileno() < 0:
            raise ChannelClosed("worker channel closed")
        msgs: list[Any] = []
        budget = READ_BYTES
        while True:
            try:
                n = self._reader.fill(self._sock, limit=budget)
            except BlockingIOError:
                break
            except OSError as exc:  # ECONNRESET when the worker died mid-write
                n = 0
                reason = str(exc)
            else:
                reason = "worker channel closed"
            msgs.extend(self._reader.messages())
            if n == 0:
                self._eof = True
                if msgs:
                    return msgs
                raise ChannelClosed(reason)
            if self._reader.drained and msgs:
                break  # a short read emptied the socket; waiting again will say if not
            budget -= n
            if budget <= 0:
                break  # the rest after the loop's turn: `receive` waits, ready at once
        return msgs

    def take_fds(self, count: int) -> list[int]:
        """The next `count` descriptors the worker sent (its message claims them)."""
        return self._reader.take_fds(count)

    def shut(self) -> None:
        """End the stream from this side (from any thread): its reader gets what was
        sent, then EOF, whoever else holds the other end."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def disown(self) -> None:
        """Close this process's descriptor of the socket and nothing else (a forked
        child's copy: the parent keeps using its own)."""
        self.broken = True
        self._close_either()
        with contextlib.suppress(OSError):
            self._sock.close()

    def close(self) -> None:
        """Close the socket (waking any task waiting on it) and any descriptor the
        worker sent that no message claimed."""
        self._reader.close_fds()
        if self._sock.fileno() < 0:
            return
        with contextlib.suppress(Exception):  # no event loop at interpreter exit
            anyio.notify_closing(self._sock)
            if self._either is not None:
                anyio.notify_closing(self._either.fileno())
        self._close_either()
        self._sock.close()

    def _close_either(self) -> None:
        if self._either is not None:
            self._either.close()


class _Ticker:
    """Wakes one asyncio loop every `WAKE_SECONDS` while any channel waits on it."""

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.waiting = 0
        self.armed = False

    def tick(self) -> None:
        self.armed = self.waiting > 0
        if self.armed:
            self.loop.call_later(WAKE_SECONDS, self.tick)


_last_ticker: _Ticker | None = None


def _ticking() -> _Ticker | None:
    """The ticker of the running asyncio loop, counting one more wait and armed; None
    under any other event loop."""
    global _last_ticker
    asyncio = sys.modules.get("asyncio")
    loop = asyncio._get_running_loop() if asyncio is not None else None
    if loop is None:
        return None
    ticker = _last_ticker
    if ticker is None or ticker.loop is not loop:
        ticker = _last_ticker = _Ticker(loop)
    ticker.waiting += 1
    if not ticker.armed:
        ticker.armed = True
        loop.call_later(WAKE_SECONDS, ticker.tick)
    return ticker


def _rights(fds: Sequence[int]) -> list[Any]:
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]

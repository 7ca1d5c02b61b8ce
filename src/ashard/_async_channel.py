"""The parent's end of a worker socketpair: non-blocking, awaited through anyio, so it
works under asyncio, uvloop and trio alike, and belongs to no particular event loop."""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import anyio

from ashard._channel import Buffer, ChannelClosed, FrameReader, advance

__all__ = ["Channel"]


class Channel:
    """The parent's end of a worker socketpair: non-blocking, awaited through anyio."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._reader = FrameReader()
        self._eof = False
        self.broken = False

    def fileno(self) -> int:
        return self._sock.fileno()

    async def send(self, parts: list[Buffer]) -> None:
        """Send whole frames; if cancelled halfway the channel is marked `broken`."""
        try:
            parts = advance(parts, self._sock.sendmsg(parts))
        except BlockingIOError:
            pass
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc
        if parts:
            await self._send_rest(parts)

    async def _send_rest(self, parts: list[Buffer]) -> None:
        self.broken = True
        while parts:
            await anyio.wait_writable(self._sock)
            try:
                parts = advance(parts, self._sock.sendmsg(parts))
            except BlockingIOError:
                continue
            except OSError as exc:
                raise ChannelClosed(str(exc)) from exc
        self.broken = False

    async def receive(self) -> list[Any]:
        """At least one message; raises `ChannelClosed` once the stream has ended."""
        while True:
            msgs = self.receive_nowait()
            if msgs:
                return msgs
            try:
                await anyio.wait_readable(self._sock)
            except (anyio.ClosedResourceError, OSError) as exc:
                raise ChannelClosed("worker channel closed") from exc

    def receive_nowait(self) -> list[Any]:
        """Whatever complete messages can be read without waiting (maybe none)."""
        if self._eof or self._sock.fileno() < 0:
            raise ChannelClosed("worker channel closed")
        while True:
            try:
                n = self._reader.fill(self._sock)
            except BlockingIOError:
                break
            except OSError as exc:  # ECONNRESET when the worker died mid-write
                self._eof = True
                if msgs := self._reader.messages():
                    return msgs
                raise ChannelClosed(str(exc)) from exc
            if n == 0:
                self._eof = True
                if msgs := self._reader.messages():
                    return msgs
                raise ChannelClosed("worker channel closed")
        return self._reader.messages()

    def close(self) -> None:
        """Close the socket (waking any task waiting on it)."""
        if self._sock.fileno() < 0:
            return
        with contextlib.suppress(Exception):  # no event loop at interpreter exit
            anyio.notify_closing(self._sock)
        self._sock.close()

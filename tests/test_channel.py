"""The frame reader on a real socketpair, read the way the parent drains a worker: many
reads in a row before the messages are taken out."""

from __future__ import annotations

import select
import socket
import threading
from typing import Any

import anyio
import pytest

import ashard
import workloads
from ashard._framing import FrameReader, RawFrame, encode_many, send_frames


def _drain(msgs: list[Any]) -> tuple[list[Any], int]:
    """Send `msgs` from a thread; read them back calling `messages()` only when the
    socket runs dry. Returns the messages and how many reads returned 0 bytes."""
    a, b = socket.socketpair()
    with a, b:
        sender = threading.Thread(target=send_frames, args=(a, encode_many(msgs)))
        sender.start()
        reader = FrameReader()
        got: list[Any] = []
        zero_reads = 0
        while len(got) < len(msgs) and zero_reads == 0:
            try:
                while True:
                    zero_reads += reader.fill(b, socket.MSG_DONTWAIT) == 0
                    if zero_reads:
                        break
            except BlockingIOError:
                pass
            got.extend(reader.messages())
            if len(got) < len(msgs) and not select.select([b], [], [], 10)[0]:
                break  # nothing more arrives: the reader lost track of a frame
    sender.join()  # closing the sockets unblocks a sender that was left waiting
    return [m.decode() if isinstance(m, RawFrame) else m for m in got], zero_reads


def test_many_unread_small_messages_never_read_as_end_of_stream() -> None:
    msgs = [("m", i, bytes(3000)) for i in range(400)]  # ~1.2 MB of small frames
    got, zero_reads = _drain(msgs)
    assert zero_reads == 0
    assert [m[1] for m in got] == list(range(400))


def test_a_completed_big_frame_never_reads_as_end_of_stream_and_order_is_kept() -> None:
    msgs = [("small", 0), ("big", bytes(3 << 20)), ("small", 1), ("big", b"x" * (2 << 20))]
    got, zero_reads = _drain(msgs)
    assert zero_reads == 0
    assert [m[0] for m in got] == ["small", "big", "small", "big"]
    assert got[1][1] == bytes(3 << 20) and got[3][1] == b"x" * (2 << 20)


@pytest.mark.anyio
async def test_messages_with_more_buffers_than_one_sendmsg_takes() -> None:
    """A chunk of many array items, and a batch of many table results, each hold more
    out-of-band buffers than the kernel takes in one sendmsg (1024): both go through."""
    import numpy as np

    with anyio.fail_after(60):
        async with ashard.Pool(1) as pool:
            items = [np.arange(3) + i for i in range(3000)]
            assert await pool.map(len, items, chunk_size=3000) == [3] * 3000
            values = await pool.map(workloads.identity, items, chunk_size=3000)
            assert all(np.array_equal(v, i) for v, i in zip(values, items, strict=True))
            assert pool.stats.crashed == 0


def test_a_report_split_in_two_keeps_every_position_in_its_place() -> None:
    from ashard._protocol import Result, split_result

    report = Result(
        seq=3, k0=10, n=6, values=(b"", []), errors=[(1, 1, "a"), (4, 2, "b")],
        elapsed=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], final=True, writes=[(5, "X")], rss=99,
        commits=None, arrays=[(2, "f8", (3,), False)], peak=7,
    )  # fmt: skip
    head, tail = split_result(report, 4)
    assert (head.k0, head.n, head.final, head.rss, head.peak) == (10, 4, False, 0, 0)
    assert (tail.k0, tail.n, tail.final, tail.rss, tail.peak) == (14, 2, True, 99, 7)
    assert head.errors == [(1, 1, "a")] and tail.errors == [(0, 2, "b")]
    assert head.elapsed == [0.1, 0.2, 0.3, 0.4] and tail.elapsed == [0.5, 0.6]
    assert head.writes == [] and tail.writes == [(1, "X")]
    assert head.arrays == [(2, "f8", (3,), False)] and tail.arrays == []
    assert head.commits is None and tail.commits is None
    total = split_result(report._replace(elapsed=1.2), 3)
    assert [part.elapsed for part in total] == pytest.approx([0.6, 0.6])


class _Recording(socket.socket):
    """A real socket that notes how many bytes each `sendmsg` was offered."""

    offers: list[int]

    def sendmsg(self, buffers: Any, *args: Any) -> int:
        self.offers.append(sum(memoryview(b).nbytes for b in buffers))
        return super().sendmsg(buffers, *args)


@pytest.mark.anyio
async def test_a_large_frame_goes_out_in_bounded_sendmsgs_with_the_loop_running_between() -> None:
    """A reader as fast as the writer keeps the socket from filling: one `sendmsg`
    offered a whole 64 MB frame would copy it all with the event loop stopped. Each is
    offered `SEND_BYTES` at most, and every byte arrives in order."""
    import numpy as np

    from ashard._channel import SEND_BYTES, Channel
    from ashard._framing import encode

    a, b = socket.socketpair()
    sock = _Recording(fileno=a.detach())
    sock.offers = []
    data = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8)
    frame = encode(("big", data))
    received = bytearray()

    def read_all() -> None:
        while chunk := b.recv(1 << 20):
            received.extend(chunk)

    reader = threading.Thread(target=read_all)
    reader.start()
    try:
        with anyio.fail_after(60):
            await Channel(sock).send(frame)
    finally:
        sock.close()
        reader.join()
        b.close()
    assert len(sock.offers) >= (64 << 20) // SEND_BYTES
    assert max(sock.offers) <= SEND_BYTES
    assert bytes(received) == b"".join(bytes(memoryview(p).cast("B")) for p in frame)

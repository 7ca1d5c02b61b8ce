"""A worker's reports as the parent reads them, and what it prints.

RESULT messages are checked (`ashard._protocol.parse_result`), their values unpickled -
off the event loop when they are large - and array results that came as sealed
segments put in their places (`ashard._shm.adopt_result`). A message that is not a
well-formed result, or an array result that does not fit, is a `ProtocolViolation`
(the worker is lost; nothing it sent is trusted). Values that pickled in the worker but
do not unpickle here come as the exception that says so, for the job to fail the
positions they belong to. `pump_output` writes a worker's lines while it runs.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from ashard._framing import INLINE_DECODE_LIMIT, RawFrame
from ashard._protocol import Payload, ProtocolViolation, Result, parse_result
from ashard._serialize import load_failure, loads
from ashard._shm import adopt_result

if TYPE_CHECKING:
    from ashard._handle import WorkerHandle

__all__ = ["DECODE_SECONDS", "Report", "pump_output", "receive", "receive_until"]

DECODE_SECONDS = 0.0002
"""Time one `receive` spends unpickling values on the loop, at most (it always takes one
report): what is left is received next time, after the event loop had its turn."""

Report = tuple[Result, "list[Any] | Exception"]
"""A parsed RESULT and its values, or the error that unpickling them raised."""


async def receive(
    w: WorkerHandle, *, wait_first: bool = False, wake: int | None = None
) -> list[Report]:
    """The reports `w` sent, checked; large frames and values are unpickled off the
    event loop. A message that is not a well-formed result is a `ProtocolViolation`.
    Cancelled, it returns nothing or everything it read: the messages it took off the
    channel are never lost (the unpickling threads are shielded). `wake`: as in
    `Channel.receive` (then it may return no report)."""
    reports: list[Report] = []
    msgs = await w.channel.receive(wait_first=wait_first, wake=wake)
    t0 = time.monotonic()
    for i, msg in enumerate(msgs):
        if reports and time.monotonic() - t0 >= DECODE_SECONDS:
            w.channel.unread(msgs[i:])  # for the next step, after the loop's turn
            break
        if isinstance(msg, RawFrame):
            with anyio.CancelScope(shield=True):  # taken off the channel: never lost
                msg = await anyio.to_thread.run_sync(msg.decode)
        report = parse_result(msg)
        data, buffers = report.values
        fds = w.channel.take_fds(len(report.arrays)) if report.arrays else None
        try:
            if not buffers and type(data) is bytes:  # small values, in the message: at once
                values = _values_of(report)
            elif _packed_bytes(report.values) > INLINE_DECODE_LIMIT:
                with anyio.CancelScope(shield=True):
                    values = await anyio.to_thread.run_sync(_values_of, report)
            else:
                values = _values_of(report)
        except BaseException:
            _close_all(fds)
            raise
        if fds is not None:
            values = _adopt_arrays(report, values, fds)
        reports.append((report, values))
    return reports


async def receive_until(
    w: WorkerHandle, until: float | None, *, wait_first: bool = False, wake: int | None = None
) -> list[Report] | None:
    """`receive`, or None if nothing came by `until` (monotonic; None: no limit)."""
    if until is None:  # no cancel scope: it costs ~20 us, a quarter of a call's round trip
        return await receive(w, wait_first=wait_first, wake=wake)
    with anyio.move_on_after(max(until - time.monotonic(), 0.0)):
        return await receive(w, wait_first=wait_first, wake=wake)
    return None


def _adopt_arrays(report: Result, values: list[Any] | Exception, fds: list[int]) -> Any:
    """Put the arrays that came as segments in their places among `values`."""
    assert report.arrays is not None
    if isinstance(values, Exception):
        _close_all(fds)
        return values
    for i, (k, dtype, shape, fortran) in enumerate(report.arrays):
        if values[k] is not None:
            _close_all(fds[i:])
            raise ProtocolViolation("an array result in the place of another value")
        try:
            values[k] = adopt_result(fds[i], dtype, shape, fortran)
        except (ValueError, TypeError, OSError) as exc:
            _close_all(fds[i + 1 :])
            raise ProtocolViolation(str(exc)) from exc
    return values


def _close_all(fds: list[int] | None) -> None:
    for fd in fds or ():
        with contextlib.suppress(OSError):
            os.close(fd)


def _values_of(report: Result) -> list[Any] | Exception:
    data, buffers = report.values
    try:
        values = loads(data, buffers)
    except (Exception, SystemExit) as exc:  # they pickled in the worker, do not unpickle here
        return load_failure(exc)
    if type(values) is not list or len(values) != report.n:
        raise ProtocolViolation("a result whose values do not match its count")
    return values


def _packed_bytes(payload: Payload) -> int:
    data, buffers = payload
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    return int(size) + sum(int(b.nbytes) for b in buffers)


async def pump_output(w: WorkerHandle, scope: anyio.CancelScope) -> None:
    """Write what `w` prints while it runs a job's shards, as it comes (in the job's
    task group, so in the caller's context), until `scope` is cancelled."""
    with scope:
        async with anyio.create_task_group() as tg:
            for fd in w.output.open_fds():
                tg.start_soon(_pump_fd, w, fd)


async def _pump_fd(w: WorkerHandle, fd: int) -> None:
    output = w.output
    while not output.closed and fd in output.open_fds():
        try:
            await anyio.wait_readable(fd)
        except (OSError, ValueError, anyio.ClosedResourceError, anyio.BusyResourceError):
            return
        output.drain()

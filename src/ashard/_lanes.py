"""One-shot `call`s on the local backend, several outstanding per worker when short.

A lane is one worker serving calls. While the pool has an idle worker (or room to start
one), each call gets a worker of its own, as a job's chunk would. When every worker is
busy, a short call joins the lane of a worker whose calls are short (its last call and
the one it runs now under `SHORT` seconds), up to `DEPTH` outstanding: it is sent at
once, the worker runs the lane's calls in order and answers each in order. Calls queued
this way share the system calls and wake-ups that dominate a short call's cost, and the
worker never waits for the caller between them. Long calls never queue behind one
another on a worker: they wait for a free worker, in the pool's fair queue.

All calls of a pool are one tenant of the worker set (one lease per lane), so jobs and
calls share the workers fairly; a waiting call is handed a free slot of a lane
(`WorkerSet.pass_slot`) before anyone new may join it.

No task is started for a lane. The first waiting call reads the worker's answers for
all (the *reader*) and hands each to its call; when its own came, the next waiting call
reads. A call's timeout counts from when the worker started it (the answer before it
came). A cancelled call that has not started is dropped by the worker (UNCALL); one that
runs is interrupted, and killed with its worker after `CANCEL_GRACE` (the calls queued
behind it never ran: they are sent again, at no attempt's cost). When a lane's worker
dies or hangs, the call it ran is lost (a crash or a timeout) and the others are sent
again. Each call after the first on a lane is preceded by a MARK, so the worker's output
is split between the calls exactly (`WorkerOutput.take`) and written in each call's
caller's context, whichever task reads it (a call carries a copy of that context). The
reader also wakes when the worker's stdout or stderr has something to read, and reads
it, so a worker is never left blocked on a full pipe; the lines of the call that runs
are written as they come.
"""

from __future__ import annotations

import contextvars
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from ashard._framing import Buffer, ChannelClosed, encode, encode_many
from ashard._health import PROFILES
from ashard._output import ended, marker, write_taken
from ashard._protocol import MARK, SEGMENTS, UNCALL, UNREADABLE_CALL, ProtocolViolation
from ashard._reports import Report, receive_until

if TYPE_CHECKING:
    from ashard._handle import WorkerHandle
    from ashard._health import HealthPolicy
    from ashard._shm import Segment
    from ashard._workers import WorkerSet

__all__ = ["CANCEL_GRACE", "DEPTH", "KILL_GRACE", "SHORT", "CallLanes", "Hung", "LaneLost"]

CANCEL_GRACE = 1.0
"""Seconds a worker gets to stop cancelled work before it is killed."""
KILL_GRACE = 0.5
"""Past `timeout`, seconds the parent waits for the worker's own timer before killing."""
DEPTH = 4
"""Calls outstanding on one worker at most."""
SHORT = 0.001
"""Seconds: a lane takes more calls only while its calls take less than this."""


class Hung(Exception):
    """The worker said nothing for longer than the timeout allows."""


@dataclass(eq=False, slots=True)
class _Pending:
    """One call on a lane: sent (whole), answered, or given up by its caller."""

    seq: int
    timeout: float | None
    sent: bool = False
    ran: bool = False  # it may have run when its lane was lost
    answer: Report | None = None
    output: list[tuple[str, bytes]] = field(default_factory=list)
    wake: anyio.Event | None = None
    abandoned: bool = False  # its caller left: whoever resolves it frees its slot
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    """Its caller's: what it prints is written there, whichever task reads it."""


@dataclass(eq=False, slots=True)
class _Lane:
    worker: WorkerHandle
    slots: int = 0  # calls that hold a place on it (sent or about to be)
    outstanding: deque[_Pending] = field(default_factory=deque)  # in the order sent
    reading: bool = False
    sending: bool = False
    outbox: list[Buffer] = field(default_factory=list)
    outbox_fds: list[int] = field(default_factory=list)  # sent with the outbox's first byte
    lost: Exception | None = None
    head_since: float = 0.0  # when the oldest outstanding call started
    last_took: float = SHORT  # seconds the last answered call ran (unknown: not short)


@dataclass(frozen=True, slots=True)
class LaneLost:
    """A call whose worker was lost: `ran` False when it never started (it is sent
    again at no cost), else it crashed or (`Hung`) ran past its timeout."""

    why: Exception
    ran: bool
    worker: WorkerHandle


class CallLanes:
    """The calls of one pool, on its worker set."""

    def __init__(self, workers: WorkerSet, policy: HealthPolicy) -> None:
        self.workers = workers
        self.policy = policy
        self._lanes: dict[WorkerHandle, _Lane] = {}
        self._last_took = SHORT  # the last call's run time, for a new lane
        self.deepest = 0  # the most calls outstanding on one worker so far
        workers.slot_unused = self._slot_unused

    async def call_once(
        self,
        seq: int,
        parts: list[Buffer],
        timeout: float | None,
        segments: Sequence[Segment] = (),
    ) -> Report | LaneLost:
        """Send one call on a lane, after the `segments` it maps that its worker lacks
        (`SharedCall`), and wait for its answer (or the lane's loss)."""
        lane = self._joinable()
        if lane is None:
            w = await self.workers.acquire(self)
            lane = self._lanes.get(w)
            if lane is None:  # a worker of its own
                lane = self._lanes[w] = _Lane(w, slots=1, last_took=self._last_took)
        if lane.lost is not None:
            self._free_slot(lane)
            return LaneLost(lane.lost, False, lane.worker)
        w = lane.worker
        p = _Pending(seq, timeout)
        msgs = w.take_control() if w.has_control else []
        new = w.hand_segments(segments) if segments else []
        if new:
            msgs.append((SEGMENTS, [seg.id for seg in new]))
        if lane.outstanding:
            msgs.append((MARK, marker(seq)))
        else:
            lane.head_since = time.monotonic()
        lane.outstanding.append(p)
        self.deepest = max(self.deepest, len(lane.outstanding))
        w.hand(None, 1)
        try:
            await self._send(lane, encode_many(msgs) + parts if msgs else parts,
                             [seg.fd for seg in new])  # fmt: skip
            await self._wait(lane, p)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._leave(lane, p)
            raise
        if p.answer is None:
            self._free_slot(lane)
            assert lane.lost is not None
            return LaneLost(lane.lost, p.ran, w)
        write_taken(p.output)
        self._free_slot(lane)
        return p.answer

    def busy(self) -> list[WorkerHandle]:
        """The workers with a call outstanding."""
        return [lane.worker for lane in self._lanes.values() if lane.outstanding]

    def outstanding(self) -> int:
        """Calls sent and not answered, on all workers."""
        return sum(len(lane.outstanding) for lane in self._lanes.values())

    # -- joining ------------------------------------------------------------------------

    def _joinable(self) -> _Lane | None:
        """The least loaded lane with room whose calls are short, when no worker is
        free and nobody waits for one."""
        if not self._lanes or self.workers.waiting() or self.workers.can_lease_now():
            return None
        best: _Lane | None = None
        now = time.monotonic()
        for lane in self._lanes.values():
            if self._has_room(lane, now) and (best is None or lane.slots < best.slots):
                best = lane
        if best is not None:
            best.slots += 1
        return best

    def _has_room(self, lane: _Lane, now: float) -> bool:
        w = lane.worker
        limit = self.policy.max_tasks
        return (
            lane.slots < DEPTH
            and lane.lost is None
            and lane.last_took < SHORT
            and (not lane.outstanding or now - lane.head_since < SHORT)
            and w.recycle_reason is None
            and not w.paused
            and (limit is None or w.tasks + lane.slots - len(lane.outstanding) < limit)
        )

    def _slot_unused(self, w: WorkerHandle) -> None:
        self._free_slot(self._lanes[w])

    def _free_slot(self, lane: _Lane) -> None:
        """A call is done with the lane: hand its place to a call waiting for a worker,
        or, when no call is left, give the worker back."""
        lane.slots -= 1
        if lane.lost is None and self.workers.waiting() and not self.workers.should_yield(self):
            now = time.monotonic()
            while self._has_room(lane, now) and self.workers.pass_slot(lane.worker, self):
                lane.slots += 1
        if lane.slots > 0:
            return
        del self._lanes[lane.worker]
        if lane.lost is None:
            self.workers.release(lane.worker, self)

    # -- sending ------------------------------------------------------------------------

    async def _send(self, lane: _Lane, parts: list[Buffer], fds: Sequence[int] = ()) -> None:
        """Send `parts` on the lane's channel after what waits in its outbox (`fds` with
        them, passed in order). What other tasks send meanwhile waits in the outbox and
        goes with the next write, in order. A send cancelled before its first byte went
        puts its frames and fds back, first in line."""
        lane.outbox += parts
        lane.outbox_fds += fds
        if lane.sending:
            return
        lane.sending = True
        try:
            while lane.outbox:
                parts, lane.outbox = lane.outbox, []
                fds, lane.outbox_fds = lane.outbox_fds, []
                batch = [q for q in lane.outstanding if not q.sent]
                try:
                    await lane.worker.channel.send(parts, fds)
                except BaseException:
                    if not lane.worker.channel.broken:
                        lane.outbox[:0] = parts
                        lane.outbox_fds[:0] = fds
                    raise
                for q in batch:
                    q.sent = True
        except ChannelClosed as exc:
            with anyio.CancelScope(shield=True):
                await self._lose(lane, exc)
        finally:
            lane.sending = False

    # -- answers ------------------------------------------------------------------------

    async def _wait(self, lane: _Lane, p: _Pending) -> None:
        """Until p is answered or its lane lost: read for every call, or be woken."""
        while p.answer is None and lane.lost is None:
            if lane.reading:
                p.wake = anyio.Event()
                await p.wake.wait()
                continue
            await self._read_for(lane, p)
            if not self._pass_reading(lane):
                with anyio.CancelScope(shield=True):
                    await self._settle(lane)

    async def _read_for(
        self, lane: _Lane, p: _Pending | None, deadline: float | None = None
    ) -> None:
        """As the lane's reader, hand out answers until p's came (None: until none is
        outstanding), or `deadline`; a lost worker is buried."""
        lane.reading = True
        try:
            await self._read(lane, p, deadline)
        except (ChannelClosed, Hung, ProtocolViolation) as exc:
            lane.reading = False
            with anyio.CancelScope(shield=True):
                await self._lose(lane, exc)
        finally:
            lane.reading = False

    async def _read(self, lane: _Lane, p: _Pending | None, deadline: float | None) -> None:
        w = lane.worker
        while lane.outstanding and lane.lost is None and (p is None or p.answer is None):
            head = lane.outstanding[0]
            until = None if head.timeout is None else lane.head_since + head.timeout + KILL_GRACE
            if deadline is not None and (until is None or deadline < until):
                until = deadline
            reports = await receive_until(w, until, wait_first=True, wake=w.output.fileno())
            if reports is None:
                if until == deadline:
                    return
                raise Hung
            if w.output.pull() and lane.outstanding:  # the running call's lines, as they come
                head = lane.outstanding[0]
                head.context.run(write_taken, w.output.take_lines(head.seq))
            for report in reports:
                self._hand(lane, report)

    def _hand(self, lane: _Lane, answer: Report) -> None:
        """Give an answer to the oldest outstanding call of the lane."""
        w, report = lane.worker, answer[0]
        head = lane.outstanding[0] if lane.outstanding else None
        if head is None or report.seq not in (head.seq, UNREADABLE_CALL) or not report.final:
            raise ProtocolViolation("an answer to a call it was not asked")
        lane.outstanding.popleft()
        head.answer = answer
        now = time.monotonic()
        took = report.elapsed[0] if type(report.elapsed) is list and report.elapsed else None
        lane.last_took = self._last_took = now - lane.head_since if took is None else took
        lane.head_since = now
        head.output = w.output.take(head.seq)
        left = report.hygiene is not None and report.hygiene[1]
        w.finished_work(report.rss, self.policy, PROFILES["default"], left)
        self.workers.gauged(w)
        self.workers.heard_back(0)
        if head.wake is not None:
            head.wake.set()
        if head.abandoned:  # its caller left: its output goes where the caller's went
            head.context.run(write_taken, head.output)
            self._free_slot(lane)

    def _pass_reading(self, lane: _Lane) -> bool:
        """The reader leaves: wake the next call that waits, to read in its turn. False
        if the lane owes answers that no caller is left to read."""
        if lane.reading or lane.lost is not None or not lane.outstanding:
            return True
        live = [q for q in lane.outstanding if not q.abandoned]
        for q in live:
            if q.wake is not None:
                q.wake.set()
                break
        return bool(live)  # one that does not wait yet reads when it comes to

    async def _settle(self, lane: _Lane) -> None:
        """Read the answers of calls whose callers left (each was told to stop); kill
        the worker if they do not come within `CANCEL_GRACE`."""
        await self._read_for(lane, None, time.monotonic() + CANCEL_GRACE)
        if lane.outstanding and lane.lost is None:
            await self._lose(lane, ChannelClosed("cancelled calls did not stop"), kill=True)

    # -- cancellation and loss ----------------------------------------------------------

    async def _leave(self, lane: _Lane, p: _Pending) -> None:
        """p's caller was cancelled: drop the call, interrupting it if it runs; kill
        the worker if it does not stop within `CANCEL_GRACE`. Someone is left to read
        what the lane still owes."""
        if p.answer is not None or lane.lost is not None:
            write_taken(p.output)  # answered (or lost) as its caller was cancelled
            self._free_slot(lane)
            return
        p.abandoned = True
        w = lane.worker
        if w.channel.broken:  # its send was cancelled halfway
            await self._lose(lane, ChannelClosed("a call's send was cancelled"))
            return
        await self._send(lane, encode((UNCALL, p.seq)))
        if lane.lost is not None:
            return
        w.interrupt()  # it reads the UNCALL at once, whether the call runs or waits
        if p.answer is None and lane.outstanding[0] is p:  # it runs: it must stop
            if lane.reading:
                p.wake = anyio.Event()
                with anyio.move_on_after(CANCEL_GRACE):
                    await p.wake.wait()
            else:
                await self._read_for(lane, p, time.monotonic() + CANCEL_GRACE)
            if p.answer is None and lane.lost is None:
                await self._lose(lane, ChannelClosed("a cancelled call did not stop"), kill=True)
                return
        if not self._pass_reading(lane):
            await self._settle(lane)

    async def _lose(self, lane: _Lane, why: Exception, *, kill: bool = False) -> None:
        """The lane's worker died, hung or misbehaved (or, `kill`, would not stop): it
        is buried; the call it ran is lost, the others never ran."""
        if lane.lost is not None:
            return
        lane.lost = why
        w = lane.worker
        pending = list(lane.outstanding)
        lane.outstanding.clear()
        w.output.pull()  # what it printed goes to its callers, not to whoever reads
        for q in pending:
            q.context.run(write_taken, ended(w.output.take(q.seq)))
        for i, q in enumerate(pending):
            q.ran = i == 0 and q.sent
        if kill:
            await w.kill()
        else:
            violation = str(why) if isinstance(why, ProtocolViolation) else None
            await self.workers.bury(w, hung=isinstance(why, Hung), violation=violation)
        self.workers.discard(w, self)
        for q in pending:
            if q.wake is not None:
                q.wake.set()
            if q.abandoned:
                self._free_slot(lane)
        if not kill:
            await self.workers.replenish()

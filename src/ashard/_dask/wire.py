"""What crosses between the caller and a node: the call's record, the version check,
and the typed reports that tell the caller what happened to its work.

A chunk's task returns a list of `Report`: what the node's scheduler told the relay,
in order (`ashard._dask.node._Relay` builds them), replayed into the caller's job by
`ashard._dask.backend`. A `call`'s task returns one `Outcome`. Each kind of report is
a `NamedTuple` of its own, matched by its type: a record pickles as small as the
tuple it is, and no string names what it means. Both ends run the same ashard
version (the plugin checks it), so a record's class is the same on both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from ashard import _version

if TYPE_CHECKING:
    from ashard._health import EndReason
    from ashard._options import CallOptions
    from ashard._outcomes import Loss
    from ashard._protocol import Commit, Result, SinkRef

__all__ = [
    "Aborted",
    "Delivered",
    "Lost",
    "NodeJob",
    "Outcome",
    "Printed",
    "Raised",
    "Report",
    "Returned",
    "Unreadable",
    "Unsendable",
    "WorkerSeen",
    "check_version",
    "version",
]


@dataclass(frozen=True)
class NodeJob:
    """What a node needs to run chunks of one call (pickled once per call)."""

    kind: int
    fn: Any
    opts: CallOptions
    layout: Any
    sys_path: list[str]
    out: dict[str, SinkRef]  # table sinks, as specs
    results: SinkRef | None  # where results="table" / "disk" go


def version() -> str:
    """The ashard version this process runs (read when asked: a test may change it)."""
    return _version.__version__


def check_version(theirs: str, where: str) -> None:
    """Refuse to host a pool whose caller runs another ashard version than this node."""
    mine = version()
    if mine != theirs:
        raise RuntimeError(
            f"ashard {mine} is installed on the Dask worker {where}, the caller "
            f"runs {theirs}: install the same version on every machine"
        )


# -- a chunk's reports (`ashard._job.Job`'s methods, one record each) --------------------


class Delivered(NamedTuple):
    """Positions ``k0 ..`` of the chunk ran on worker `pid` (`Job.deliver`)."""

    k0: int
    values: list[Any]
    errors: list[Any]
    elapsed: Any
    final: bool
    pid: int
    writes: list[tuple[int, str]] | None
    commits: list[Commit] | None


class Unreadable(NamedTuple):
    """Worker `pid` reported positions whose values do not unpickle (`Job.deliver_unreadable`)."""

    report: Result
    pid: int
    exc: Exception


class Unsendable(NamedTuple):
    """The chunk's items could not be pickled for a worker (`Job.unsendable`)."""

    exc: Exception


class Lost(NamedTuple):
    """The worker that held the chunk died or hung (`Job.worker_lost`)."""

    loss: Loss
    timed_out: bool


class WorkerSeen(NamedTuple):
    """A worker process that ran part of the chunk, for the job's diagnostics."""

    pid: int
    peak_rss: int
    end_reason: EndReason | None
    alive: bool


class Aborted(NamedTuple):
    """What ends the whole call (`Job.abort`): the node cannot run it."""

    exc: BaseException


class Printed(NamedTuple):
    """Whole lines a worker wrote to its stream `name` ("stdout" or "stderr")."""

    name: str
    text: str


Report = Delivered | Unreadable | Unsendable | Lost | WorkerSeen | Aborted | Printed


# -- a call's outcome ------------------------------------------------------------------


class Returned(NamedTuple):
    """The call returned `value`; `lines` are what its worker printed meanwhile."""

    value: Any
    lines: list[tuple[str, str]]


class Raised(NamedTuple):
    """The call raised `exc` (itself where it pickles); `traceback` is the worker's."""

    exc: BaseException
    traceback: str | None
    lines: list[tuple[str, str]]


Outcome = Returned | Raised

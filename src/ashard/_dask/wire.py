"""What crosses between the caller and a node: the version check and the typed reports
that tell the caller what happened to its work. (What to run goes as the call's
`ashard._backend.JobWork`, its borrow and outputs left out: they travel on their own.)

A chunk's task returns a list of `Report`: what the node's scheduler told the relay,
in order (`ashard._dask.node._Relay` builds them), replayed into the caller's job by
`ashard._dask.backend`. A `call`'s task returns one `Outcome`. Each kind of report is
a `NamedTuple` of its own, matched by its type: a record pickles as small as the
tuple it is, and no string names what it means. Both ends run the same ashard
version (the plugin checks it), so a record's class is the same on both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from ashard import _version

if TYPE_CHECKING:
    from ashard._health import EndReason
    from ashard._outcomes import Loss
    from ashard._protocol import Result

__all__ = [
    "Aborted",
    "Delivered",
    "Lost",
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
    """Worker `pid` reported positions of the chunk (`Job.deliver`): `report` as the
    node's scheduler parsed it (its pickled values left out), `values` unpickled."""

    report: Result
    values: list[Any]
    pid: int


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

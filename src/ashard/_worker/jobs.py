"""A registered job as the worker holds it (`JobContext`), made from the parent's
`JobSpec` by `load_job`: its function and borrowed objects unpickled, its shared arrays
mapped, its outputs opened."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from ashard._asyncfn import is_async_fn
from ashard._fds import StdioGuard
from ashard._protocol import ArrayRef, IpcRef, JobSpec, SinkRef
from ashard._serialize import LoadError, load_failure, unpack
from ashard._worker.segments import Audited, Segments
from ashard.shards import Shards

if TYPE_CHECKING:
    from ashard._worker.outputs import ResultWriter, TableWriter

__all__ = ["JobContext", "load_error", "load_job"]


class JobContext(NamedTuple):
    """A registered job, as the worker holds it: its function and keyword arguments,
    timeout, seed and layout; `audit`: arrays borrowed under cow="audit" or "allow"
    (remapped after a shard wrote to them); `outputs`: table sinks in out= and the
    results store (results=), which follow each shard;
    `stores_results`: values go to the results store (the parent gets None and makes
    the ref); `read_only`: names of arrays borrowed read-only, for the hint on a
    failed write; `writes_shared`: out= holds buffers, shared memory a shard writes in
    place. (Not a dataclass: `dataclasses` would add ~5 ms to a worker's start.)"""

    kind: int
    fn: Callable[..., Any]
    kwargs: dict[str, Any]
    timeout: float | None
    seed: int | None
    layout: Shards | None
    audit: list[Audited]
    outputs: list[TableWriter | ResultWriter]
    stores_results: bool
    read_only: tuple[str, ...]
    peak: bool = False  # measure each chunk's peak memory growth (`JobSpec.peak`)
    is_async: bool = False  # fn is an ``async def``: it runs on the worker's loop
    concurrency: int = 1  # async shards in flight at once (`shard_concurrency`)
    writes_shared: bool = False


def load_job(spec: JobSpec, segments: Segments, stdio: StdioGuard) -> JobContext | LoadError:
    """Unpickle a job's function and borrowed objects, map its shared arrays, open
    its outputs; the error, if that fails."""
    if spec.sys_path != sys.path:
        sys.path[:] = spec.sys_path
    kwargs: dict[str, Any] = {}
    audit: list[Audited] = []
    outputs: list[Any] = []
    what = "fn"
    try:
        fn = segments.unpack(spec.fn)
        for name, value in (spec.borrow or {}).items():
            what = f"borrow[{name!r}]"
            if isinstance(value, ArrayRef) and value.mode in ("audit", "cow") and value.size:
                audit.append(Audited(name, segments, value))
                kwargs[name] = audit[-1].array
            elif isinstance(value, ArrayRef):
                kwargs[name] = segments.view(value)
            elif isinstance(value, IpcRef):
                kwargs[name] = segments.table(value)
            elif isinstance(value, SinkRef):
                outputs.append(_writer(name, value, stdio))
                kwargs[name] = outputs[-1]
            else:
                kwargs[name] = unpack(value)
        if spec.results is not None:
            what = "results="
            outputs.append(_writer("", spec.results, stdio))
    except (Exception, SystemExit) as exc:
        return load_error(what, load_failure(exc))
    read_only = tuple(
        name
        for name, v in (spec.borrow or {}).items()
        if isinstance(v, ArrayRef) and v.mode == "ro"
    )
    writes_shared = any(
        isinstance(v, ArrayRef) and v.mode == "rw" for v in (spec.borrow or {}).values()
    )
    return JobContext(
        spec.kind, fn, kwargs, spec.timeout, spec.seed, spec.layout, audit, outputs,
        spec.results is not None, read_only, spec.peak, is_async_fn(fn), spec.concurrency,
        writes_shared,
    )  # fmt: skip


def _writer(name: str, ref: SinkRef, stdio: StdioGuard) -> Any:
    """The writer of a table sink (`name`, in out=) or of the results store ("")."""
    # on demand: outputs imports ashard._places, whose dataclasses a worker start skips
    from ashard._worker import outputs

    outputs.guard = stdio
    return outputs.TableWriter(name, ref) if ref.kind == "sink" else outputs.ResultWriter(name, ref)


def load_error(what: str, exc: Exception) -> LoadError:
    """`exc`, raised while unpickling `what` in the worker, as an error that says so."""
    return LoadError(what, exc, "the worker")

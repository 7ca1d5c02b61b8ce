"""Shards: how the items of a job are split into units of work.

`Shards` is a cheap, picklable description (item count, block size, strategy); a
`Shard` is built on demand from it, in the parent and again in the worker, so a job
never ships a list of index arrays.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Shard", "Shards", "shards"]

Strategy = Literal["contiguous", "strided"]
_STRATEGIES = ("contiguous", "strided")
SHARDS_PER_WORKER = 4


class LazyItems:
    """A shard's items, not yet taken from where they lie: a `Shard` made in the caller
    (of a streamed result, of a failure) holds them so, and takes them `whole` when
    they are first read, so that no one step of the caller's loop copies a long shard's
    items that nobody reads."""

    __slots__ = ()

    def whole(self) -> Any:
        """The items, as slicing the call's sequence gives them."""
        raise NotImplementedError


class Shard:
    """One unit of work handed to `fn`.

    `id` is the 0-based position in `Shards`; `idx` the global item indices (a `range`
    for contiguous shards, an int ndarray for strided ones); `items` the matching slice
    of the input sequence, if one was given (else None); `rng` a
    `numpy.random.Generator`: derived from ``(seed, id)`` when the call has a `seed`,
    else from fresh entropy (made when first used); `attempt` numbers this run of the
    shard from 1: it counts every earlier run, charged against `max_retries` or not (a
    run that may have happened on a worker that died before reporting counts too), so
    no two runs see the same number. Immutable.
    """

    __module__ = "ashard"
    __slots__ = ("_items", "_rng", "_seed", "attempt", "id", "idx")

    id: int
    # `range` or an int ndarray: typed Any so that code written for either (``idx.start``
    # for contiguous shards, fancy indexing with strided ones) type-checks as it is.
    idx: Any
    _items: Any
    attempt: int
    _rng: np.random.Generator | None
    _seed: int | None

    def __init__(
        self,
        id: int,
        idx: range | np.ndarray[Any, Any],
        items: Any = None,
        rng: np.random.Generator | None = None,
        attempt: int = 1,
        seed: int | None = None,
    ) -> None:
        """`seed`: the call's, from which `rng` is derived (when first used) if no `rng`
        is given."""
        set_ = object.__setattr__
        set_(self, "id", id)
        set_(self, "idx", idx)
        set_(self, "_items", items)
        set_(self, "_rng", rng)
        set_(self, "attempt", attempt)
        set_(self, "_seed", seed)

    @property
    def rng(self) -> np.random.Generator:
        """This shard's random generator (seeded by the call's `seed`, if it has one),
        made when first used: making one costs about 20 us, and the caller's copies of a
        shard (in a `ShardDone`, a `ShardError`) must not import numpy on its loop."""
        rng: np.random.Generator | None = self._rng
        if rng is None:
            if self._seed is not None:
                from ashard._seeding import shard_rng

                rng = shard_rng(self._seed, self.id)
            else:
                import numpy as np  # on first use: a worker and `import ashard` start without it

                rng = np.random.default_rng()
            object.__setattr__(self, "_rng", rng)
        return rng

    @property
    def items(self) -> Any:
        """The shard's slice of the call's sequence, if it was given one (else None);
        the caller's copy of a long one is made when first read (`LazyItems`)."""
        items = self._items
        if isinstance(items, LazyItems):
            items = items.whole()
            object.__setattr__(self, "_items", items)
        return items

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a Shard is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"a Shard is immutable: cannot delete {name!r}")

    def __reduce__(self) -> Any:
        return Shard, (self.id, self.idx, self.items, self._rng, self.attempt, self._seed)

    def __len__(self) -> int:
        return len(self.idx)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Shard):
            return NotImplemented
        return (
            self.id == other.id
            and self.attempt == other.attempt
            and _same(self.idx, other.idx)
            and self.items == other.items
        )

    __hash__ = None  # type: ignore[assignment]  # unhashable (it has __eq__), said for mypy

    def __repr__(self) -> str:
        idx = self.idx
        where = repr(idx) if isinstance(idx, range) else f"{len(idx)} strided indices"
        return f"Shard(id={self.id}, idx={where}, attempt={self.attempt})"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, range) and isinstance(b, range):
        return a == b
    import numpy as np  # numpy on first use: a worker and `import ashard` start without it

    return bool(np.array_equal(a, b))


class Shards(Sequence[Shard]):
    """A sequence of `Shard` over `n` items, made by `ashard.shards()`."""

    __module__ = "ashard"

    __slots__ = ("_count", "block_size", "n", "strategy")

    def __init__(self, n: int, block_size: int, strategy: Strategy) -> None:
        self.n = n
        self.block_size = block_size
        self.strategy = strategy
        self._count = math.ceil(n / block_size)

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, i: int) -> Shard: ...
    @overload
    def __getitem__(self, i: slice) -> list[Shard]: ...
    def __getitem__(self, i: int | slice) -> Shard | list[Shard]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self._count))]
        k = i + self._count if i < 0 else i
        if not 0 <= k < self._count:
            raise IndexError(f"shard index {i} out of range for {self._count} shards")
        return Shard(k, self.indices(k))

    def __iter__(self) -> Iterator[Shard]:
        return (Shard(k, self.indices(k)) for k in range(self._count))

    def __repr__(self) -> str:
        return (
            f"Shards(n={self.n}, block_size={self.block_size}, "
            f"strategy={self.strategy!r}, count={self._count})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Shards):
            return NotImplemented
        return (self.n, self.block_size, self.strategy) == (
            other.n,
            other.block_size,
            other.strategy,
        )

    def __hash__(self) -> int:
        return hash((self.n, self.block_size, self.strategy))

    def __reduce__(self) -> tuple[Any, ...]:
        return (Shards, (self.n, self.block_size, self.strategy))

    def indices(self, k: int) -> range | np.ndarray[Any, Any]:
        """The global item indices of shard `k`."""
        if self.strategy == "contiguous":
            start = k * self.block_size
            return range(start, min(start + self.block_size, self.n))
        import numpy as np  # numpy on first use: a worker and `import ashard` start without it

        return np.arange(k, self.n, self._count)

    def where(self, k: int) -> slice:
        """Where shard `k`'s items lie in a sequence of `n`."""
        if self.strategy == "contiguous":
            start = k * self.block_size
            return slice(start, min(start + self.block_size, self.n))
        return slice(k, self.n, self._count)

    def items_of(self, seq: Any, k: int) -> Any:
        """The items of shard `k` taken from `seq` (slicing when the sequence allows it)."""
        return _take(seq, self.where(k))


def _take(seq: Any, sl: slice) -> Any:
    try:
        return seq[sl]
    except (TypeError, KeyError, IndexError):
        return [seq[i] for i in range(*sl.indices(len(seq)))]


def shards(
    n: int,
    *,
    block_size: int | None = None,
    workers: int | None = None,
    strategy: Strategy = "contiguous",
) -> Shards:
    """Split `n` items into shards.

    `strategy="contiguous"` gives blocks of consecutive indices; `"strided"` gives shard
    k the indices k, k+S, k+2S, ... for S shards. Without `block_size`, one is chosen so
    that each of `workers` (default: the CPU count) gets several shards.
    """
    _check_positive_int("n", n)
    if block_size is not None:
        _check_positive_int("block_size", block_size)
    if workers is not None:
        _check_positive_int("workers", workers)
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be 'contiguous' or 'strided', got {strategy!r}")
    if block_size is None:
        w = workers or os.cpu_count() or 1
        block_size = max(1, math.ceil(n / (w * SHARDS_PER_WORKER)))
    return Shards(n, block_size, strategy)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")

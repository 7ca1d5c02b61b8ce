"""What a call's positions are, apart from where they stand: the shards of a layout
(their items cut from a sequence, if the call gave one) or the items of an iterable,
read lazily and kept only while their position may run again. The job
(`ashard._job`) takes new positions from here and asks for a position's items and the
`Shard` its `fn` saw; which positions are queued, in flight or resolved is the job's.

A list given as the shards or the items is copied as the call starts (`copy_input`):
the caller's other tasks run while the call does, and one that changes, sorts, clears
or refills the list would otherwise have the call map some positions as they were and
others as they became, or drop some. Other sequences are read as their positions are
taken; one whose length changes fails the call.
"""

from __future__ import annotations

import gc
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence, Sized
from itertools import chain, islice
from typing import Any, overload

import anyio
import anyio.lowlevel

from ashard._serialize import SETTLED, drawn, undrawn
from ashard.shards import LazyItems, Shard, Shards

__all__ = [
    "Cut",
    "ItemPositions",
    "ListCopy",
    "Positions",
    "ShardPositions",
    "drawn_args",
    "holds_its_items",
    "make_old",
]

COPY_STEP = 1 << 14
"""A list given as a call's input is copied at once up to this many items (0.1-0.3 ms);
a longer one in pieces of this many, one per step of the caller's loop."""
CUT_FROM = 1 << 14
"""Shards of this many items or more, from the call's copy of a list (or from a tuple),
are cut from it as they are sent, a piece per loop step (`Cut`)."""


class ListCopy(Sequence[Any]):
    """A long list's copy, made in `pieces` of `COPY_STEP` items; indexed and sliced as
    the list was."""

    __slots__ = ("_n", "_pieces")

    def __init__(self, pieces: list[list[Any]], n: int) -> None:
        self._pieces = pieces
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[Any]:
        return chain.from_iterable(self._pieces)

    def covering(self, where: slice) -> tuple[Sequence[Any], slice]:
        """A copy of the pieces `where` (a slice of it) crosses, and where it lies in
        them: what a `Cut` keeps, so that it holds its own pieces, not all of them, and
        does not see this copy emptied (`let_go`)."""
        start, stop, step = where.indices(self._n)
        if step != 1 or start >= stop:
            return self, where
        first, last = start // COPY_STEP, (stop - 1) // COPY_STEP
        base = first * COPY_STEP
        n = min(self._n, (last + 1) * COPY_STEP) - base
        return ListCopy(self._pieces[first : last + 1], n), slice(start - base, stop - base)

    async def let_go(self) -> None:
        """Empty it, a piece per loop step: freeing a 5M-item copy at once holds the
        loop 10 ms. Nothing may read it after (a `Cut` holds its own pieces)."""
        self._n = 0
        pieces = self._pieces
        while pieces:
            pieces.pop()
            await anyio.lowlevel.checkpoint()

    @overload
    def __getitem__(self, key: int) -> Any: ...
    @overload
    def __getitem__(self, key: slice) -> list[Any]: ...
    def __getitem__(self, key: int | slice) -> Any:
        if not isinstance(key, slice):
            k = key + self._n if key < 0 else key
            if not 0 <= k < self._n:
                raise IndexError("list index out of range")
            return self._pieces[k // COPY_STEP][k % COPY_STEP]
        start, stop, step = key.indices(self._n)
        p, offset = divmod(start, COPY_STEP)
        if step == 1 and start < stop <= (p + 1) * COPY_STEP:  # within one piece: most
            return self._pieces[p][offset : offset + stop - start]
        if step < 0:
            return [self[k] for k in range(start, stop, step)]
        out: list[Any] = []
        while start < stop:  # a slice of each piece it crosses
            p, offset = divmod(start, COPY_STEP)
            piece, end = self._pieces[p], min(stop - p * COPY_STEP, COPY_STEP)
            part = (
                piece if step == 1 and offset == 0 and end == COPY_STEP else piece[offset:end:step]
            )
            out += part
            start += len(part) * step
        return out


def _copied_now(items: Any) -> tuple[Any, list[Any] | None]:
    """`items` as a call takes it - a copy if it is a list short enough to copy in one
    step - and the long list still to copy (`copy_input`), if any."""
    if type(items) is not list:
        return items, None
    if len(items) <= COPY_STEP:
        return items.copy(), None
    return items, items


async def _copied(items: list[Any], what: str) -> ListCopy:
    """A copy of the long list `items`, a piece per loop step."""
    n = len(items)
    pieces: list[list[Any]] = [[] for _ in range(0, n, COPY_STEP)]
    make_old(pieces)  # made old empty: the collector's young collections never walk them
    for i, start in enumerate(range(0, n, COPY_STEP)):
        if i:
            await anyio.lowlevel.checkpoint()
        pieces[i] += items[start : start + COPY_STEP]
    if len(items) != n:
        raise RuntimeError(
            f"{what}: the list changed length ({n} to {len(items)}) while the call copied "
            "it, as it starts; change it only once the call has begun, or pass a copy"
        )
    return ListCopy(pieces, n)


def make_old(young: list[Any]) -> None:
    """Move `young` (a list just made, still short: it is filled once it is old) to the
    garbage collector's oldest generation.

    A collection walks every slot of every list in the generations it collects. A list
    made young and grown to a million slots before the next young collection (a call's
    own objects die as fast as they are made, so that can be a long while) cost that
    collection 8-12 ms on the loop; the young copy of a 5M-item list, 50 ms. In the
    oldest generation only a full collection walks it. A user who turned the collector
    off (`gc.disable()`, or a threshold of 0) is left alone: the young generations may
    then hold any number of objects, and nothing walks the list anyway."""
    if gc.isenabled() and gc.get_threshold()[0] > 0:
        gc.collect(1)  # what survives generations 0 and 1 moves to the oldest


class Cut(LazyItems):
    """A long shard's items, left where they are (the pieces of the call's copy of its
    list, or a tuple: neither changes) until they are sent: the scheduler pickles them
    a `piece` at a time, a piece per loop step; a `Shard` in the caller takes them
    `whole` if they are read."""

    __slots__ = ("_at", "source")

    def __init__(self, source: Sequence[Any], where: slice) -> None:
        if type(source) is ListCopy:
            source, where = source.covering(where)
        self.source = source
        self._at = range(len(source))[where]

    def __len__(self) -> int:
        return len(self._at)

    def piece(self, start: int, stop: int) -> Sequence[Any]:
        """Items ``start .. stop-1`` of the shard's."""
        at = self._at[start:stop]
        return self.source[at.start : at.stop : at.step]

    def whole(self) -> Sequence[Any]:
        """The shard's items, as slicing the input gives them (a list, or a tuple)."""
        return self.piece(0, len(self._at))

    def __reduce__(self) -> tuple[Any, ...]:  # sent whole where the scheduler does not cut
        whole = self.whole()
        return type(whole), (whole,)


class Positions:
    """New positions in order (`take`), and what each one is."""

    total: int | None  # None: an iterable without a length, not read to its end yet
    next_pos = 0  # the first position not taken yet
    exhausted = False  # every position has been taken
    has_items = True  # chunks carry their positions' items
    argument = "items"  # the argument the input was given as

    def __init__(self) -> None:
        self._again: dict[int, Any] = {}  # the items of positions that will run again
        self._uncopied: list[Any] | None = None  # a long list the call still has to copy
        self._copy: ListCopy | None = None  # and its copy, once made

    async def copy_input(self) -> None:
        """Before any position is taken: copy a long list given as the input, a piece
        per loop step (shorter ones were copied when the call was made)."""
        if self._uncopied is not None:
            self._copy = await _copied(self._uncopied, self.argument)
            self._adopt(self._copy)
            self._uncopied = None

    async def let_go(self) -> None:
        """The call is over, and nothing will read its input again: the long list's
        copy goes, a piece per loop step."""
        copy, self._copy = self._copy, None
        if copy is not None:
            with anyio.CancelScope(shield=True):  # the call's result is ready: not lost
                await copy.let_go()

    def _adopt(self, copy: ListCopy) -> None:
        """The input from now on is `copy` (of the list given)."""
        raise NotImplementedError

    @property
    def left(self) -> int | None:
        """How many positions are still to be taken (None: not known)."""
        return None if self.total is None else self.total - self.next_pos

    def take(self, size: int) -> tuple[int, Sequence[Any] | None]:
        """Up to `size` new positions: (how many, their items). Raises what the caller's
        iterable raised."""
        raise NotImplementedError

    def keep(self, pos: int, item: Any) -> None:
        """`pos` (whose item is `item`) will run again."""
        self._again[pos] = item

    def item_at(self, pos: int) -> Any:
        """The item of `pos`, which is about to run again (as `keep` was given it)."""
        return self._again.pop(pos)

    def shard_at(self, pos: int, attempt: int, item: Any = None) -> Shard:
        """The `Shard` `fn` saw on run `attempt` of `pos` (`item`: its item, if known)."""
        raise NotImplementedError


class ShardPositions(Positions):
    """The shards of `layout`; `sequence`: the items they are cut from, each shard's
    once (a run again gets the items its first run got, and nothing reads the sequence
    after its shard was taken); `seed`: each shard's `rng`. `restrict` narrows them to
    some positions (`retry_failed`)."""

    def __init__(self, layout: Shards, sequence: Sequence[Any] | None, seed: int | None) -> None:
        super().__init__()
        self.layout = layout
        self.sequence, self._uncopied = _copied_now(sequence)
        self.seed = seed
        self.total = len(layout)
        self.exhausted = not self.total
        self.has_items = sequence is not None
        self._only: Sequence[int] | None = None  # sorted; None: every position
        self._at = 0  # into `_only`

    argument = "shards"

    def _adopt(self, copy: ListCopy) -> None:
        self.sequence = copy

    def restrict(self, only: Sequence[int]) -> None:
        """Take only these positions (sorted, none taken yet), consecutive ones together."""
        self._only = only
        self._at = 0
        self._moved()

    def _moved(self) -> None:
        only = self._only
        assert only is not None
        self.exhausted = self._at >= len(only)
        self.next_pos = len(self.layout) if self.exhausted else only[self._at]

    @property
    def left(self) -> int:
        if self._only is None:
            return len(self.layout) - self.next_pos
        return len(self._only) - self._at

    def take(self, size: int) -> tuple[int, Sequence[Any] | None]:
        assert self._uncopied is None, "copy_input() comes before take()"
        first = self.next_pos
        if self._only is None:
            count = min(size, len(self.layout) - first)
            self.next_pos += count
            self.exhausted = self.next_pos >= len(self.layout)
        else:
            only, at = self._only, self._at
            count = 0 if self.exhausted or size <= 0 else 1
            while count < size and at + count < len(only) and only[at + count] == first + count:
                count += 1
            self._at += count
            self._moved()
        items = None
        sequence = self.sequence
        if sequence is not None:
            if len(sequence) != self.layout.n:
                raise RuntimeError(
                    f"shards: the sequence changed length ({self.layout.n} to "
                    f"{len(sequence)}) during the call, which reads each shard's items as "
                    "it sends the shard; change it only once the call is over, or pass a copy"
                )
            layout = self.layout
            if type(sequence) in _CUTTABLE and layout.block_size >= CUT_FROM:
                items = [_cut(sequence, layout.where(p)) for p in range(first, first + count)]
            else:
                cut = layout.items_of
                items = [cut(sequence, p) for p in range(first, first + count)]
        return count, items

    def shard_at(self, pos: int, attempt: int, item: Any = None) -> Shard:
        items = None if self.sequence is None else item
        return Shard(pos, self.layout.indices(pos), items, None, attempt, self.seed)


_CUTTABLE = (ListCopy, list, tuple)
"""Inputs whose shards are sent as `Cut`s when long: the call's copy of a list (a `list`
here is always one) and tuples, which cannot change."""


def _cut(sequence: Sequence[Any], where: slice) -> Any:
    """A shard's items: a `Cut` if there are many, else the slice."""
    cut = Cut(sequence, where)
    return cut if len(cut) >= CUT_FROM else sequence[where]


_HOLDERS = frozenset({list, tuple, dict, set, frozenset, deque, str, bytes, bytearray})
"""Containers whose iteration hands out the objects they hold: their items are taken
as they are. Any other iterable (a generator, a reader) may hand out one object changed
in place each time: each of its items that could change is copied as it is drawn."""


class ItemPositions(Positions):
    """The items of an iterable (`total`: its length, if it has one), read as they are
    taken; an item is kept only while its position waits to run again."""

    def __init__(self, items: Iterable[Any]) -> None:
        super().__init__()
        self._held = holds_its_items(items)
        self.total = len(items) if isinstance(items, Sized) else None
        source, self._uncopied = _copied_now(items)
        # a range (sent as ranges) and a list's copy are sliced; anything else iterated
        self._sliced: Sequence[Any] | None = source if type(source) in (range, list) else None
        self._items = iter(source)

    def _adopt(self, copy: ListCopy) -> None:
        self._sliced = copy

    def take(self, size: int) -> tuple[int, Sequence[Any] | None]:
        assert self._uncopied is None, "copy_input() comes before take()"
        if self._sliced is not None:
            items: Sequence[Any] = self._sliced[self.next_pos : self.next_pos + size]
        else:
            try:
                if self._held:
                    items = list(islice(self._items, size))
                else:  # each copied before the iterator goes on
                    items = [
                        x if type(x) in SETTLED else drawn(x) for x in islice(self._items, size)
                    ]
            except BaseException:
                self.exhausted = True
                raise
        if len(items) < size:
            self.exhausted = True
        self.next_pos += len(items)
        return len(items), items

    def shard_at(self, pos: int, attempt: int, item: Any = None) -> Shard:
        return Shard(pos, range(pos, pos + 1), [undrawn(item)], None, attempt)


def holds_its_items(items: object) -> bool:
    """Does iterating `items` hand out objects it holds (see `_HOLDERS`; a numpy
    array's rows are views of what it holds)? Looked at without importing numpy."""
    if type(items) in _HOLDERS:
        return True
    np = sys.modules.get("numpy")
    return np is not None and type(items) is np.ndarray


def drawn_args(iterables: Sequence[Iterable[Any]]) -> list[Any]:
    """``list(zip(*iterables))``, each tuple of arguments copied as it is drawn where it
    could change and an iterable may hand out one object changed in place."""
    zipped = zip(*iterables, strict=False)
    if all(holds_its_items(it) for it in iterables):
        return list(zipped)
    return [drawn(args) for args in zipped]

"""`ashard.shards`: strategies, block sizes and the `Shard` record."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import ashard


def test_contiguous_blocks_cover_every_index_once() -> None:
    s = ashard.shards(10, block_size=3)
    assert len(s) == 4
    assert [list(sh.idx) for sh in s] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert [sh.id for sh in s] == [0, 1, 2, 3]
    assert all(isinstance(sh.idx, range) for sh in s)
    assert [len(sh) for sh in s] == [3, 3, 3, 1]


def test_strided_shards_interleave() -> None:
    s = ashard.shards(10, block_size=4, strategy="strided")
    assert len(s) == 3
    assert [sh.idx.tolist() for sh in s] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert all(isinstance(sh.idx, np.ndarray) for sh in s)
    covered = np.sort(np.concatenate([sh.idx for sh in s]))
    assert covered.tolist() == list(range(10))


def test_default_block_size_gives_each_worker_several_shards() -> None:
    s = ashard.shards(1000, workers=4)
    assert len(s) >= 4 * 2
    assert sum(len(sh) for sh in s) == 1000
    assert len(ashard.shards(3, workers=8)) == 3  # never an empty shard


def test_shard_defaults_and_indexing() -> None:
    s = ashard.shards(5, block_size=2)
    last = s[-1]
    assert (last.id, list(last.idx), last.items, last.attempt) == (2, [4], None, 1)
    assert isinstance(last.rng, np.random.Generator)  # fresh entropy without a seed
    assert [sh.id for sh in s[1:]] == [1, 2]
    with pytest.raises(IndexError):
        s[3]


def test_shards_pickle_small_and_equal() -> None:
    s = ashard.shards(10**9, block_size=1000)
    data = pickle.dumps(s)
    assert len(data) < 200
    assert pickle.loads(data) == s


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        ({"n": 0}, ValueError, "n must be a positive int"),
        ({"n": -3}, ValueError, "n must be a positive int"),
        ({"n": 2.5}, TypeError, "n must be a positive int"),
        ({"n": 10, "block_size": 0}, ValueError, "block_size"),
        ({"n": 10, "workers": -1}, ValueError, "workers"),
        ({"n": 10, "strategy": "random"}, ValueError, "strategy must be"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], exc: type[Exception], words: str) -> None:
    with pytest.raises(exc, match=words):
        ashard.shards(**kwargs)  # type: ignore[arg-type]

"""Per-shard random streams derived from ``(seed, shard id)`` alone, so results never
depend on worker count, chunking, scheduling or retries."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def shard_rng(seed: int, shard_id: int) -> np.random.Generator:
    """The `Shard.rng` of shard `shard_id`."""
    import numpy as np  # numpy on first use: a worker and `import ashard` start without it

    return np.random.default_rng(np.random.SeedSequence([seed, shard_id]).spawn(1)[0])


def seed_globals(seed: int, shard_id: int) -> None:
    """Seed `random` and the legacy `numpy.random` state for one shard."""
    import random  # here: the caller imports this module, and never seeds

    import numpy as np  # numpy on first use: a worker and `import ashard` start without it

    py_seq, np_seq = np.random.SeedSequence([seed, shard_id, 1]).spawn(2)
    random.seed(py_seq.generate_state(4).tobytes())
    np.random.seed(np_seq.generate_state(4))

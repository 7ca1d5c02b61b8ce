"""loky: joblib's robust executor (fresh interpreters); driven like ProcessPoolExecutor."""

from __future__ import annotations

from typing import Any

from peers.executor import ProcessPoolPeer


class LokyPeer(ProcessPoolPeer):
    label = "loky"
    context = None
    fresh = True

    def _make(self, workers: int, **kwargs: Any) -> Any:
        import loky

        return loky.ProcessPoolExecutor(workers, **kwargs)

"""One adapter per peer library, all with the interface of `_base.Peer`.

`PEERS` maps a peer's name to "module:Class"; adapters import their library only when
made, so a peer that is not installed shows up as an error row, not a crash.
"""

from __future__ import annotations

import importlib
from typing import Any

PEERS: dict[str, str] = {
    "ashard": "peers.ashard_peer:AshardPeer",
    "ppe": "peers.executor:ProcessPoolPeer",
    "ppe-forkserver": "peers.executor:ForkserverPoolPeer",
    "ppe-asyncio": "peers.executor:RunInExecutorPeer",
    "mp-pool": "peers.mp_pool:MpPoolPeer",
    "loky": "peers.loky_peer:LokyPeer",
    "joblib": "peers.joblib_peer:JoblibPeer",
    "mpire": "peers.mpire_peer:MpirePeer",
    "aiomultiprocess": "peers.aiomp_peer:AioMultiprocessPeer",
    "anyio-to-process": "peers.anyio_peer:AnyioToProcessPeer",
    "dask": "peers.dask_peer:DaskPeer",
    "ray": "peers.ray_peer:RayPeer",
}


REQUIRES: dict[str, str] = {
    "loky": "loky",
    "joblib": "joblib",
    "mpire": "mpire",
    "aiomultiprocess": "aiomultiprocess",
    "dask": "distributed",
    "ray": "ray",
}
"""The library a peer needs beyond the standard library and ashard's own dependencies
(the `bench` extra installs them all)."""


def missing(names: list[str]) -> dict[str, str]:
    """Those of peers `names` whose library is not installed: peer -> module."""
    import importlib.util

    return {
        name: REQUIRES[name]
        for name in names
        if name in REQUIRES and importlib.util.find_spec(REQUIRES[name]) is None
    }


def make(name: str) -> Any:
    """A fresh, unstarted adapter for peer `name`."""
    module, cls = PEERS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def label(name: str) -> str:
    """The peer's display name, without importing its library."""
    module, cls = PEERS[name].split(":")
    try:
        return str(getattr(importlib.import_module(module), cls).label)
    except Exception:
        return name

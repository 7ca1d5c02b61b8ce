"""The Dask backend: ashard workers hosted by Dask workers (DESIGN.md 2.4).

Dask places work on machines; on each machine ashard supervises. This package is
imported only when a pool is given ``cluster=``; nothing else in ashard imports dask.

::

    caller's process                        each Dask worker (a node)
    ────────────────                        ─────────────────────────
    Pool ── DaskBackend ── Client ─────────▶ AshardPlugin ── NodeHost
              │  a task per chunk,                   │  a _Relay per call
              │  pinned to its node                  ▼
              │                              Scheduler ── ashard worker processes
              ◀── typed reports, replayed ────────── _Relay
                  into the caller's Job
       borrow ── scattered once per call ──▶ the node's shared memory (landed)

* `backend` — the caller's side: `DaskBackend` (an `ashard._backend.Backend`),
  `check_cluster`, the bookkeeping of nodes and tasks, the replay of a node's reports
  into the job. The only module the rest of ashard imports.
* `node` — what runs inside a Dask worker: the plugin, the node's host (a local
  `Scheduler` on a loop thread), the relay that stands for the caller's job there,
  and the task functions Dask runs.
* `wire` — what crosses between the two: the call's record (`NodeJob`), the version
  check, and one record type per kind of report.
* `landing` — how a borrowed array lands in a node's shared memory once.

``backend`` imports ``node`` (the plugin class and the task functions it submits),
``wire`` and ``landing``; ``node`` imports ``wire`` and ``landing``, and loads the
local backend only when a node starts its host. This file imports none of them.
"""

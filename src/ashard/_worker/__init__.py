"""Everything that runs in a worker process (``python -m ashard._worker FD PARENT_PID``).

`loop` is the message loop (handshake, job registration, shared segments), `run` runs
the shards of a chunk with timeouts and interruption, `attach` maps the shared memory
the parent sent. The worker imports nothing heavy at start: no anyio, and numpy,
cloudpickle or pyarrow only when a job needs them, so a pool is ready quickly.
"""

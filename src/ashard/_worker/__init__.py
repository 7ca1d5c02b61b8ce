"""Everything that runs in a worker process (``python -m ashard._worker FD PARENT_PID``).

- `loop`: the message loop: handshake, then each message from the parent, parsed
  (`ashard._protocol.parse_order`) and dispatched; `main`, the entry point.
- `process`: setting up the process: parent-death signal, C stdio line buffering,
  the multiprocessing authkey, the memory watch, private memory (RSS).
- `jobs`: a registered job as the worker holds it, loaded from the parent's `JobSpec`.
- `running`: runs user code, the shards of a chunk or one call, with timeouts and
  interruption by signal.
- `reports`: what goes back to the parent: READY, INIT_FAILED, results.
- `large_results`: large array results out through sealed memfds.
- `segments`: the shared memory the parent sent, and the views `fn` receives.
- `outputs`: the writers of table sinks (``out=``) and results stores (``results=``).
- `dropins`: functions the drop-in executors (`Executor`, joblib) run in workers.

The worker imports nothing heavy at start: no anyio, and numpy, cloudpickle or pyarrow
only when a job needs them, so a pool is ready quickly.
"""

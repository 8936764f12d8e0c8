"""The engine: everything between the Serve shell (deployments/model_server.py) and a runner.

`control.BatchControl` owns the batch cap and wait (memory bound, live retune, adaptive steps,
the cap an out-of-memory batch leaves behind). `batcher.DeviceBatcher` forms device batches when
a runner slot frees up (`coalesce.py`), tokenises and collates them, runs them on the batch
executor and isolates failures (bisection, out-of-memory split). `oneshot.OneShotEngine` puts the
two together for request/response models: one request in, one result out. Nothing here imports
Ray, so the engine is built and tested with a fake runner (tests/unit/test_engine.py).

An iteration-level scheduler for generation sits beside OneShotEngine with the same shape:
requests in, token streams out.

Import the modules themselves (`app.engine.oneshot`, ...): this package imports nothing, so the
generation engine's child process (engine_process.py) can set OpenMP's variables before torch loads.
"""

"""The generation engine in its own process, as vLLM V1's engine core: the decoding loop keeps an
interpreter to itself.

In the replica's process, every streamed message costs Python work (Serve's stream, serialising,
Ray's core worker, detokenising) that takes the GIL from the manager's decoding loop, which is itself
bound by host-side kernel dispatch: on 2 cores that was a third of the replica's busy time
(docs/performance.md, session 22). Here the replica keeps the Serve shell, the tokenizer and the
streams; a child process holds the model, its KV cache and the continuous-batching engine
(app/engine/generation.py, unchanged), and only token ids cross between them:

- replica -> engine: ("add", id, prompt ids, sampling params, bulk), ("cancel", id), ("stop",);
- engine -> replica: ("out", [events of every request since the last message]) once per turn of
  its event loop (one message for all streams of a step, not one per stream), and ("stats", ...)
  every 100 ms (running sequences, KV use, the loop's health).

The channel is a `multiprocessing` pipe (an unnamed socket pair: no listening port, nothing another
process can connect to) carrying pickles only between a parent and the child it spawned. The child
exits when the pipe closes, so a replica that dies (even by SIGKILL) takes its engine with it.
No Ray here.

On CPU the child's OpenMP threads sleep as soon as a parallel region ends (`OMP_WAIT_POLICY=PASSIVE`,
see `child_environment`): libgomp's default spins them first, which on shared cores takes from the
replica, the ingress and the proxy the CPU the streams need (docs/performance.md, session 28).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, AsyncIterator, Mapping, Optional

from app import errors
from app.config import ModelSpec
from app.errors import ModelFailure, ReplicaUnavailable, ServingError

logger = logging.getLogger("ray.serve")

_STATS_INTERVAL_S = 0.1
_SILENT_AFTER_S = 30.0  # no stats for this long: the engine process is hung, the replica unhealthy
OMP_PASSIVE_ENV = "BATCHSERVE_ENGINE_OMP_PASSIVE"


def child_environment(on_cpu: bool, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Variables the engine process sets before it imports torch (libgomp reads them once, when it
    loads). On CPU: OMP_WAIT_POLICY=PASSIVE. libgomp's default keeps each idle thread spinning after
    every parallel region, and a decoding step is thousands of small ones, so on cores the engine
    shares with the replica, the ingress and the proxy the spinning took their CPU (2 cores, 2 torch
    threads: 1.10x the output tokens at 4 req/s in a same-run pair, session 28). An operator's own
    OMP_WAIT_POLICY or GOMP_SPINCOUNT (`runtime_env.env_vars`) stands;
    BATCHSERVE_ENGINE_OMP_PASSIVE=0 leaves libgomp's default (the benchmark's before)."""
    if (not on_cpu or environ.get(OMP_PASSIVE_ENV, "1") == "0"
            or "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ):
        return {}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def build_engine(spec: ModelSpec, vocab_size: int, engine_args: dict[str, Any]):
    """The model on its device, the KV budget from the memory left after the weights, and the engine
    on them: in the engine process, or in the replica's own when `generation.engine_process` is off."""
    from app.engine.generation import GenerationEngine
    from app.kv_cache import free_memory_bytes, kv_budget, kv_bytes_per_token
    from app.models.loader import build_backbone, resolve_device, resolve_dtype
    from app.models.output_projection import use_faster_head_layout

    g = spec.generation
    device = resolve_device(spec)
    dtype = resolve_dtype(spec, device)
    model = build_backbone(spec, vocab_size, device, dtype)
    # One replica, one model: the head's layout is this process's choice alone. (A gang's ranks keep
    # theirs: each rank timing on its own could choose differently and round differently.)
    use_faster_head_layout(model, max_rows=engine_args["max_running"])
    budget = kv_budget(free_memory_bytes(device), kv_bytes_per_token(model.config, dtype.itemsize),
                       g.kv_cache_memory_fraction, g.kv_cache_max_tokens)
    return GenerationEngine(model, budget=budget, **engine_args)


# ---------------------------------------------------------------------- the replica's side


class EngineProcess:
    """What the generator replica drives: the GenerationEngine interface it uses (`stream`, `stats`,
    `describe`, `budget`, `check_health`, `shutdown`), with the engine in a child process."""

    def __init__(self, spec: ModelSpec, vocab_size: int, engine_args: dict[str, Any], start_timeout_s: float = 1800.0,
                 environment: Optional[Mapping[str, str]] = None):
        from app.engine.generation import GenerationStats

        self._stats_type = GenerationStats
        ctx = mp.get_context("spawn")  # not fork: the replica has threads (Ray's) and maybe CUDA
        self._conn, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=run_engine_process,
                                 args=(child, spec, vocab_size, engine_args, dict(environment or {})),
                                 name=f"engine-{spec.name}", daemon=True)
        self._proc.start()
        child.close()  # the child's end lives in the child only: its exit closes the pipe here
        ready = self._wait_ready(start_timeout_s)
        self.budget, self._description = ready[1], ready[2]
        self._ids = itertools.count()
        self._streams: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._send_lock = threading.Lock()
        self._running, self._kv_used, self._health = 0, 0.0, None
        self._last_stats = time.monotonic()
        self._lost: Optional[str] = None
        self._reader = threading.Thread(target=self._read, name="engine-process-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self, timeout_s: float) -> tuple:
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(1.0):
            if not self._proc.is_alive():
                raise RuntimeError(f"the engine process exited (code {self._proc.exitcode}) while loading the model")
            if time.monotonic() > deadline:
                self._proc.kill()
                raise RuntimeError(f"the engine process did not load the model in {timeout_s:g} s")
        msg = self._conn.recv()
        if msg[0] == "failed":
            self._proc.join(10)
            raise RuntimeError(f"the engine process failed to start:\n{msg[1]}")
        return msg

    # ------------------------------------------------------------------ requests

    async def stream(self, prompt_ids: list[int], params: Any, bulk: bool = False) -> AsyncIterator[Any]:
        """New tokens as the engine's steps produce them (GenerationEngine.stream's contract):
        admission errors come as the first item; closing the iterator early cancels the sequence."""
        from app.engine.generation import TokenEvent

        if self._lost is not None:
            raise ReplicaUnavailable(self._lost)
        request_id = f"p{next(self._ids)}"
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (outputs, asyncio.get_running_loop())
        finished = False
        try:
            self._send(("add", request_id, prompt_ids, params, bulk))
            while not finished:
                items = [await outputs.get()]
                while not outputs.empty():  # fell behind the engine's steps: one event for all of them
                    items.append(outputs.get_nowait())
                tokens: list[int] = []
                reason = None
                for item in items:
                    if item[0] != "ev":
                        if tokens:  # what came before the error still reaches the client
                            yield TokenEvent(tokens)
                        raise _error(item)
                    tokens.extend(item[2])
                    finished, reason = item[3], item[4]
                yield TokenEvent(tokens, finished, reason)
        finally:
            self._streams.pop(request_id, None)
            if not finished and self._lost is None:
                try:
                    self._send(("cancel", request_id))
                except ReplicaUnavailable:
                    pass

    def _send(self, msg: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (OSError, ValueError) as e:  # BrokenPipe, or the connection already closed
            raise ReplicaUnavailable(f"the engine process is gone ({type(e).__name__})") from e

    def _read(self) -> None:
        """The reader thread: hands each batch of events to the event loops of the streams they
        belong to, one call per loop per batch."""
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                self._end_all(f"the engine process exited (code {self._proc.exitcode})")
                return
            if msg[0] == "out":
                by_loop: dict[asyncio.AbstractEventLoop, list] = {}
                for item in msg[1]:
                    target = self._streams.get(item[1])
                    if target is not None:  # else: the stream has closed meanwhile
                        by_loop.setdefault(target[1], []).append((target[0], item))
                for loop, pairs in by_loop.items():
                    _call_soon(loop, _put_all, pairs)
            elif msg[0] == "stats":
                (self._running, self._kv_used), self._health = msg[1], msg[2]
                self._last_stats = time.monotonic()

    def _end_all(self, reason: str) -> None:
        self._lost = reason
        for outputs, loop in list(self._streams.values()):
            _call_soon(loop, outputs.put_nowait, ("err", "", "ReplicaUnavailable", reason))

    # ------------------------------------------------------------------ state

    def stats(self):
        held = len(self._streams)
        running = min(self._running, held)
        return self._stats_type(running, held - running, held, self._kv_used)

    def describe(self) -> dict[str, Any]:
        return {**self._description, "engine_process": self._proc.pid}

    def check_health(self) -> None:
        if self._lost is not None:
            raise RuntimeError(self._lost)
        if not self._proc.is_alive():
            raise RuntimeError(f"the engine process exited (code {self._proc.exitcode})")
        if self._health is not None:
            raise RuntimeError(self._health)
        silent = time.monotonic() - self._last_stats
        if silent > _SILENT_AFTER_S:
            raise RuntimeError(f"the engine process has not reported for {silent:.0f} s")

    def shutdown(self) -> None:
        if self._proc.is_alive():
            try:
                self._send(("stop",))
            except ReplicaUnavailable:
                pass
            self._proc.join(15)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        self._conn.close()


def _put_all(pairs: list) -> None:
    for outputs, item in pairs:
        outputs.put_nowait(item)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that loop has closed: it has no stream left to feed
        pass


def _error(item: tuple) -> ServingError:
    """The replica-side error for an engine process's ("err", id, class name, message)."""
    cls = getattr(errors, item[2], None)
    if isinstance(cls, type) and issubclass(cls, ServingError):
        return cls(item[3])
    return ModelFailure(item[3])


# ---------------------------------------------------------------------- the engine's side


def run_engine_process(conn, spec: ModelSpec, vocab_size: int, engine_args: dict[str, Any],
                       environment: Optional[Mapping[str, str]] = None) -> None:
    """The child's entry point: set `environment` (child_environment's), build the engine, say ready
    (or why not), serve the pipe."""
    # Ctrl-C of `serve run` reaches the whole process group; the replica decides when this ends
    # (it sends "stop", or its end of the pipe closes).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="engine %(levelname)s %(name)s: %(message)s")
    if environment:
        # Nothing this module imports at its top loads torch (app/engine/__init__.py imports nothing),
        # so OpenMP has not read its variables yet; tests/unit/test_engine_process.py checks it.
        if "torch" in sys.modules:
            logger.warning("engine process: torch was loaded before %s could be set", sorted(environment))
        os.environ.update(environment)
    try:
        from app.engine.startup import tune_process

        tune_process(spec)
        engine = build_engine(spec, vocab_size, engine_args)
    except BaseException:  # noqa: BLE001 - every start failure is reported to the replica as text
        conn.send(("failed", traceback.format_exc()))
        conn.close()
        return
    try:
        asyncio.run(_EngineHost(conn, engine).serve())
    finally:
        engine.shutdown()


class _EngineHost:
    """The engine process's event loop: one task per request, forwarding its events to the pipe."""

    def __init__(self, conn, engine):
        self.conn, self.engine = conn, engine
        self.tasks: dict[str, asyncio.Task] = {}
        self.outbox: list[tuple] = []

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopped = asyncio.Event()
        self.conn.send(("ready", self.engine.budget, self.engine.describe()))
        threading.Thread(target=self._read, name="engine-commands", daemon=True).start()
        reporter = asyncio.create_task(self._report())
        await self.stopped.wait()
        reporter.cancel()
        for task in list(self.tasks.values()):
            task.cancel()

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):  # the replica is gone
                msg = ("stop",)
            self.loop.call_soon_threadsafe(self._command, msg)
            if msg[0] == "stop":
                return

    def _command(self, msg: tuple) -> None:
        if msg[0] == "add":
            _, request_id, prompt_ids, params, bulk = msg
            self.tasks[request_id] = self.loop.create_task(self._forward(request_id, prompt_ids, params, bulk))
        elif msg[0] == "cancel":
            task = self.tasks.pop(msg[1], None)
            if task is not None:
                task.cancel()  # raised inside the engine's stream: its cleanup cancels the sequence
        elif msg[0] == "stop":
            self.stopped.set()

    async def _forward(self, request_id: str, prompt_ids: list[int], params: Any, bulk: bool) -> None:
        try:
            async for event in self.engine.stream(prompt_ids, params, bulk=bulk):
                self._post(("ev", request_id, event.tokens, event.finished, event.finish_reason))
        except asyncio.CancelledError:
            pass
        except ServingError as e:
            self._post(("err", request_id, type(e).__name__, e.message))
        except Exception as e:  # noqa: BLE001 - a request that fails, fails alone
            logger.exception("generation of %s failed", request_id)
            self._post(("err", request_id, "ModelFailure", f"generation failed: {type(e).__name__}: {e}"))
        finally:
            self.tasks.pop(request_id, None)

    def _post(self, item: tuple) -> None:
        if not self.outbox:  # the first event of this turn: send them all once the turn is over
            self.loop.call_soon(self._flush)
        self.outbox.append(item)

    def _flush(self) -> None:
        batch, self.outbox = self.outbox, []
        self._send(("out", batch))

    def _send(self, msg: tuple) -> None:
        try:
            self.conn.send(msg)
        except (OSError, ValueError):  # the replica is gone; the reader thread stops the loop
            pass

    async def _report(self) -> None:
        while True:
            stats = self.engine.stats()
            try:
                self.engine.check_health()
                health = None
            except Exception as e:  # noqa: BLE001 - reported, the replica's health check raises it
                health = str(e)
            self._send(("stats", (stats.running, stats.kv_used_fraction), health))
            await asyncio.sleep(_STATS_INTERVAL_S)

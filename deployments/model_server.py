"""One model behind one `@serve.batch` queue: the Serve shell around the engine (app/engine/).

Serve decides admission (max_ongoing_requests, the handle queue) and which requests queue together;
the engine does the rest: device batches, isolation, the batch cap and wait. This class only wires
Serve's hooks to it: `reconfigure` (live retunes), `check_health`, `record_autoscaling_stats`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psutil
import ray
from ray import serve

from app.batching import BatchEntry, check_token_budget, count_items
from app.config import CostConfig, ModelSpec
from app.engine.oneshot import BulkPolicy, OneShotEngine
from app.engine.faults import fault_drill, faults_from_env
from app.engine.startup import start_runner, tune_process
from app.engine_link import EngineListener
from app.metrics import ModelServerMetrics
from app.models.loader import build_config, check_vocab, load_tokenizer
from app.models.tokenize import TextEncoder
from app.planner import ParallelPlan
from app.runners.factory import make_runner
from app.tracing import Tracer
from app.requests import InferenceResult, ModelInput

logger = logging.getLogger("ray.serve")

# Batches Serve may have closed and handed to the engine at once; the device runs
# max_concurrent_batches of them, merged (app/engine/coalesce.py).
_SERVE_BATCHES_IN_FLIGHT = 256


class ModelServer:
    def __init__(self, spec: ModelSpec, plan: ParallelPlan, vocab_size: int, cost: CostConfig, version: str = "1"):
        t0 = time.perf_counter()
        # Worker start and imports, before this line: half of a new replica's start (autoscaling).
        process_up_s = time.time() - psutil.Process().create_time()
        self.spec, self.plan = spec, plan
        logger.info("model %s plan: %s x%d/%d/%d -- %s", spec.name, plan.strategy, plan.tp, plan.pp, plan.chunks,
                    plan.explain())
        threads = tune_process(spec)
        encoder = TextEncoder(load_tokenizer(spec), spec.max_seq_len)
        self.model_vocab = int(build_config(spec, vocab_size).vocab_size)
        check_vocab(spec, encoder.vocab_size, self.model_vocab)
        self.encoder = encoder
        self.runner = make_runner(spec, vocab_size, plan)
        executor, memory_limit = start_runner(self.runner, spec, plan, threads)
        self.metrics = ModelServerMetrics(spec, plan, cost, self.runner.gpu_ids() or [str(g) for g in ray.get_gpu_ids()])
        served_by = (serve.get_replica_context().replica_id.unique_id, ray.get_runtime_context().get_node_id()[:12])
        self.engine = OneShotEngine(spec.name, self.runner, encoder, spec.batching, memory_limit, self.metrics,
                                    spec.limits.max_batch_tokens, fault_drill(faults_from_env(spec.name)), served_by, executor,
                                    spec.limits.max_queue_wait_ms,
                                    BulkPolicy(spec.bulk_max_ongoing_requests(), spec.bulk_batch_items()),
                                    version, Tracer("model_server"))
        cfg = self.engine.control
        # One Serve batch queue per traffic class (each is FIFO); the engine's coalescer serves
        # realtime batches first (app/engine/coalesce.py).
        self._batched = serve.batch(max_batch_size=cfg.max_batch_size, batch_wait_timeout_s=cfg.wait_s,
                                    max_concurrent_batches=_SERVE_BATCHES_IN_FLIGHT,
                                    batch_size_fn=count_items)(self._serve_batch)
        self._batched_bulk = serve.batch(max_batch_size=spec.bulk_batch_items(), batch_wait_timeout_s=cfg.wait_s,
                                         max_concurrent_batches=_SERVE_BATCHES_IN_FLIGHT,
                                         batch_size_fn=count_items)(self._serve_bulk_batch)
        cfg.listen(self._apply_batching)
        # Started on the first engine_address() call, on the loop that runs infer (ingress.gather direct).
        self._listener = EngineListener(self.infer, spec.effective_max_ongoing_requests())
        logger.info("model %s process up %.1fs at __init__, ready in %.1fs: %s, batching %s, torch threads %d",
                    spec.name, process_up_s, time.perf_counter() - t0, self.runner.describe(),
                    cfg.config.model_dump(), threads)

    def _apply_batching(self, wait_s: float, max_batch_size: int) -> None:
        """The engine's cap and wait, pushed into Serve's batch queue."""
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(wait_s)
        self._batched_bulk.set_max_batch_size(self.engine.bulk_items())
        self._batched_bulk.set_batch_wait_timeout_s(wait_s)

    async def _serve_batch(self, entries: list[BatchEntry]):
        return await self.engine.batcher.run(entries)

    async def _serve_bulk_batch(self, entries: list[BatchEntry]):
        return await self.engine.batcher.run(entries, bulk=True)

    def __del__(self):
        if getattr(self, "runner", None) is not None:
            self.runner.shutdown()
        if getattr(self, "metrics", None) is not None:
            self.metrics.stop()

    # ------------------------------------------------------------------ Serve hooks

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live retune of batching from `user_config` (applies to every replica, no restart)."""
        self.engine.retune(user_config)

    def check_health(self) -> None:
        self.runner.check_health()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metrics (app/autoscaling.py): items in the replica and queue wait p99."""
        return self.engine.autoscaling_stats()

    # ------------------------------------------------------------------ handle methods

    async def ready(self) -> bool:
        return True

    async def engine_address(self) -> dict[str, Any]:
        """Where an ingress replica links to this replica directly (app/engine_link.py); the secret
        travels only through the handle, inside the Ray cluster."""
        host = ray.util.get_node_ip_address()
        port = await self._listener.start(host)
        return {"host": host, "port": port, "secret": self._listener.secret.hex(),
                "engine": self.engine.served_by[0]}

    async def describe(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "task": self.spec.task,
            "served_version": self.engine.version,
            "replica": self.engine.served_by[0],
            **self.runner.describe(),
            "batching": self.engine.control.config.model_dump(),
            "plan": self.plan.as_dict(),
            "max_seq_len": self.spec.max_seq_len,
            "limits": self.spec.limits.model_dump(),
        }

    async def infer(self, inputs: ModelInput) -> InferenceResult:
        # Shapes, limits and token ids against the vocabulary were checked at the ingress, the one edge.
        if inputs.requests == 1:  # merged requests were each checked at the ingress (app/gather.py)
            check_token_budget(inputs, self.spec, self.encoder)
        return await self.engine.infer(inputs, self._batched, self._batched_bulk)

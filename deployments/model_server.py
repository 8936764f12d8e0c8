"""One model behind one `@serve.batch` method.

Requests arrive already validated by the ingress; here they queue for a batch, are tokenised
together, run through the runner on a worker thread (so the event loop keeps collecting the next
batch), and their rows go back to their callers. A batch that raises is bisected so that one bad
item fails alone and its batch-mates still get answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
import torch
import ray
from pydantic import ValidationError
from ray import serve

from app.coalesce import BatchCoalescer
from app.quantiles import percentile
from app.adaptive import BatchingState, ControllerConfig, Window, step
from app.batching import (
    BatchEntry,
    check_token_budget,
    collate,
    count_items,
    max_batch_size_from_memory,
    split_rows,
    token_budget_groups,
)
from app.config import BatchingConfig, CostConfig, ModelSpec
from app.engine_link import EngineListener
from app.errors import InvalidInput, ModelFailure, ReplicaUnavailable, ServingError
from app.runners.base import DeviceLost
from app.metrics import ModelServerMetrics
from app.models.loader import build_config, check_vocab, load_tokenizer
from app.models.tokenize import TextEncoder
from app.planner import ParallelPlan
from app.runners.factory import make_runner
from app.schemas import InferenceResult, ModelInput

logger = logging.getLogger("ray.serve")

# Batches Serve may have closed and handed over at once; the device runs max_concurrent_batches.
_SERVE_BATCHES_IN_FLIGHT = 256


@dataclass
class _ChunkResult:
    outputs: np.ndarray
    batch_size: int
    queue_wait_ms: float
    batch_ms: float


class ModelServer:
    def __init__(self, spec: ModelSpec, plan: ParallelPlan, vocab_size: int, cost: CostConfig):
        self.spec = spec
        self.plan = plan
        threads = spec.deployment.torch_threads or os.cpu_count() or 1
        # Ray sets OMP_NUM_THREADS=1 for fractional-CPU actors; say explicitly what we want.
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        # Worker start and imports, before this line: half of a new replica's start (autoscaling).
        process_up_s = time.time() - psutil.Process().create_time()
        logger.info("model %s plan: %s x%d/%d/%d -- %s", spec.name, plan.strategy, plan.tp, plan.pp, plan.chunks,
                    plan.explain())
        if spec.deployment.gil_switch_interval_ms is not None:
            sys.setswitchinterval(spec.deployment.gil_switch_interval_ms / 1000.0)
        tokenizer_threads = spec.deployment.tokenizer_threads
        if tokenizer_threads == 0:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        elif tokenizer_threads is not None:
            # Read once, when the pool first starts: before the tokenizer's first batch.
            os.environ["RAYON_NUM_THREADS"] = str(tokenizer_threads)
        tokenizer = load_tokenizer(spec)
        self.encoder = TextEncoder(tokenizer, spec.max_seq_len)
        self.model_vocab = int(build_config(spec, vocab_size).vocab_size)
        check_vocab(spec, self.encoder.vocab_size, self.model_vocab)
        self.runner = make_runner(spec, vocab_size, plan)
        # Every torch call of the model runs on the batch executor's threads, the start and warm-up
        # included: each thread that enters an OpenMP region gets its own busy-waiting thread team,
        # and a second team (the event loop's) made CPU batches ~1.8x slower on 2 cores.
        self._executor = ThreadPoolExecutor(max_workers=spec.batching.max_concurrent_batches)
        self._executor.submit(torch.set_num_threads, threads).result()
        self._executor.submit(self.runner.start).result()
        self.memory_max_batch_size = self._executor.submit(self._measured_batch_limit).result()
        gpu_ids = getattr(self.runner, "gang_gpus", None) or [str(g) for g in ray.get_gpu_ids()]
        self.metrics = ModelServerMetrics(spec, plan, cost, gpu_ids)
        self._batching = self._bounded(spec.batching)
        self._batched = self._make_batcher(self._batching)
        self._window = Window()
        self._adapt_task: asyncio.Task | None = None
        self._pending_items = 0  # items received and not yet answered (queued + running)
        self._recent_waits: deque[tuple[float, float]] = deque()  # (time, queue wait ms) for autoscaling
        self._oom_cap: int | None = None  # set by a batch that ran out of device memory; applied on the loop
        # Padded tokens one batch may hold; None: no budget beyond the batch cap x max_seq_len.
        self.batch_tokens = spec.limits.max_batch_tokens
        # Started on the first engine_address() call, on the loop that runs infer (ingress.gather direct).
        self._listener = EngineListener(self.infer, spec.effective_max_ongoing_requests())
        ctx = ray.get_runtime_context()
        self._served_by = (serve.get_replica_context().replica_id.unique_id, ctx.get_node_id()[:12])
        self.metrics.batching(self._batching.batch_wait_timeout_s, self._batching.max_batch_size)
        logger.info(
            "model %s process up %.1fs at __init__, ready in %.1fs: %s, batching %s, torch threads %d, "
            "tokenizer threads %s", spec.name, process_up_s, time.perf_counter() - t0, self.runner.describe(),
            self._batching.model_dump(), threads,
            "none (batch thread)" if tokenizer_threads == 0 else os.environ.get("RAYON_NUM_THREADS", "all cores"),
        )

    def _measured_batch_limit(self) -> int:
        """The seed formula on measured figures where the device allows (CUDA: free memory and the
        peak one sample adds at max_seq_len), else on the planner's estimate."""
        measure = getattr(self.runner, "measure_per_sample_bytes", None)
        per_sample = measure(self.spec.max_seq_len) if measure else None
        if not per_sample:
            return self.plan.memory_max_batch_size
        free = self.runner.free_device_bytes()
        limit = max_batch_size_from_memory(free, per_sample, cap=65536)
        logger.info("model %s: measured %.2f MiB per sample at seq %d, %.1f GiB free -> memory allows batch %d",
                    self.spec.name, per_sample / 2**20, self.spec.max_seq_len, free / 2**30, limit)
        return limit

    def _bounded(self, cfg: BatchingConfig) -> BatchingConfig:
        """Never batch more than device memory allows (the seed formula)."""
        limit = self.memory_max_batch_size
        if cfg.max_batch_size <= limit:
            return cfg
        logger.warning("model %s: max_batch_size %d exceeds what memory allows (%d); using %d",
                       self.spec.name, cfg.max_batch_size, limit, limit)
        return cfg.model_copy(update={"max_batch_size": limit})

    def __del__(self):
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.shutdown()
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.stop()

    # ------------------------------------------------------------------ Serve hooks

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live retune of batching from `user_config` (applies to every replica, no restart)."""
        try:
            cfg = BatchingConfig.model_validate(user_config or {})
        except ValidationError as e:
            raise ValueError(f"user_config for model {self.spec.name!r}: {e}") from None
        cfg = self._bounded(cfg)
        old = self._batching
        self._batching = cfg
        if cfg.max_concurrent_batches != old.max_concurrent_batches:
            # Serve has no setter for it: a fresh batcher takes new requests; the old queue drains.
            self._executor = ThreadPoolExecutor(max_workers=cfg.max_concurrent_batches)
            self._batched = self._make_batcher(cfg)
        else:
            self._batched.set_max_batch_size(cfg.max_batch_size)
            self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.metrics.batching(cfg.batch_wait_timeout_s, cfg.max_batch_size)
        logger.info("model %s batching retuned: %s", self.spec.name, cfg.model_dump())

    def check_health(self) -> None:
        self.runner.check_health()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metrics (app/autoscaling.py): items in the replica and queue wait p99."""
        cut = time.monotonic() - 5.0
        while self._recent_waits and self._recent_waits[0][0] < cut:
            self._recent_waits.popleft()
        waits = sorted(w for _, w in self._recent_waits)
        p99 = percentile(waits, 99) if waits else 0.0
        return {"queued_items": float(self._pending_items), "queue_wait_p99_ms": p99}

    # ------------------------------------------------------------------ handle methods

    async def ready(self) -> bool:
        return True

    async def engine_address(self) -> dict[str, Any]:
        """Where an ingress replica links to this replica directly (app/engine_link.py); the secret
        travels only through the handle, inside the Ray cluster."""
        port = await self._listener.start()
        return {"host": ray.util.get_node_ip_address(), "port": port, "secret": self._listener.secret.hex(),
                "engine": self._served_by[0]}

    async def describe(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "task": self.spec.task,
            "replica": self._served_by[0],
            **self.runner.describe(),
            "batching": self._batching.model_dump(),
            "plan": self.plan.as_dict(),
            "max_seq_len": self.spec.max_seq_len,
            "limits": self.spec.limits.model_dump(),
        }

    async def infer(self, inputs: ModelInput) -> InferenceResult:
        if inputs.token_ids is not None:
            for i, row in enumerate(inputs.token_ids):
                bad = max(row)
                if bad >= self.model_vocab:
                    raise InvalidInput(
                        f"input 'input_ids'[{i}] holds token id {bad}; model {self.spec.name!r} has {self.model_vocab}"
                    )
        if inputs.requests == 1:  # merged requests were each checked at the ingress (app/gather.py)
            check_token_budget(inputs, self.spec, self.encoder)
        if self._batching.adaptive and self._adapt_task is None:
            self._adapt_task = asyncio.get_running_loop().create_task(self._adapt_loop())
        arrived = time.perf_counter()
        self._pending_items += len(inputs)
        # Chunk to the batcher's current cap (the controller may have lowered it below the config).
        entries = [BatchEntry(c, arrived) for c in inputs.split(self._batched._get_max_batch_size())]
        for _ in entries:
            self.metrics.enqueued()
        try:
            if len(entries) == 1:
                results = [await self._batched(entries[0])]
            else:
                results = await asyncio.gather(*(self._batched(e) for e in entries))
        finally:
            # A cancelled or failed request leaves the queue without its batch ever starting.
            self.metrics.dequeued(sum(1 for e in entries if not e.started))
            self._pending_items -= len(inputs)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        self.metrics.request_served(inputs.requests)
        done = time.perf_counter()
        self._window.request(done, (done - arrived) * 1000.0, len(inputs))
        return InferenceResult(
            outputs=results[0].outputs if len(results) == 1 else np.concatenate([r.outputs for r in results]),
            batch_size=max(r.batch_size for r in results),
            queue_wait_ms=max(r.queue_wait_ms for r in results),
            batch_ms=max(r.batch_ms for r in results),
            replica=self._served_by[0],
            node=self._served_by[1],
        )

    # ------------------------------------------------------------------ batching

    def _make_batcher(self, cfg: BatchingConfig):
        # Serve closes batches and hands each to the coalescer at once (many may be in flight);
        # the coalescer runs `max_concurrent_batches` device batches at a time, each merging what
        # Serve closed meanwhile (app/coalesce.py says why).
        self._coalescer = BatchCoalescer(self._run_batch, count_items, lambda: self._batched._get_max_batch_size(),
                                         slots=cfg.max_concurrent_batches)
        return serve.batch(
            max_batch_size=cfg.max_batch_size,
            batch_wait_timeout_s=cfg.batch_wait_timeout_s,
            max_concurrent_batches=_SERVE_BATCHES_IN_FLIGHT,
            batch_size_fn=count_items,
        )(self._serve_batch)

    async def _serve_batch(self, entries: list[BatchEntry]) -> list[_ChunkResult | ServingError]:
        return await self._coalescer.submit(entries)

    async def _run_batch(self, entries: list[BatchEntry]) -> list[_ChunkResult | ServingError]:
        started = time.perf_counter()
        for e in entries:
            e.started = True
        self.metrics.dequeued(len(entries))
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, self._compute_isolated, entries, started)
        if self._oom_cap is not None:
            self._apply_oom_cap()
        items = count_items(entries)
        duration_s = time.perf_counter() - started
        waits_ms = [(started - e.arrived_s) * 1000.0 for e in entries]
        now = time.monotonic()
        self._recent_waits.extend((now, w) for w in waits_ms)
        self.metrics.batch_done(items, duration_s * 1000.0, waits_ms)
        self._window.batch(time.perf_counter(), items / max(self._batched._get_max_batch_size(), 1), duration_s)
        return results

    async def _adapt_loop(self, period_s: float = 1.0) -> None:
        """Adaptive batching: every period, feed the last window to the controller and apply it."""
        while self._batching.adaptive:
            await asyncio.sleep(period_s)
            cfg = self._batching
            ctl = ControllerConfig(
                target_p99_ms=cfg.target_p99_ms, max_wait_s=cfg.max_wait_s,
                cap_batch_size=cfg.max_batch_size,  # already bounded by memory
            )
            state = BatchingState(self._batched._get_batch_wait_timeout_s(), self._batched._get_max_batch_size())
            decision = step(ctl, state, self._window.observe(time.perf_counter()))
            if decision.state != state:
                self._batched.set_batch_wait_timeout_s(decision.state.wait_s)
                self._batched.set_max_batch_size(decision.state.max_batch_size)
                self.metrics.batching(decision.state.wait_s, decision.state.max_batch_size)
                logger.info("model %s adaptive batching: %s", self.spec.name, decision.reason)
                # Judge the next step on traffic served under the new setting only.
                self._window = Window()
        self._adapt_task = None

    def _apply_oom_cap(self) -> None:
        """A batch ran out of device memory: lower the batch cap to what fit (until an operator retunes)."""
        cap, self._oom_cap = self._oom_cap, None
        if cap is None or cap >= self._batched._get_max_batch_size():
            return
        self.memory_max_batch_size = min(self.memory_max_batch_size, cap)
        self._batching = self._batching.model_copy(update={"max_batch_size": cap})
        self._batched.set_max_batch_size(cap)
        self.metrics.batching(self._batched._get_batch_wait_timeout_s(), cap)
        logger.warning("model %s: out of device memory; batch cap lowered to %d", self.spec.name, cap)

    def _compute_isolated(self, entries: list[BatchEntry], started: float) -> list[_ChunkResult | ServingError]:
        """Run the batch; if it fails, bisect so each failing entry fails alone. Out of device
        memory: split the batch (down to single items), retry the halves, remember the size that fit."""
        try:
            return self._compute(entries, started)
        except DeviceLost as e:
            # Not the input's fault and not retryable here: every entry gets a 503 at once (no
            # bisection) while the failing health check gets this replica replaced.
            logger.error("model %s: %s; failing the batch, replica to be replaced", self.spec.name, e)
            failure = ReplicaUnavailable(f"model {self.spec.name!r}: {e}; the replica is being replaced, retry shortly")
            return [failure for _ in entries]
        except torch.OutOfMemoryError:
            items = count_items(entries)
            if self._device_is_cuda():
                torch.cuda.empty_cache()
            if items <= 1:
                logger.error("model %s: out of device memory on a single item", self.spec.name)
                return [ModelFailure(f"model {self.spec.name!r} ran out of device memory on one item")]
            self._oom_cap = min(self._oom_cap or items, max(1, items // 2))
            logger.warning("model %s: out of device memory on a batch of %d items; retrying in halves",
                           self.spec.name, items)
            if len(entries) > 1:
                mid = len(entries) // 2
                return self._compute_isolated(entries[:mid], started) + self._compute_isolated(entries[mid:], started)
            return [self._compute_split_entry(entries[0], started)]
        except Exception as e:  # noqa: BLE001 - isolated below, reported per entry
            if len(entries) == 1:
                logger.exception("model %s failed on one request", self.spec.name)
                return [ModelFailure(f"model {self.spec.name!r} failed on this input: {type(e).__name__}: {e}")]
            mid = len(entries) // 2
            return self._compute_isolated(entries[:mid], started) + self._compute_isolated(entries[mid:], started)

    def _compute_split_entry(self, entry: BatchEntry, started: float) -> _ChunkResult | ServingError:
        """One request's items in two halves (after running out of memory on all of them at once)."""
        n = len(entry.inputs)
        parts = [self._compute_isolated([BatchEntry(c, entry.arrived_s, True)], started)[0]
                 for c in entry.inputs.split((n + 1) // 2)]
        for p in parts:
            if isinstance(p, ServingError):
                return p
        done = [p for p in parts if isinstance(p, _ChunkResult)]
        return _ChunkResult(np.concatenate([p.outputs for p in done]), max(p.batch_size for p in done),
                            done[0].queue_wait_ms, max(p.batch_ms for p in done))

    def _device_is_cuda(self) -> bool:
        return getattr(getattr(self.runner, "device", None), "type", None) == "cuda"

    def _compute(self, entries: list[BatchEntry], started: float) -> list[_ChunkResult | ServingError]:
        faults = self.spec.faults
        if faults.batch_delay_s:
            time.sleep(faults.batch_delay_s)
        if faults.fail_on_text is not None and any(
            faults.fail_on_text in (e.inputs.texts or ()) for e in entries
        ):
            raise RuntimeError("injected fault (faults.fail_on_text)")
        if faults.oom_above_items is not None and count_items(entries) > faults.oom_above_items:
            raise torch.OutOfMemoryError(f"injected fault (faults.oom_above_items={faults.oom_above_items})")
        rows = self.encoder.encode([e.inputs for e in entries])
        groups = [rows] if self.batch_tokens is None else token_budget_groups(rows, self.batch_tokens)
        outputs = torch.cat([self.runner.infer(*collate(group, self.encoder.pad_id)) for group in groups])
        parts = split_rows(outputs, [len(e.inputs) for e in entries])
        n = len(rows)
        batch_ms = (time.perf_counter() - started) * 1000.0
        return [
            _ChunkResult(p.numpy(), n, (started - e.arrived_s) * 1000.0, batch_ms) for p, e in zip(parts, entries)
        ]

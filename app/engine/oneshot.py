"""Request/response serving for one model: a request's items are chunked to the batch cap, queued
(through `enqueue`, Serve's batch queue in production), run by the device batcher, and put back
together. Also keeps what the autoscaler and the adaptive controller read: items in the replica,
recent queue waits, the window of completed requests and batches."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, Optional, Protocol

import numpy as np

from app.adaptive import Window
from app.batching import BatchEntry, count_items
from app.config import BatchingConfig
from app.engine.batcher import BeforeBatch, ChunkResult, DeviceBatcher
from app.engine.control import BatchControl
from app.errors import Overloaded
from app.quantiles import percentile
from app.runners.base import ModelRunner
from app.tracing import Tracer, trace_id_of
from app.requests import InferenceResult, ModelInput

logger = logging.getLogger("ray.serve")

Enqueue = Callable[[BatchEntry], Awaitable[ChunkResult]]


class EngineObserver(Protocol):
    """What the engine reports (app/metrics.py's ModelServerMetrics in production)."""

    def enqueued(self) -> None: ...
    def dequeued(self, n: int = 1) -> None: ...
    def batch_done(self, items: int, duration_ms: float, waits_ms: list[float]) -> None: ...
    def request_served(self, requests: int = 1) -> None: ...
    def batching(self, wait_s: float, max_batch_size: int) -> None: ...


@dataclass(frozen=True)
class BulkPolicy:
    """The bulk class in one replica (app/config TrafficOptions, resolved)."""

    max_ongoing_requests: int  # bulk requests held at once; past it bulk gets 503, realtime still gets in
    batch_items: int  # items of one bulk chunk, and of a device batch of bulk alone


class OneShotEngine:
    def __init__(self, name: str, runner: ModelRunner, encoder, batching: BatchingConfig, memory_limit: int,
                 observer: EngineObserver, batch_tokens: Optional[int] = None,
                 before_batch: Optional[BeforeBatch] = None, served_by: tuple[str, str] = ("", ""),
                 executor: Optional[ThreadPoolExecutor] = None, max_queue_wait_ms: Optional[float] = None,
                 bulk: Optional[BulkPolicy] = None, version: str = "1", tracer: Optional[Tracer] = None):
        self.name = name
        self.version = version
        self.tracer = tracer
        self.bulk = bulk or BulkPolicy(max_ongoing_requests=1 << 30, batch_items=batching.max_batch_size)
        self.observer = observer
        self.served_by = served_by  # (replica id, node id) stamped on every result
        self.control = BatchControl(name, batching, memory_limit)
        self.control.listen(observer.batching)
        self.batcher = DeviceBatcher(name, runner, encoder, lambda: self.control.max_batch_size,
                                     self.control.config.max_concurrent_batches, batch_tokens, before_batch,
                                     executor, bulk_items=self.bulk_items)
        if served_by[0]:
            self.batcher.batch_prefix = served_by[0]
        self.batcher.on_start = lambda entries: observer.dequeued(len(entries))
        self.batcher.on_batch = self._batch_done
        self.pending_items = 0  # items received and not yet answered (queued + running)
        self.bulk_requests = 0  # bulk requests received and not yet answered
        self._recent_waits: deque[tuple[float, float]] = deque()  # (time, queue wait ms) for autoscaling
        self._window = Window()
        self._adapt_task: Optional[asyncio.Task] = None
        self.max_queue_wait_ms = max_queue_wait_ms
        self._recent_batches: deque[tuple[float, int, float]] = deque()  # (time, items, seconds)

    def retune(self, user_config: Optional[dict]) -> None:
        old = self.control.retune(user_config)
        if self.control.config.max_concurrent_batches != old.max_concurrent_batches:
            self.batcher.resize(self.control.config.max_concurrent_batches)

    def bulk_items(self) -> int:
        return max(1, min(self.bulk.batch_items, self.control.max_batch_size))

    async def infer(self, inputs: ModelInput, enqueue: Enqueue, enqueue_bulk: Optional[Enqueue] = None) -> InferenceResult:
        """One request's result. `enqueue_bulk` is the bulk class's queue (default: `enqueue`)."""
        if self.control.config.adaptive and self._adapt_task is None:
            self._adapt_task = asyncio.get_running_loop().create_task(self._adapt_loop())
        bulk = inputs.traffic_class == "bulk"
        if bulk:
            if self.bulk_requests >= self.bulk.max_ongoing_requests:
                raise Overloaded(f"model {self.name!r} holds {self.bulk_requests} bulk requests, its bulk limit; "
                                 "retry shortly (realtime requests are still admitted)")
            enqueue = enqueue_bulk or enqueue
        if self.max_queue_wait_ms is not None:
            self._admit(len(inputs))
        arrived = time.perf_counter()
        self.pending_items += len(inputs)
        self.bulk_requests += bulk
        # Chunked to the cap in force (the adaptive controller may have lowered it below the config);
        # bulk to its own, smaller batches (coalesce.py says why).
        entries = [BatchEntry(c, arrived) for c in inputs.split(self.bulk_items() if bulk else self.control.max_batch_size)]
        for _ in entries:
            self.observer.enqueued()
        try:
            if len(entries) == 1:
                results = [await enqueue(entries[0])]
            else:
                results = await asyncio.gather(*(enqueue(e) for e in entries))
        finally:
            # A cancelled or failed request leaves the queue without its batch ever starting.
            self.observer.dequeued(sum(1 for e in entries if not e.started))
            self.pending_items -= len(inputs)
            self.bulk_requests -= bulk
        for r in results:
            if isinstance(r, BaseException):
                raise r
        self.observer.request_served(inputs.requests)
        done = time.perf_counter()
        self._window.request(done, (done - arrived) * 1000.0, len(inputs))
        return InferenceResult(
            outputs=results[0].outputs if len(results) == 1 else np.concatenate([r.outputs for r in results]),
            batch_size=max(r.batch_size for r in results),
            queue_wait_ms=max(r.queue_wait_ms for r in results),
            batch_ms=max(r.batch_ms for r in results),
            replica=self.served_by[0],
            node=self.served_by[1],
            batch_id=entries[-1].batch_id,
        )

    def items_per_s(self, span_s: float = 5.0) -> Optional[float]:
        """What the device has been computing while busy, over the last span (None: no batch yet)."""
        cut = time.monotonic() - span_s
        while self._recent_batches and self._recent_batches[0][0] < cut:
            self._recent_batches.popleft()
        busy = sum(s for _, _, s in self._recent_batches)
        if busy <= 0:
            return None
        return sum(n for _, n, _ in self._recent_batches) / busy * self.batcher.slots

    def _admit(self, items: int) -> None:
        """503 at once for a request whose predicted queue wait exceeds the budget."""
        if self.pending_items == 0:
            return  # nothing ahead of it: it starts with the next batch
        rate = self.items_per_s()
        if rate is None:
            return
        wait_ms = self.pending_items / rate * 1000.0
        if wait_ms > self.max_queue_wait_ms:
            raise Overloaded(f"model {self.name!r} would queue this request for ~{wait_ms:.0f} ms "
                             f"(limit {self.max_queue_wait_ms:.0f} ms); retry shortly")

    def _batch_done(self, entries: list[BatchEntry], started: float, took_s: float) -> None:
        """On the event loop after each device batch: stats, and the cap an OOM left behind."""
        if self.batcher.oom_cap is not None:
            cap, self.batcher.oom_cap = self.batcher.oom_cap, None
            self.control.lower_for_oom(cap)
        items = count_items(entries)
        waits_ms = [(started - e.arrived_s) * 1000.0 for e in entries]
        now = time.monotonic()
        self._recent_waits.extend((now, w) for w in waits_ms)
        self._recent_batches.append((now, items, took_s))
        while self._recent_batches[0][0] < now - 5.0:
            self._recent_batches.popleft()
        self.observer.batch_done(items, took_s * 1000.0, waits_ms)
        self._trace_batch(entries, items, took_s)
        self._window.batch(time.perf_counter(), items / max(self.control.max_batch_size, 1), took_s)

    def _trace_batch(self, entries: list[BatchEntry], items: int, took_s: float) -> None:
        """The batch's log line (each request's id, trace id and class) and its span, linked to
        every request's span (app/tracing.py)."""
        if not entries:
            return
        batch_id = entries[0].batch_id
        traced = [e.inputs for e in entries]
        logger.info("batch %s model=%s version=%s items=%d ms=%.1f requests=%s", batch_id, self.name, self.version,
                    items, took_s * 1000.0,
                    " ".join(f"{i.request_id or '-'}/{trace_id_of(i.traceparent) or '-'}/{i.traffic_class}" for i in traced))
        if self.tracer is not None:
            end = time.time_ns()
            span = self.tracer.batch_span(f"batch {self.name}", [i.traceparent for i in traced],
                                          {"batch.id": batch_id, "batch.items": items, "model": self.name,
                                           "model.version": self.version}, start_time=end - int(took_s * 1e9))
            span.end(end_time=end)

    def autoscaling_stats(self, span_s: float = 5.0) -> dict[str, float]:
        """Items in the replica and the queue wait p99 of the last span (app/autoscaling.py)."""
        cut = time.monotonic() - span_s
        while self._recent_waits and self._recent_waits[0][0] < cut:
            self._recent_waits.popleft()
        waits = sorted(w for _, w in self._recent_waits)
        return {"queued_items": float(self.pending_items), "queue_wait_p99_ms": percentile(waits, 99) if waits else 0.0}

    async def _adapt_loop(self, period_s: float = 1.0) -> None:
        """Adaptive batching: every period, feed the last window to the controller."""
        while self.control.config.adaptive:
            await asyncio.sleep(period_s)
            if self.control.adapt(self._window.observe(time.perf_counter())):
                self._window = Window()  # judge the next step on traffic under the new setting only
        self._adapt_task = None

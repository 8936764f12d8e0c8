"""Device batches for one model: formed when a runner slot frees up, run on the batch executor,
failures isolated.

Serve's `@serve.batch` (in the shell) decides which requests queue together; each batch it closes
goes to `run`, which merges whatever closed while the device was busy (`coalesce.py` says why) and
runs `slots` device batches at a time. A batch that raises is bisected so each failing entry fails
alone; out of device memory, it is split (down to single items) and the size that fit is reported
so the cap comes down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from app.batching import BatchEntry, collate, count_items, split_rows, token_budget_groups
from app.engine.coalesce import BatchCoalescer
from app.errors import ModelFailure, ReplicaUnavailable, ServingError
from app.runners.base import DeviceLost, ModelRunner

logger = logging.getLogger("ray.serve")

BeforeBatch = Callable[[list[BatchEntry]], None]  # runs on the executor before a batch (fault drills)


# How much lower the bulk lane's threads run (Linux nice; CFS then gives a nice-10 thread about a
# tenth of a contended core): bulk gets the cycles realtime work leaves, and keeps a share.
BULK_NICE = 10
ONE_LANE_ENV = "BATCHSERVE_ONE_LANE"


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BULK_NICE)  # this thread only (Linux)
    except (AttributeError, OSError):  # not Linux: the lanes still split, without the priority
        pass


def _bulk_executor(slots: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=slots, thread_name_prefix="bulk-lane", initializer=_lower_priority)


@dataclass
class ChunkResult:
    outputs: np.ndarray
    batch_size: int
    queue_wait_ms: float
    batch_ms: float


class DeviceBatcher:
    def __init__(self, name: str, runner: ModelRunner, encoder, max_items: Callable[[], int], slots: int,
                 batch_tokens: Optional[int] = None, before_batch: Optional[BeforeBatch] = None,
                 executor: Optional[ThreadPoolExecutor] = None, bulk_items: Optional[Callable[[], int]] = None):
        self.name = name
        self.runner = runner
        self.encoder = encoder  # .encode(list[ModelInput]) -> id rows, .pad_id
        self.batch_tokens = batch_tokens  # padded tokens one device batch may hold (None: no budget)
        self._before_batch = before_batch
        self._max_items = max_items
        self._bulk_items = bulk_items
        # Two lanes (realtime, bulk) where the runner takes concurrent calls (coalesce.py);
        # BATCHSERVE_ONE_LANE=1 (runtime_env) turns them off, for bench/traffic_classes.py's A/B.
        self.lanes = runner.concurrent_calls and os.environ.get(ONE_LANE_ENV) != "1"
        self.slots = slots
        self.batch_prefix = name  # batch ids are <prefix>-<n>: the engine makes it the replica's id
        self._batches = 0
        # Every torch call of the model runs on these threads: each thread entering an OpenMP
        # region gets its own busy-waiting team, and a second team (the event loop's) made CPU
        # batches ~1.8x slower on 2 cores.
        self.executor = executor or ThreadPoolExecutor(max_workers=slots)
        self.bulk_executor = _bulk_executor(slots)
        self._coalescer = self._new_coalescer()
        self.oom_cap: Optional[int] = None  # the size that fit, after a batch ran out of memory
        # Hooks on the event loop: a device batch starts (entries), and ends (entries, start, seconds).
        self.on_start: Callable[[list[BatchEntry]], None] = lambda entries: None
        self.on_batch: Callable[[list[BatchEntry], float, float], None] = lambda entries, started, took_s: None

    def resize(self, slots: int) -> None:
        """A new number of concurrent device batches: a fresh executor and merger take new batches;
        batches already handed to the old ones finish there."""
        self.slots = slots
        self.executor = ThreadPoolExecutor(max_workers=slots)
        self.bulk_executor = _bulk_executor(slots)
        self._coalescer = self._new_coalescer()

    def _new_coalescer(self) -> BatchCoalescer:
        return BatchCoalescer(self._run_device_batch, count_items, self._max_items, slots=self.slots,
                              bulk_items=self._bulk_items, lanes=self.lanes)

    async def run(self, entries: list[BatchEntry], bulk: bool = False) -> list[ChunkResult | ServingError]:
        """Results for a batch Serve closed, in order, once a device batch holding it has run
        (bulk batches after realtime ones: coalesce.py)."""
        return await self._coalescer.submit(entries, bulk)

    async def _run_device_batch(self, entries: list[BatchEntry], bulk_lane: bool = False) -> list[ChunkResult | ServingError]:
        started = time.perf_counter()
        self._batches += 1
        batch_id = f"{self.batch_prefix}-{self._batches}"
        for e in entries:
            e.started = True
            e.batch_id = batch_id
        self.on_start(entries)
        loop = asyncio.get_running_loop()
        executor = self.bulk_executor if bulk_lane else self.executor
        results = await loop.run_in_executor(executor, self.compute_isolated, entries, started)
        self.on_batch(entries, started, time.perf_counter() - started)
        return results

    def compute_isolated(self, entries: list[BatchEntry], started: float) -> list[ChunkResult | ServingError]:
        """Run the batch; if it fails, bisect so each failing entry fails alone. Out of device
        memory: split the batch (down to single items), retry the halves, remember the size that fit."""
        try:
            return self._compute(entries, started)
        except DeviceLost as e:
            # Not the input's fault and not retryable here: every entry gets a 503 at once (no
            # bisection) while the failing health check gets this replica replaced.
            logger.error("model %s: %s; failing the batch, replica to be replaced", self.name, e)
            failure = ReplicaUnavailable(f"model {self.name!r}: {e}; the replica is being replaced, retry shortly")
            return [failure for _ in entries]
        except torch.OutOfMemoryError:
            items = count_items(entries)
            self.runner.release_cached_memory()
            if items <= 1:
                logger.error("model %s: out of device memory on a single item", self.name)
                return [ModelFailure(f"model {self.name!r} ran out of device memory on one item")]
            self.oom_cap = min(self.oom_cap or items, max(1, items // 2))
            logger.warning("model %s: out of device memory on a batch of %d items; retrying in halves",
                           self.name, items)
            if len(entries) > 1:
                return self._bisect(entries, started)
            return [self._compute_split_entry(entries[0], started)]
        except Exception as e:  # noqa: BLE001 - isolated below, reported per entry
            if len(entries) == 1:
                logger.exception("model %s failed on one request", self.name)
                return [ModelFailure(f"model {self.name!r} failed on this input: {type(e).__name__}: {e}")]
            return self._bisect(entries, started)

    def _bisect(self, entries: list[BatchEntry], started: float) -> list[ChunkResult | ServingError]:
        mid = len(entries) // 2
        return self.compute_isolated(entries[:mid], started) + self.compute_isolated(entries[mid:], started)

    def _compute_split_entry(self, entry: BatchEntry, started: float) -> ChunkResult | ServingError:
        """One request's items in two halves (after running out of memory on all of them at once)."""
        n = len(entry.inputs)
        parts = [self.compute_isolated([BatchEntry(c, entry.arrived_s, True)], started)[0]
                 for c in entry.inputs.split((n + 1) // 2)]
        for p in parts:
            if isinstance(p, ServingError):
                return p
        done = [p for p in parts if isinstance(p, ChunkResult)]
        return ChunkResult(np.concatenate([p.outputs for p in done]), max(p.batch_size for p in done),
                           done[0].queue_wait_ms, max(p.batch_ms for p in done))

    def _compute(self, entries: list[BatchEntry], started: float) -> list[ChunkResult | ServingError]:
        if self._before_batch is not None:
            self._before_batch(entries)
        rows = self.encoder.encode([e.inputs for e in entries])
        groups = [rows] if self.batch_tokens is None else token_budget_groups(rows, self.batch_tokens)
        outputs = torch.cat([self.runner.infer(*collate(group, self.encoder.pad_id)) for group in groups])
        parts = split_rows(outputs, [len(e.inputs) for e in entries])
        n = len(rows)
        batch_ms = (time.perf_counter() - started) * 1000.0
        return [ChunkResult(p.numpy(), n, (started - e.arrived_s) * 1000.0, batch_ms) for p, e in zip(parts, entries)]

"""Every metric of the service, in one place.

Exported through Ray's Prometheus endpoint (`ray.serve.metrics`, which adds deployment, replica and
application tags); Prometheus sees them as `ray_batchserve_*`. Ray Serve's own `serve_*` metrics
(HTTP request counts and latencies at the proxy, replica queue lengths, `serve_batch_*`) complement
these and are not duplicated here. GPU figures come from NVML and are absent on a CPU machine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Optional

from ray.serve import metrics as serve_metrics

from app.config import CostConfig, ModelSpec
from app.planner import ParallelPlan

logger = logging.getLogger("ray.serve")

PREFIX = "batchserve_"
LATENCY_BUCKETS_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def outcome_of(status: int) -> str:
    """What happened to a request, by its status: served, shed (429/503: over capacity or a replica
    being replaced, retry later), timed out (408/504), cancelled by its client (499: it went away
    first), refused as the client's mistake (other 4xx), or failed on our side (other 5xx)."""
    if status < 400:
        return "ok"
    if status in (429, 503):
        return "shed"
    if status in (408, 504):
        return "timeout"
    if status == 499:
        return "client_cancel"
    return "client_error" if status < 500 else "server_error"


class IngressMetrics:
    """What the HTTP ingress sees: every request, its route, its outcome and its latency.

    Request counts are summed in the replica and added to the Ray counter by a flush thread every
    `flush_period_s` (a Ray metric update costs ~5 % of a replica's CPU at 1,500 req/s; Ray exports
    every ~10 s anyway). Latencies go to the histogram per request: Ray has no bulk observe."""

    def __init__(self, flush_period_s: float = 1.0) -> None:
        self.requests = serve_metrics.Counter(
            PREFIX + "requests", description="HTTP requests by model, route, outcome, version and traffic class.",
            tag_keys=("model", "route", "outcome", "version", "traffic_class"),
        )
        self.latency = serve_metrics.Histogram(
            PREFIX + "request_latency_ms", description="End-to-end latency at the ingress (ms).",
            boundaries=LATENCY_BUCKETS_MS, tag_keys=("model", "route", "version", "traffic_class"),
        )
        self._counts: dict[tuple[str, str, str, str, str], int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._period = flush_period_s
        threading.Thread(target=self._flush_loop, name="ingress-metrics-flush", daemon=True).start()

    def record(self, model: str, route: str, status: int, latency_ms: float, version: str = "-",
               traffic_class: str = "-") -> None:
        key = (model, route, outcome_of(status), version, traffic_class)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1
        self.latency.observe(latency_ms, tags={"model": model, "route": route, "version": version,
                                               "traffic_class": traffic_class})

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {}
        for (model, route, outcome, version, cls), n in counts.items():
            self.requests.inc(n, tags={"model": model, "route": route, "outcome": outcome, "version": version,
                                       "traffic_class": cls})

    def _flush_loop(self) -> None:
        while not self._stop.wait(self._period):
            self.flush()

    def stop(self) -> None:
        self._stop.set()
        self.flush()


# ----------------------------------------------------------------------------------------------
# Cost
# ----------------------------------------------------------------------------------------------


def replica_hourly_cost_usd(spec: ModelSpec, plan: ParallelPlan, cost: CostConfig) -> float:
    """Price of the devices one replica holds, per hour (GPUs and CPUs priced separately)."""
    d = spec.deployment
    gpu_kind = spec.parallel.devices.kind == "gpu" and spec.device != "cpu"
    if spec.task == "generate" and plan.strategy != "replicated":
        # A generator gang of plan.devices ranks (tp, pp or tp x pp), the replica its rank 0.
        gpus = plan.devices if gpu_kind else 0
        cpus = plan.devices * spec.parallel.rank_num_cpus
    elif plan.strategy == "deepspeed_tp":
        gpus = plan.tp if gpu_kind else 0
        cpus = d.num_cpus + plan.tp * spec.parallel.rank_num_cpus  # the replica drives tp ranks beside it
    elif plan.strategy == "fairscale_pp":
        gpus = plan.pp if gpu_kind else 0
        cpus = d.num_cpus
    else:
        gpus, cpus = d.num_gpus, d.num_cpus
    return gpus * cost.gpu_hour_usd + cpus * cost.cpu_hour_usd


class CostWindow:
    """Cost per 1000 requests over a sliding window: the device-seconds a replica held in the window,
    priced, divided by the requests it served in the same window."""

    def __init__(self, hourly_usd: float, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.hourly_usd = hourly_usd
        self.window_s = window_s
        self.clock = clock
        self.started = clock()
        self._served: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def served(self, n: int = 1) -> None:
        with self._lock:
            self._served.append((self.clock(), n))

    def per_1k_requests(self) -> Optional[float]:
        now = self.clock()
        span = min(self.window_s, now - self.started)
        with self._lock:
            while self._served and self._served[0][0] < now - self.window_s:
                self._served.popleft()
            n = sum(k for _, k in self._served)
        if n == 0 or span <= 0:
            return None
        return 1000.0 * self.hourly_usd * span / 3600.0 / n


# ----------------------------------------------------------------------------------------------
# GPU utilisation and memory (NVML)
# ----------------------------------------------------------------------------------------------


def nvml_handles(device_ids: list[str]) -> list[tuple[str, object]]:
    """NVML handles of the given physical GPUs (Ray's ids); empty when NVML or GPUs are missing."""
    if not device_ids:
        return []
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver or no library: no GPU metrics, nothing else changes
        return []
    out = []
    for dev in device_ids:
        try:
            handle = (pynvml.nvmlDeviceGetHandleByUUID(dev) if not dev.isdigit()
                      else pynvml.nvmlDeviceGetHandleByIndex(int(dev)))
            out.append((dev, handle))
        except Exception:  # noqa: BLE001
            logger.warning("NVML cannot open GPU %s; no metrics for it", dev)
    return out


class ModelServerMetrics:
    """What a model server replica sees: queue, batches, GPU and cost. A daemon thread samples the
    gauges that change without requests (GPU, cost) every `sample_period_s`."""

    def __init__(self, spec: ModelSpec, plan: ParallelPlan, cost: CostConfig, gpu_ids: list[str],
                 sample_period_s: float = 1.0):
        tags = ("model", "strategy")
        self._tags = {"model": spec.name, "strategy": plan.strategy}
        self.queue_wait = serve_metrics.Histogram(
            PREFIX + "queue_wait_ms", description="Arrival at the replica to batch start (ms).",
            boundaries=LATENCY_BUCKETS_MS, tag_keys=tags)
        self.batch_size = serve_metrics.Histogram(
            PREFIX + "batch_size", description="Items per executed batch.", boundaries=BATCH_SIZE_BUCKETS,
            tag_keys=tags)
        self.batch_duration = serve_metrics.Histogram(
            PREFIX + "batch_duration_ms", description="Batch execution time: tokenise + forward (ms).",
            boundaries=LATENCY_BUCKETS_MS, tag_keys=tags)
        self.items = serve_metrics.Counter(
            PREFIX + "items", description="Items (texts) inferred.", tag_keys=tags)
        self.queue_depth = serve_metrics.Gauge(
            PREFIX + "queue_depth", description="Requests waiting in this replica for a batch.", tag_keys=tags)
        self.cost_per_1k = serve_metrics.Gauge(
            PREFIX + "cost_per_1k_requests_usd",
            description="Device cost per 1000 requests over a sliding window (USD).", tag_keys=tags)
        self.cost_total = serve_metrics.Counter(
            PREFIX + "cost_usd", description="Device cost accrued by the replica (USD).", tag_keys=tags)
        self.batch_wait = serve_metrics.Gauge(
            PREFIX + "batch_wait_ms", description="Current batch wait (the adaptive controller moves it).",
            tag_keys=tags)
        self.max_batch = serve_metrics.Gauge(
            PREFIX + "max_batch_size", description="Current batch cap (config, memory and controller).",
            tag_keys=tags)
        self.cost = CostWindow(replica_hourly_cost_usd(spec, plan, cost), cost.window_s)
        self._depth = 0
        self._depth_lock = threading.Lock()
        self._gpus = nvml_handles(gpu_ids)
        if self._gpus:
            self.gpu_util = serve_metrics.Gauge(
                PREFIX + "gpu_utilization_percent", description="NVML GPU utilisation (share of time a kernel ran).",
                tag_keys=tags + ("device",))
            self.gpu_mem = serve_metrics.Gauge(
                PREFIX + "gpu_memory_used_bytes", description="NVML GPU memory in use.", tag_keys=tags + ("device",))
        self.queue_depth.set(0, tags=self._tags)
        self._period = sample_period_s
        self._stop = threading.Event()
        threading.Thread(target=self._sample_loop, name="metrics-sampler", daemon=True).start()

    # ------------------------------------------------------------------ per request / batch

    def enqueued(self) -> None:
        # Only the count moves per request; the gauge is published by the sampler (a Ray metric
        # update per request cost ~5 % of a replica's CPU at 1,500 req/s).
        with self._depth_lock:
            self._depth += 1

    def dequeued(self, n: int = 1) -> None:
        with self._depth_lock:
            self._depth = max(0, self._depth - n)

    def batch_done(self, items: int, duration_ms: float, waits_ms: list[float]) -> None:
        self.batch_size.observe(items, tags=self._tags)
        self.batch_duration.observe(duration_ms, tags=self._tags)
        self.items.inc(items, tags=self._tags)
        for w in waits_ms:
            self.queue_wait.observe(w, tags=self._tags)

    def request_served(self, requests: int = 1) -> None:
        self.cost.served(requests)

    def batching(self, wait_s: float, max_batch_size: int) -> None:
        self.batch_wait.set(wait_s * 1000.0, tags=self._tags)
        self.max_batch.set(max_batch_size, tags=self._tags)

    # ------------------------------------------------------------------ sampled gauges

    def _sample_loop(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self._period):
            now = time.monotonic()
            self.cost_total.inc(self.cost.hourly_usd * (now - last) / 3600.0, tags=self._tags)
            last = now
            with self._depth_lock:
                depth = self._depth
            self.queue_depth.set(depth, tags=self._tags)
            per_1k = self.cost.per_1k_requests()
            if per_1k is not None:
                self.cost_per_1k.set(per_1k, tags=self._tags)
            self._sample_gpus()
            self._sample_more()

    def _sample_more(self) -> None:
        """Gauges a subclass samples beside these (GenerationMetrics)."""

    def _sample_gpus(self) -> None:
        if not self._gpus:
            return
        import pynvml

        for dev, handle in self._gpus:
            try:
                util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle).used
            except Exception:  # noqa: BLE001 - a transient NVML error skips one sample
                continue
            self.gpu_util.set(util, tags={**self._tags, "device": dev})
            self.gpu_mem.set(mem, tags={**self._tags, "device": dev})

    def stop(self) -> None:
        self._stop.set()


TOKEN_LATENCY_BUCKETS_MS = [1, 2, 5, 10, 20, 30, 50, 75, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]


class GenerationMetrics(ModelServerMetrics):
    """A generator replica: what ModelServerMetrics has, plus time to first token, time per output
    token, token counters, running and waiting sequences, KV cache use, and cost per 1M generated
    tokens. `stats` is the engine's `stats()` (app/engine/generation.py), sampled each period."""

    def __init__(self, spec: ModelSpec, plan: ParallelPlan, cost: CostConfig, gpu_ids: list[str],
                 stats: Callable[[], object], sample_period_s: float = 1.0):
        tags = ("model", "strategy")
        self._stats = stats
        self.ttft = serve_metrics.Histogram(
            PREFIX + "time_to_first_token_ms", description="Arrival at the replica to the first generated token (ms).",
            boundaries=TOKEN_LATENCY_BUCKETS_MS, tag_keys=tags)
        self.itl = serve_metrics.Histogram(
            PREFIX + "time_per_output_token_ms", description="Time between a sequence's tokens (inter-token latency, ms).",
            boundaries=TOKEN_LATENCY_BUCKETS_MS, tag_keys=tags)
        self.prompt_tokens = serve_metrics.Counter(
            PREFIX + "prompt_tokens", description="Prompt tokens admitted.", tag_keys=tags)
        self.generated_tokens = serve_metrics.Counter(
            PREFIX + "generated_tokens", description="Tokens generated.", tag_keys=tags)
        self.running = serve_metrics.Gauge(
            PREFIX + "running_sequences", description="Sequences in the running batch.", tag_keys=tags)
        self.waiting = serve_metrics.Gauge(
            PREFIX + "waiting_sequences", description="Sequences admitted to the replica, waiting for a place in the batch.",
            tag_keys=tags)
        self.kv_used = serve_metrics.Gauge(
            PREFIX + "kv_cache_used_fraction", description="Share of the KV cache held by sequences.", tag_keys=tags)
        self.cost_per_1m_tokens = serve_metrics.Gauge(
            PREFIX + "cost_per_1m_generated_tokens_usd",
            description="Device cost per 1M generated tokens over a sliding window (USD).", tag_keys=tags)
        self.token_cost = CostWindow(replica_hourly_cost_usd(spec, plan, cost), cost.window_s)
        super().__init__(spec, plan, cost, gpu_ids, sample_period_s)

    def sequence_started(self, prompt_tokens: int, ttft_ms: float) -> None:
        self.prompt_tokens.inc(prompt_tokens, tags=self._tags)
        self.ttft.observe(ttft_ms, tags=self._tags)

    def tokens(self, n: int, since_last_ms: Optional[float]) -> None:
        self.generated_tokens.inc(n, tags=self._tags)
        self.token_cost.served(n)
        if since_last_ms is not None:
            # An event may carry several tokens (a step that produced more than one): each token's share.
            for _ in range(n):
                self.itl.observe(since_last_ms / n, tags=self._tags)

    def _sample_more(self) -> None:
        st = self._stats()
        self.running.set(st.running, tags=self._tags)
        self.waiting.set(st.waiting, tags=self._tags)
        self.kv_used.set(st.kv_used_fraction, tags=self._tags)
        per_1k = self.token_cost.per_1k_requests()
        if per_1k is not None:
            self.cost_per_1m_tokens.set(per_1k * 1000.0, tags=self._tags)

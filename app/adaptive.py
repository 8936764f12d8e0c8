"""Adaptive batching: steer the batch wait (and the batch size within its cap) to keep p99 under a
latency target while filling batches. A pure function of the observed window, so it is tested on
simulated latencies; the model server feeds it real ones and applies its decisions.

BentoML's adaptive batcher only drops requests that would miss their budget; this one steers, and
it first asks why p99 is high:
- the replica is saturated (busy most of the window): the queue is the cause, and bigger batches
  serve more per second, so lengthen the wait (double it) to fill them, then grow the cap; at the
  longest wait and the full cap it is over capacity: hold and leave it to the autoscaler;
- the replica has idle time: the wait itself is the cause, so halve it; at no wait, shrink the cap
  only if batches are large and their own run time is at least half the target (otherwise the time
  goes elsewhere, e.g. a CPU shared with the proxy, and smaller batches would only cost more);
- p99 well under the target (below `low_water` x target) and batches not full: lengthen the wait
  by a step, never past the time the current arrival rate needs to fill a batch; full batches grow
  the cap back toward its configured value;
- in between: hold. The band between `low_water` and 1.0 is the hysteresis that stops flapping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from app.quantiles import percentile


@dataclass(frozen=True)
class ControllerConfig:
    target_p99_ms: float
    min_wait_s: float = 0.0
    max_wait_s: float = 0.1
    wait_step_s: float = 0.002
    cap_batch_size: int = 32
    min_batch_size: int = 1
    low_water: float = 0.7
    full_fill: float = 0.9
    saturated_busy: float = 0.8


@dataclass(frozen=True)
class BatchingState:
    wait_s: float
    max_batch_size: int


@dataclass(frozen=True)
class Observation:
    p99_ms: float  # of requests completed in the window (arrival at the replica to answer)
    mean_fill: float  # mean batch size / max_batch_size over the window's batches
    arrival_rate_per_s: float  # items arriving per second in the window
    samples: int  # completed requests in the window
    busy: float = 0.0  # share of the window during which a batch was executing
    mean_batch_ms: float = 0.0  # mean run time of the window's batches


@dataclass(frozen=True)
class Decision:
    state: BatchingState
    reason: str


def step(cfg: ControllerConfig, state: BatchingState, obs: Observation, min_samples: int = 10) -> Decision:
    if obs.samples < min_samples or math.isnan(obs.p99_ms):
        return Decision(state, f"hold: {obs.samples} samples in the window")
    target = cfg.target_p99_ms
    if obs.p99_ms > target:
        if obs.busy >= cfg.saturated_busy:
            wait = min(cfg.max_wait_s, max(state.wait_s * 2, cfg.wait_step_s))
            if wait > state.wait_s + 1e-9:
                return Decision(replace(state, wait_s=wait), f"p99 {obs.p99_ms:.1f} ms > target {target:.0f}, replica "
                                f"{obs.busy:.0%} busy: fill bigger batches, wait -> {wait * 1000:.1f} ms")
            if state.max_batch_size < cfg.cap_batch_size:
                size = min(cfg.cap_batch_size, max(state.max_batch_size + 1, int(state.max_batch_size * 1.5)))
                return Decision(replace(state, max_batch_size=size), f"saturated at the longest wait: batch cap -> {size}")
            return Decision(state, f"p99 {obs.p99_ms:.1f} ms > target, {obs.busy:.0%} busy at the longest wait "
                                   "and full cap: over capacity, hold (add replicas)")
        if state.wait_s > cfg.min_wait_s + 1e-9:
            wait = state.wait_s / 2
            wait = cfg.min_wait_s if wait < cfg.min_wait_s + 0.0005 else wait  # halving never reaches 0
            return Decision(replace(state, wait_s=wait), f"p99 {obs.p99_ms:.1f} ms > target {target:.0f} with idle time: "
                            f"wait -> {wait * 1000:.1f} ms")
        if obs.mean_fill >= 0.5 and obs.mean_batch_ms >= 0.5 * target:
            size = max(cfg.min_batch_size, int(state.max_batch_size * 0.75))
            if size < state.max_batch_size:
                return Decision(replace(state, max_batch_size=size), f"p99 {obs.p99_ms:.1f} ms > target with no wait "
                                f"and large batches: batch cap -> {size}")
        return Decision(state, f"p99 {obs.p99_ms:.1f} ms > target with no wait, and batches ({obs.mean_batch_ms:.1f} ms) "
                               "are not what takes the time: hold")
    if obs.p99_ms < cfg.low_water * target:
        if obs.mean_fill < cfg.full_fill:
            fill_time = state.max_batch_size / obs.arrival_rate_per_s if obs.arrival_rate_per_s > 0 else cfg.max_wait_s
            ceiling = min(cfg.max_wait_s, fill_time)
            wait = min(ceiling, state.wait_s + cfg.wait_step_s)
            if wait > state.wait_s + 1e-9:
                return Decision(replace(state, wait_s=wait), f"p99 {obs.p99_ms:.1f} ms has headroom, batches {obs.mean_fill:.0%} full: wait -> {wait * 1000:.1f} ms")
            return Decision(state, f"headroom, but waiting longer than {ceiling * 1000:.1f} ms would not fill batches")
        if state.max_batch_size < cfg.cap_batch_size:
            size = min(cfg.cap_batch_size, max(state.max_batch_size + 1, int(state.max_batch_size * 1.25)))
            return Decision(replace(state, max_batch_size=size), f"headroom and full batches: batch cap -> {size}")
    return Decision(state, f"hold: p99 {obs.p99_ms:.1f} ms within [{cfg.low_water * target:.0f}, {target:.0f}]")


class Window:
    """The last `span_s` seconds of completed requests and batches, summarised as an Observation."""

    def __init__(self, span_s: float = 5.0):
        from collections import deque

        self.span_s = span_s
        self._requests: deque[tuple[float, float, int]] = deque()  # (done_s, latency_ms, items)
        self._fills: deque[tuple[float, float, float]] = deque()  # (done_s, fill, duration_s)

    def request(self, now_s: float, latency_ms: float, items: int) -> None:
        self._requests.append((now_s, latency_ms, items))

    def batch(self, now_s: float, fill: float, duration_s: float = 0.0) -> None:
        self._fills.append((now_s, fill, duration_s))

    def observe(self, now_s: float) -> Observation:
        cut = now_s - self.span_s
        while self._requests and self._requests[0][0] < cut:
            self._requests.popleft()
        while self._fills and self._fills[0][0] < cut:
            self._fills.popleft()
        lat = sorted(r[1] for r in self._requests)
        p99 = percentile(lat, 99)
        fill = sum(f[1] for f in self._fills) / len(self._fills) if self._fills else 0.0
        busy = min(1.0, sum(f[2] for f in self._fills) / self.span_s)
        mean_batch_ms = 1000.0 * sum(f[2] for f in self._fills) / len(self._fills) if self._fills else 0.0
        items = sum(r[2] for r in self._requests)
        return Observation(p99_ms=p99, mean_fill=fill, arrival_rate_per_s=items / self.span_s, samples=len(lat),
                           busy=busy, mean_batch_ms=mean_batch_ms)

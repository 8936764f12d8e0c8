"""A queue-depth autoscaling policy for Ray Serve (selected with `autoscaling.policy: queue_depth`).

Serve's default policy divides ongoing requests by `target_ongoing_requests`. With batching the
signal that matters is the batch queue: how many items wait per replica against what one replica
can take per batch, and how long they wait against the latency target. Each replica reports both
(ModelServer.record_autoscaling_stats); this policy turns them into a replica count.

Serve wraps the returned count with min/max replicas and the upscale/downscale delays; the policy
itself adds a dead band, so a queue that hovers around a threshold does not flap the count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class QueueSignal:
    current_replicas: int
    queued_items: Sequence[float]  # per replica: items waiting for or in a batch (look-back aggregate)
    queue_wait_p99_ms: Sequence[float]  # per replica
    # Requests held back at the handles because every replica is at max_ongoing_requests: the part
    # of the queue no replica can see yet.
    waiting_at_handles: float = 0.0


def decide(signal: QueueSignal, items_per_replica: float, target_wait_ms: float, scale_down_fill: float = 0.5,
           ) -> tuple[int, str]:
    """Desired replicas for the observed queue.

    Up: enough replicas for the queued items at `items_per_replica` each, and one more than now when
    the queue wait is over target. Down: only when the remaining replicas would sit below
    `scale_down_fill` of their capacity and the wait is comfortably under target (the dead band).
    """
    n = max(signal.current_replicas, 0)
    if n == 0:
        return (1 if sum(signal.queued_items) > 0 else 0), "cold start"
    total = float(sum(signal.queued_items)) + max(0.0, signal.waiting_at_handles)
    wait = max(signal.queue_wait_p99_ms, default=0.0)
    need = max(1, math.ceil(total / items_per_replica))
    if wait > target_wait_ms:
        want = max(need, n + 1)
        return want, f"queue wait p99 {wait:.0f} ms > {target_wait_ms:.0f} ms, {total:.0f} items queued"
    if need > n:
        return need, f"{total:.0f} items queued need {need} replicas of {items_per_replica:.0f}"
    if n > 1 and total <= (n - 1) * items_per_replica * scale_down_fill and wait < 0.5 * target_wait_ms:
        down = max(1, math.ceil(total / (items_per_replica * scale_down_fill)))
        return min(down, n - 1), f"{total:.0f} items would fill {n - 1} replicas below {scale_down_fill:.0%}"
    return n, "hold"


class QueueDepthPolicy:
    """Serve custom autoscaling policy (a class: Serve passes `policy_kwargs` to the constructor)."""

    def __init__(self, items_per_replica: float, target_queue_wait_ms: float, scale_down_fill: float = 0.5):
        self.items_per_replica = items_per_replica
        self.target_queue_wait_ms = target_queue_wait_ms
        self.scale_down_fill = scale_down_fill

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        metrics: Mapping[str, Mapping[Any, float]] = ctx.aggregated_metrics or {}
        queued = list((metrics.get("queued_items") or {}).values())
        waits = list((metrics.get("queue_wait_p99_ms") or {}).values())
        at_handles = float(ctx.total_queued_requests or 0.0)
        if not queued:  # no replica has reported yet: fall back on Serve's own request count
            queued, at_handles = [float(ctx.total_num_requests)], 0.0
        desired, reason = decide(QueueSignal(ctx.current_num_replicas, queued, waits, at_handles),
                                 self.items_per_replica, self.target_queue_wait_ms, self.scale_down_fill)
        state = dict(ctx.policy_state or {})
        state["last_reason"] = reason
        return desired, state

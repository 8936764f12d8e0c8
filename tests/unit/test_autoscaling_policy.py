"""The queue-depth autoscaling policy as a pure function."""

import random

from app.autoscaling import QueueDepthPolicy, QueueSignal, decide

CAP, TARGET = 16.0, 100.0


def d(n, queued, waits=None):
    return decide(QueueSignal(n, queued, waits or [10.0] * len(queued)), CAP, TARGET)[0]


def test_scale_up_for_queued_items():
    assert d(1, [50]) == 4  # ceil(50 / 16)
    assert d(2, [40, 40]) == 5


def test_requests_waiting_at_handles_count_too():
    assert decide(QueueSignal(1, [8], [10.0], waiting_at_handles=24), CAP, TARGET)[0] == 2  # 32 items

def test_scale_up_on_queue_wait_even_with_few_items():
    assert d(2, [4, 4], waits=[30, 250]) == 3


def test_hold_in_the_dead_band():
    assert d(3, [10, 10, 10]) == 3  # 30 items would fill 2 replicas at 94 %: keep 3
    assert d(2, [10, 2]) == 2  # 12 items > 16 x 0.5 for one replica: hold


def test_scale_down_when_remaining_replicas_stay_half_empty():
    assert d(4, [1, 1, 0, 0]) == 1
    assert d(4, [4, 4, 4, 4]) == 2  # 16 items, 2 replicas at 50 %


def test_no_scale_down_while_waits_are_near_target():
    assert d(4, [1, 1, 0, 0], waits=[60, 10, 10, 10]) == 4


def test_cold_start():
    assert d(0, [3]) == 1 and d(0, [0]) == 0


def test_noisy_queue_does_not_flap():
    """A queue hovering around 2.2 replicas' worth, +-30 % noise: the count settles and stays."""
    rng = random.Random(0)
    n, counts = 3, []
    for _ in range(200):
        total = 2.2 * CAP * rng.uniform(0.7, 1.3)
        per = [total / n] * n
        n = d(n, per)
        counts.append(n)
    tail = counts[50:]
    changes = sum(1 for a, b in zip(tail, tail[1:]) if a != b)
    assert changes <= 4, counts[50:80]
    assert set(tail) <= {3, 4}


class Ctx:
    def __init__(self, n, metrics, total=0.0, queued=0.0):
        self.current_num_replicas = n
        self.aggregated_metrics = metrics
        self.total_num_requests = total
        self.total_queued_requests = queued
        self.policy_state = {}


def test_policy_object_reads_serve_context():
    policy = QueueDepthPolicy(items_per_replica=CAP, target_queue_wait_ms=TARGET)
    desired, state = policy(Ctx(1, {"queued_items": {"r1": 40.0}, "queue_wait_p99_ms": {"r1": 20.0}}))
    assert desired == 3 and "items queued" in state["last_reason"]
    desired, _ = policy(Ctx(1, {}, total=33))  # nothing reported yet: Serve's request count
    assert desired == 3
    desired, _ = policy(Ctx(1, {"queued_items": {"r1": 8.0}}, queued=40.0))
    assert desired == 3  # 48 items

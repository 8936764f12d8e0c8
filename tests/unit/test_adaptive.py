"""The adaptive batching controller on simulated latencies."""

import random

from app.adaptive import BatchingState, ControllerConfig, Observation, step

CFG = ControllerConfig(target_p99_ms=100, min_wait_s=0.0, max_wait_s=0.05, wait_step_s=0.005, cap_batch_size=32)


def obs(p99, fill=0.5, rate=1000.0, n=100):
    return Observation(p99_ms=p99, mean_fill=fill, arrival_rate_per_s=rate, samples=n)


def test_over_target_halves_wait_then_shrinks_batch():
    s = BatchingState(wait_s=0.04, max_batch_size=32)
    s = step(CFG, s, obs(150)).state
    assert s.wait_s == 0.02 and s.max_batch_size == 32
    for _ in range(20):
        s = step(CFG, s, obs(150)).state
    assert s.wait_s == 0.0 and s.max_batch_size < 32


def test_headroom_and_partial_batches_lengthen_wait_up_to_fill_time():
    s = BatchingState(wait_s=0.0, max_batch_size=32)
    # 32 items at 1000 items/s fill in 32 ms: never wait longer than that
    for _ in range(50):
        s = step(CFG, s, obs(20, fill=0.3, rate=1000)).state
    assert abs(s.wait_s - 0.032) < 1e-9


def test_headroom_and_full_batches_grow_the_cap_back():
    s = BatchingState(wait_s=0.01, max_batch_size=8)
    for _ in range(20):
        s = step(CFG, s, obs(20, fill=1.0)).state
    assert s.max_batch_size == 32


def test_hold_inside_the_band_and_with_few_samples():
    s = BatchingState(wait_s=0.01, max_batch_size=16)
    assert step(CFG, s, obs(85)).state == s
    assert step(CFG, s, obs(500, n=3)).state == s


def test_simulated_queue_settles_under_target_without_flapping():
    """Latency model: p99 = service time of a batch + wait, service grows with batch size;
    noise +-10 %. The controller must end under the target and stop oscillating."""
    rng = random.Random(0)
    s = BatchingState(wait_s=0.05, max_batch_size=32)
    history = []
    for _ in range(200):
        service_ms = 20 + 2.5 * s.max_batch_size
        p99 = (service_ms + s.wait_s * 1000) * rng.uniform(0.9, 1.1) * 1.3
        s = step(CFG, s, obs(p99, fill=0.6, rate=2000)).state
        history.append((s.wait_s, s.max_batch_size, p99))
    tail = history[-50:]
    assert all(p < CFG.target_p99_ms * 1.15 for _, _, p in tail)
    changes = sum(1 for a, b in zip(tail, tail[1:]) if a[:2] != b[:2])
    assert changes <= 10, f"{changes} changes in the last 50 steps"

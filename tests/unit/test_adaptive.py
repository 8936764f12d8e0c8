"""The adaptive batching controller on simulated latencies."""

import random

import numpy as np
import pytest

from app.adaptive import BatchingState, ControllerConfig, Observation, Window, step

CFG = ControllerConfig(target_p99_ms=100, min_wait_s=0.0, max_wait_s=0.05, wait_step_s=0.005, cap_batch_size=32)


def obs(p99, fill=0.5, rate=1000.0, n=100, busy=0.3, batch_ms=60.0):
    return Observation(p99_ms=p99, mean_fill=fill, arrival_rate_per_s=rate, samples=n, busy=busy,
                       mean_batch_ms=batch_ms)


def test_over_target_with_idle_time_halves_wait_then_shrinks_large_batches():
    s = BatchingState(wait_s=0.04, max_batch_size=32)
    s = step(CFG, s, obs(150)).state
    assert s.wait_s == 0.02 and s.max_batch_size == 32
    for _ in range(20):
        s = step(CFG, s, obs(150, fill=0.8)).state
    assert s.wait_s == 0.0 and s.max_batch_size < 32


def test_over_target_with_small_batches_and_no_wait_holds():
    s = BatchingState(wait_s=0.0, max_batch_size=32)
    assert step(CFG, s, obs(150, fill=0.1)).state == s


def test_over_target_when_time_goes_elsewhere_keeps_the_cap():
    s = BatchingState(wait_s=0.0, max_batch_size=32)
    d = step(CFG, s, obs(200, fill=0.9, batch_ms=10))
    assert d.state == s and "not what takes the time" in d.reason


def test_over_target_when_saturated_fills_bigger_batches():
    s = BatchingState(wait_s=0.0, max_batch_size=8)
    s = step(CFG, s, obs(300, busy=0.95)).state
    assert s.wait_s == 0.005
    for _ in range(10):
        s = step(CFG, s, obs(300, busy=0.95)).state
    assert s.wait_s == 0.05 and s.max_batch_size == 32
    d = step(CFG, s, obs(300, busy=0.95))
    assert d.state == s and "over capacity" in d.reason


def test_headroom_and_partial_batches_lengthen_wait_up_to_fill_time():
    s = BatchingState(wait_s=0.0, max_batch_size=32)
    for _ in range(50):
        s = step(CFG, s, obs(20, fill=0.3, rate=1000)).state
    assert abs(s.wait_s - 0.032) < 1e-9  # 32 items at 1000/s fill in 32 ms


def test_headroom_and_full_batches_grow_the_cap_back():
    s = BatchingState(wait_s=0.01, max_batch_size=8)
    for _ in range(20):
        s = step(CFG, s, obs(20, fill=1.0)).state
    assert s.max_batch_size == 32


def test_hold_inside_the_band_and_with_few_samples():
    s = BatchingState(wait_s=0.01, max_batch_size=16)
    assert step(CFG, s, obs(85)).state == s
    assert step(CFG, s, obs(500, n=3)).state == s


def simulate(rate_per_s: float, steps: int = 300, seed: int = 0):
    """A batching queue in closed form: per-batch service = 8 ms + 3 ms/item; a batch collects what
    arrives during the wait and the previous service; M/D/1-like queueing from utilisation; +-10 % noise."""
    rng = random.Random(seed)
    s = BatchingState(wait_s=0.05, max_batch_size=32)
    trace = []
    for _ in range(steps):
        n = max(1, min(s.max_batch_size, round(rate_per_s * (s.wait_s + 0.008 + 0.003 * 4))))
        service = 0.008 + 0.003 * n
        rho = min(0.99, rate_per_s * service / n)
        latency = s.wait_s + service + service * rho / (2 * (1 - rho))
        p99 = latency * 1000 * 2.0 * rng.uniform(0.9, 1.1)
        s = step(CFG, s, Observation(p99, n / s.max_batch_size, rate_per_s, 100, busy=rho,
                                     mean_batch_ms=service * 1000)).state
        trace.append((s.wait_s, s.max_batch_size, p99))
    return trace


def test_light_load_settles_under_target_without_flapping():
    tail = simulate(50)[-60:]
    assert all(p < CFG.target_p99_ms * 1.15 for *_, p in tail)
    assert sum(1 for a, b in zip(tail, tail[1:]) if a[:2] != b[:2]) <= 12


def test_saturated_replica_keeps_big_batches_instead_of_shrinking_them():
    """At 250 items/s only big batches keep up (small ones would push utilisation past 1): the target
    cannot be met, and the controller must not make it worse by shrinking batches."""
    tail = simulate(250)[-60:]
    assert all((w, c) == (CFG.max_wait_s, CFG.cap_batch_size) for w, c, _ in tail)


def test_window_summarises_requests_and_busy_time():
    w = Window(span_s=2.0)
    for i in range(100):
        w.request(10.0 + i * 0.01, latency_ms=float(i), items=2)
    w.batch(11.0, fill=0.5, duration_s=0.5)
    w.batch(11.5, fill=1.0, duration_s=0.5)
    o = w.observe(11.5)
    assert o.samples == 100 and o.mean_fill == 0.75
    assert o.p99_ms == pytest.approx(float(np.percentile(np.arange(100.0), 99)))  # the one rule (app/quantiles.py)
    assert o.busy == 0.5 and o.arrival_rate_per_s == 100.0 and o.mean_batch_ms == 500.0

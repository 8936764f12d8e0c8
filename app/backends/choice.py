"""`backend: auto`: time each candidate on the same warm batches and keep the fastest."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np


def time_per_batch_ms(forward: Callable[[], object], warm: int = 2, reps: int = 5) -> float:
    """Median wall time of `forward` after `warm` untimed calls."""
    for _ in range(warm):
        forward()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        forward()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples)) * 1000.0


def time_candidates_ms(forwards: dict[str, Callable[[], object]], rounds: int = 3, reps: int = 3) -> dict[str, float]:
    """Each candidate's time per batch: rounds interleaved (so a burst of load from elsewhere on
    the host falls on all of them alike), the best round's median kept."""
    best = {name: float("inf") for name in forwards}
    for r in range(rounds):
        for name, forward in forwards.items():
            best[name] = min(best[name], time_per_batch_ms(forward, warm=2 if r == 0 else 0, reps=reps))
    return best


def pick_fastest(timings_ms: dict[str, float]) -> str:
    """The backend with the lowest time per batch; on a tie, the one listed first (torch first)."""
    if not timings_ms:
        raise ValueError("no backend to pick from")
    return min(timings_ms, key=lambda name: (timings_ms[name], list(timings_ms).index(name)))


def describe_choice(chosen: str, timings_ms: dict[str, float], refused: dict[str, str], shape: tuple[int, int]) -> str:
    timed = ", ".join(f"{n} {ms:.1f} ms" for n, ms in timings_ms.items())
    out = f"picked {chosen}"
    if timed:
        out += f" ({timed} per {shape[0]}x{shape[1]} batch)"
    if refused:
        out += "; not used: " + "; ".join(f"{n}: {why}" for n, why in refused.items())
    return out

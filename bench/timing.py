"""Timing helpers shared by the benchmarks (METHOD: GPU work timed with CUDA events after warm-up)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def median_wall_s(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of fn() (for calls that end synchronised, e.g. returning CPU tensors)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cuda_median_ms(fn: Callable[[], Any], reps: int = 30, warmup: int = 5) -> float:
    """Median milliseconds of fn() on the current CUDA stream, timed with events after warm-up."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def bf16_matmul_peak_tflops(n: int = 8192) -> float:
    """The measured bf16 matmul rate of this GPU: the denominator of every fraction-of-peak figure."""
    import torch

    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / (cuda_median_ms(lambda: x @ y, 20) / 1000) / 1e12  # x, y freed on return


def encoder_flops_per_seq(model: Any, seq: int, layers: int, hidden: int) -> int:
    """Forward FLOPs of one `seq`-token sequence through a BERT-style encoder: 2 per weight per token
    (embeddings excluded: they are lookups) plus the attention scores and weighted sum
    (4 x layers x seq^2 x hidden). The numerator of every fraction-of-peak figure."""
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    return 2 * n_params * seq + 4 * layers * seq * seq * hidden

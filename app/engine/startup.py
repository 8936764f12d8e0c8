"""Bringing a runner up inside a replica: process settings, the runner started on the batch
executor's threads, and the batch size device memory allows."""

from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping

import torch

from app.batching import max_batch_size_from_memory
from app.config import ModelSpec
from app.planner import ParallelPlan
from app.runners.base import ModelRunner

logger = logging.getLogger("ray.serve")


GIL_SWITCH_ENV = "BATCHSERVE_GIL_SWITCH_INTERVAL_MS"


def tune_process(spec: ModelSpec, environ: Mapping[str, str] = os.environ) -> int:
    """Torch threads, and the GIL switch interval an operator set in the replica's environment
    (`runtime_env.env_vars`); returns the torch threads. The tokenizer pool reads its own variables
    (RAYON_NUM_THREADS, TOKENIZERS_PARALLELISM) when it first starts."""
    threads = spec.intra_op_threads(os.cpu_count() or 1)
    # Ray sets OMP_NUM_THREADS=1 for fractional-CPU actors; say explicitly what we want. The ONNX
    # backends take the same figure (app/backends/).
    torch.set_num_threads(threads)
    raw = environ.get(GIL_SWITCH_ENV)
    if raw:
        # How long a thread may hold the GIL while another waits (Python's default 5 ms): the batch
        # thread, back from the tokenizer or the device, waits up to this for the event loop.
        try:
            ms = float(raw)
        except ValueError:
            ms = -1.0
        if not 0 < ms <= 100:
            raise ValueError(f"{GIL_SWITCH_ENV}={raw!r}: expected milliseconds in (0, 100]")
        sys.setswitchinterval(ms / 1000.0)
    return threads


def start_runner(runner: ModelRunner, spec: ModelSpec, plan: ParallelPlan, threads: int) -> tuple[ThreadPoolExecutor, int]:
    """Start the runner on the batch executor (every torch call of the model runs on its threads,
    the start and warm-up included: a second OpenMP thread team, the event loop's, made CPU batches
    ~1.8x slower on 2 cores); returns the executor and the batch size memory allows."""
    executor = ThreadPoolExecutor(max_workers=spec.batching.max_concurrent_batches)
    executor.submit(torch.set_num_threads, threads).result()
    executor.submit(runner.start).result()
    return executor, executor.submit(measured_batch_limit, runner, spec, plan).result()


def measured_batch_limit(runner: ModelRunner, spec: ModelSpec, plan: ParallelPlan) -> int:
    """The seed formula on measured figures where the device allows (CUDA: free memory and the peak
    one sample adds at max_seq_len), else on the planner's estimate."""
    per_sample = runner.measure_per_sample_bytes(spec.max_seq_len)
    free = runner.free_device_bytes() if per_sample else None
    if not per_sample or not free:
        return plan.memory_max_batch_size
    limit = max_batch_size_from_memory(free, per_sample, cap=65536)
    logger.info("model %s: measured %.2f MiB per sample at seq %d, %.1f GiB free -> memory allows batch %d",
                spec.name, per_sample / 2**20, spec.max_seq_len, free / 2**30, limit)
    return limit

"""The ModelRunner seam: everything a model server needs from an execution backend.

A runner takes padded token tensors for a whole batch and returns one float32 CPU tensor of
outputs with the same number of rows. It knows nothing of HTTP, requests or Serve.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional

import torch


class DeviceLost(RuntimeError):
    """The runner lost part of itself (a tensor-parallel rank died or failed mid-collective): no
    input is to blame and no retry on this replica can succeed; it must be replaced."""


class ModelRunner(ABC):
    strategy: str = "?"
    # Whether infer() may be called from two threads at once (the realtime and bulk lanes of the
    # batcher, app/engine/coalesce.py). A rank gang steps in lockstep and takes one call at a time.
    concurrent_calls: bool = False

    @abstractmethod
    def start(self) -> None:
        """Load weights onto the runner's devices. Called once, before any infer()."""

    @abstractmethod
    def infer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] int64 ids and mask -> [B, D] float32 on the CPU. Must return exactly B rows."""

    def check_health(self) -> None:
        """Raise if the runner can no longer serve (a dead rank, a lost device)."""

    def shutdown(self) -> None:
        """Release devices and worker processes."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Facts for GET /v1/models: strategy, devices, dtype, output width."""

    def gpu_ids(self) -> Optional[list[str]]:
        """Physical GPU ids the runner computes on, for NVML gauges; None: the replica's own."""
        return None

    def measure_per_sample_bytes(self, seq_len: int) -> Optional[int]:
        """Peak device memory one sample adds at `seq_len`, measured; None where it cannot be."""
        return None

    def free_device_bytes(self) -> Optional[int]:
        """Free memory on the runner's device; None where it is not known (the CPU)."""
        return None

    def release_cached_memory(self) -> None:
        """After an out-of-memory batch: give cached allocator blocks back before the retry."""

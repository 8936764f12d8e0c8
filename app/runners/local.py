"""One model on one device (CUDA when present, else CPU); data parallelism comes from Serve replicas."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from app.config import ModelSpec
from app.models.compiled import compile_blocks, fuse_qkv
from app.models.loader import build_backbone, resolve_device, resolve_dtype, wrap_head
from app.runners.base import ModelRunner
from app.runners.length_groups import run_length_grouped
from app.runners.cuda_graphs import GraphedForward, default_batch_buckets, default_seq_buckets, to_host

logger = logging.getLogger("ray.serve")


class LocalRunner(ModelRunner):
    concurrent_calls = True  # torch inference is thread-safe; CUDA graph replays take a lock
    strategy = "replicated"

    def __init__(self, spec: ModelSpec, vocab_size: int):
        self.spec = spec
        self.vocab_size = vocab_size
        self.device = resolve_device(spec)
        self.dtype = resolve_dtype(spec, self.device)
        self.model: torch.nn.Module | None = None
        self.output_dim: int | None = None
        self.graphs: GraphedForward | None = None
        self._warned_eager = False
        # CPU batches of uneven texts run as sub-batches of similar length (app/runners/length_groups.py).
        self.length_groups = True

    def start(self) -> None:
        self.model = wrap_head(self.spec, build_backbone(self.spec, self.vocab_size, self.device, self.dtype))
        acc = self.spec.acceleration
        if acc.compile_layers and self.device.type == "cuda":
            t0 = time.perf_counter()
            fused, compiled = fuse_qkv(self.model), compile_blocks(self.model)
            probe = torch.ones(8, 32, dtype=torch.long)
            self.infer(probe, torch.ones_like(probe))  # the first compile, before any graph is captured
            logger.info("model %s: fused %d qkv projections, compiled %d blocks in %.1fs",
                        self.spec.name, fused, compiled, time.perf_counter() - t0)
        probe = torch.ones(1, 4, dtype=torch.long)
        self.output_dim = int(self.infer(probe, torch.ones_like(probe)).shape[-1])
        if acc.cuda_graphs and self.device.type == "cuda":
            self.graphs = GraphedForward(
                self.model, self.device,
                acc.batch_buckets or default_batch_buckets(self.spec.batching.max_batch_size),
                acc.seq_buckets or default_seq_buckets(self.spec.max_seq_len),
                blocking_sync=acc.blocking_sync,
            )
            took = self.graphs.capture()
            logger.info("model %s: captured %d CUDA graphs in %.1fs (batch buckets %s, seq buckets %s)",
                        self.spec.name, len(self.graphs), took, self.graphs.batch_buckets, self.graphs.seq_buckets)

    def measure_per_sample_bytes(self, seq_len: int, probe_batch: int = 8) -> int | None:
        """Peak device memory one sample adds at `seq_len` (CUDA only; None on the CPU)."""
        if self.device.type != "cuda":
            return None
        ids = torch.ones(probe_batch, seq_len, dtype=torch.long)
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.infer(ids, torch.ones_like(ids))
        peak = torch.cuda.max_memory_allocated(self.device)
        return max(1, (peak - base) // probe_batch)

    def free_device_bytes(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return int(torch.cuda.mem_get_info(self.device)[0])

    def release_cached_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def infer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        assert self.model is not None, "start() was not called"
        if self.graphs is not None:
            out = self.graphs(input_ids, attention_mask)
            if out is not None:
                return out
            if not self._warned_eager:  # a retune above the captured buckets: say so, once
                self._warned_eager = True
                logger.warning("model %s: a batch of %s runs eagerly: CUDA graphs were captured for batches "
                               "up to %d and sequences up to %d at start; restart the replicas to capture "
                               "larger ones", self.spec.name, tuple(input_ids.shape), self.graphs.batch_buckets[-1],
                               self.graphs.seq_buckets[-1])
        if self.device.type == "cpu" and self.length_groups:
            return torch.from_numpy(run_length_grouped(self._cpu_forward, input_ids.numpy(), attention_mask.numpy()))
        non_blocking = self.device.type == "cuda"
        ids = input_ids.to(self.device, non_blocking=non_blocking)
        mask = attention_mask.to(self.device, non_blocking=non_blocking)
        return to_host(self.model(ids, mask), self.spec.acceleration.blocking_sync)

    def _cpu_forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("model not loaded")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def shutdown(self) -> None:
        self.model = None
        self.graphs = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "backend": "torch",
            "devices": [str(self.device)],
            "dtype": str(self.dtype).removeprefix("torch."),
            "output_dim": self.output_dim,
            "cuda_graphs": len(self.graphs) if self.graphs is not None else 0,
        }

"""Tensor parallelism: a gang of Ray rank workers running DeepSpeed AutoTP; rank 0 answers.

The Serve replica that owns this runner sits in bundle 0 of its placement group (STRICT_PACK, so the
gang shares one node); rank i runs in bundle i + 1. Each rank builds the same seeded model, joins a
torch.distributed group (NCCL on GPUs, gloo on CPUs) and lets `deepspeed.init_inference` shard it.
Every rank runs every batch (the all-reduces need all of them); only rank 0's output travels back.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import ray
import torch

from app.config import ModelSpec
from app.planner import ParallelPlan
from app.runners.base import DeviceLost, ModelRunner
from app.runners.tp_group import (first_failed_rank, free_port, gang_gpu_ids, join_process_group, remove_shm_buffers, shard_with_autotp,
                                  shm_buffer_prefix, spawn_ranks)

_HEALTH_TIMEOUT_S = 30.0


class TPRankWorker:
    """One tensor-parallel rank (a Ray actor). Built in two steps so every rank can first learn the
    GPUs of the whole gang: NCCL only uses NVLink / peer-to-peer between devices a process can see,
    and Ray shows each actor just its own GPU, which would push every all-reduce through host memory."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.device = torch.device("cpu")

    def gpu_ids(self) -> list[str]:
        return [str(g) for g in ray.get_gpu_ids()]

    def setup(self, spec: ModelSpec, vocab_size: int, master_addr: str, master_port: int,
              gang_gpus: Optional[list[str]]) -> int:
        from app.models.loader import build_backbone, resolve_dtype, wrap_head

        self.device = join_process_group(self.rank, self.world, master_addr, master_port, gang_gpus)
        dtype = resolve_dtype(spec, self.device)
        model = wrap_head(spec, build_backbone(spec, vocab_size, self.device, dtype))
        self.model = shard_with_autotp(model, self.world, dtype)
        return self.rank

    @torch.inference_mode()
    def infer(self, batch: tuple[torch.Tensor, torch.Tensor]) -> Optional[torch.Tensor]:
        ids, mask = batch
        out = self.model(ids.to(self.device), mask.to(self.device))
        return out.float().cpu() if self.rank == 0 else None

    def ping(self) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return True


class TensorParallelRunner(ModelRunner):
    strategy = "deepspeed_tp"

    def __init__(self, spec: ModelSpec, vocab_size: int, plan: ParallelPlan):
        self.spec, self.vocab_size, self.plan = spec, vocab_size, plan
        self.use_gpu = spec.parallel.devices.kind == "gpu" and spec.device != "cpu"
        self.ranks: list[Any] = []
        self.gang_gpus: list[str] = []  # physical GPU ids of the ranks (for NVML metrics)
        self.output_dim: Optional[int] = None
        self.dtype: str = "?"
        self._lost: Optional[str] = None  # why the gang broke, once it has
        # DeepSpeed's CPU all-reduce files of this gang (tp_group.shm_buffer_prefix).
        self.shm_buffer_prefix: Optional[str] = None

    def start(self) -> None:
        world = self.plan.tp
        master_addr = ray.util.get_node_ip_address()
        master_port = free_port()
        self.shm_buffer_prefix = shm_buffer_prefix(master_addr, master_port)
        t0 = time.perf_counter()
        # Bundle 0 is the replica's own; bundles 1..tp hold one rank each (deployments/builder.py).
        self.ranks = spawn_ranks(TPRankWorker, range(world), world, self.spec.parallel.rank_num_cpus, self.use_gpu,
                                 lambda rank: rank + 1, name=None)
        gang_gpus = gang_gpu_ids(self.ranks, world) if self.use_gpu else None
        ray.get([r.setup.remote(self.spec, self.vocab_size, master_addr, master_port, gang_gpus) for r in self.ranks])
        self.gang_gpus = gang_gpus or []
        self._probe_output()
        self._start_s = time.perf_counter() - t0

    def _probe_output(self) -> None:
        """One tiny batch through the gang: the output width, and proof that every rank answers."""
        probe = torch.ones(1, 4, dtype=torch.long)
        self.output_dim = int(self.infer(probe, torch.ones_like(probe)).shape[-1])
        self.dtype = "bfloat16" if self.use_gpu and self.spec.dtype == "auto" else (
            "float32" if self.spec.dtype == "auto" else self.spec.dtype)

    def gpu_ids(self) -> Optional[list[str]]:
        return self.gang_gpus or None

    def infer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self._lost is not None:
            raise DeviceLost(self._lost)
        batch = ray.put((input_ids, attention_mask))
        refs = [r.infer.remote(batch) for r in self.ranks]
        failed = first_failed_rank(refs)
        if failed is not None:
            self._lost = f"tensor-parallel rank {failed} failed"
            self.shutdown()  # unblock the survivors; the health check now fails
            raise DeviceLost(self._lost)
        return ray.get(refs[0])

    def check_health(self) -> None:
        """Reach every rank; a dead or stuck one makes the replica unhealthy so Serve replaces it."""
        if self._lost is not None:
            raise DeviceLost(self._lost)
        ray.get([r.ping.remote() for r in self.ranks], timeout=_HEALTH_TIMEOUT_S)

    def shutdown(self) -> None:
        for r in self.ranks:
            ray.kill(r, no_restart=True)
        self.ranks = []
        self._remove_shm_buffers()

    def _remove_shm_buffers(self) -> None:
        remove_shm_buffers(self.shm_buffer_prefix)

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "devices": [f"{'cuda' if self.use_gpu else 'cpu'}:rank{i}" for i in range(self.plan.tp)],
            "dtype": self.dtype,
            "output_dim": self.output_dim,
            "tp": self.plan.tp,
        }

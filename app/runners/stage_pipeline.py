"""Encoders on pipeline stages that are each a tensor-parallel group (tp x pp), one Ray actor per rank.

For a model too large for one node: the stages go to different nodes (one placement-group bundle
per stage, so a stage's all-reduces stay on one node's links) and hand activations on over
torch.distributed point-to-point (gloo on CPUs, NCCL on GPUs). Fairscale's `Pipe` stays the runner
for a pipeline inside one process.

Rank r = stage x tp + t. Every rank builds the same seeded model; a stage's tp ranks shard it
with DeepSpeed AutoTP over their own group, then keep their stage's units of the planner's cut
(app/models/stages.py: [embeddings, layer 0..n-1, final], the balance the planner sized). A batch
is split into `plan.chunks` micro-batches; rank t of stage s receives micro-batch j from rank t of
stage s-1, runs its units, and sends it on without waiting for the send to land
(`isend`), so stage s works on micro-batch j while stage s+1 works on j-1: the pipeline overlaps as
GPipe's forward does, with a bubble of (p-1)/(m+p-1). Every rank gets the batch's ids and mask (a
Ray object, a few KB) to know the micro-batch shapes; rank 0 of the last stage returns the outputs.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import ray
import torch

from app.config import ModelSpec
from app.planner import ParallelPlan
from app.runners.base import DeviceLost
from app.runners.deepspeed_tp import TensorParallelRunner, TPRankWorker
from app.runners.tp_group import (first_failed_rank, free_port, gang_gpu_ids, join_process_group, shard_with_autotp,
                                  shm_buffer_prefix, spawn_ranks, where_am_i)


def micro_batches(n: int, chunks: int) -> list[slice]:
    """Rows of each micro-batch: `chunks` near-equal slices of n rows (fewer when n < chunks)."""
    m = max(1, min(chunks, n))
    size, extra = divmod(n, m)
    out, start = [], 0
    for j in range(m):
        stop = start + size + (1 if j < extra else 0)
        out.append(slice(start, stop))
        start = stop
    return out


class EncoderStageRank(TPRankWorker):
    """One rank of the gang (a Ray actor): built in two steps as a tensor-parallel rank is."""

    def where(self) -> dict[str, Any]:
        return {**where_am_i(self.rank), "stage": self.stage}

    def setup(self, spec: ModelSpec, plan: ParallelPlan, vocab_size: int, master_addr: str, master_port: int,
              gang_gpus: Optional[list[str]]) -> int:
        from app.models.loader import build_backbone, resolve_dtype, wrap_head
        from app.models.stages import to_sequential

        torch.set_num_threads(spec.intra_op_threads(int(max(1, spec.parallel.rank_num_cpus))))
        self.tp, self.pp = plan.tp, plan.pp
        self.stage, self.t = divmod(self.rank, plan.tp)
        self.chunks = plan.chunks
        self.device = join_process_group(self.rank, self.world, master_addr, master_port, gang_gpus)
        self.dtype = resolve_dtype(spec, self.device)
        # Every rank creates every stage's group, in the same order (new_group is collective).
        groups = [torch.distributed.new_group(ranks=list(range(s * plan.tp, (s + 1) * plan.tp)))
                  for s in range(plan.pp)]
        model = wrap_head(spec, build_backbone(spec, vocab_size, self.device, self.dtype))
        if plan.tp > 1:  # shard whole, then cut: AutoTP finds the decoder layers in the model it knows
            model = shard_with_autotp(model, plan.tp, self.dtype, groups[self.stage])
        units = list(to_sequential(model, spec.task))
        balance = plan.balance or ()
        first = sum(balance[: self.stage])
        self.units = torch.nn.Sequential(*units[first : first + balance[self.stage]]).eval()
        inner = model.encoder if hasattr(model, "encoder") else model.classifier  # EmbeddingHead / ClassifierHead
        self.hidden = int(inner.config.hidden_size)
        return self.rank

    def _peer(self, stage: int) -> int:
        return stage * self.tp + self.t

    @torch.inference_mode()
    def run(self, batch: tuple[torch.Tensor, torch.Tensor]) -> Optional[torch.Tensor]:
        ids, mask = batch
        ids, mask = ids.to(self.device), mask.to(self.device)
        last = self.pp - 1
        sends, outputs = [], []
        for rows in micro_batches(ids.shape[0], self.chunks):
            m = mask[rows]
            if self.stage == 0:
                x: Any = (ids[rows], m)
            else:
                hidden = torch.empty(m.shape[0], m.shape[1], self.hidden, dtype=self.dtype, device=self.device)
                torch.distributed.recv(hidden, src=self._peer(self.stage - 1))
                x = (hidden, m)
            x = self.units(x)
            if self.stage < last:
                # Not waited on here: the next micro-batch runs while this one travels.
                sends.append(torch.distributed.isend(x[0].contiguous(), dst=self._peer(self.stage + 1)))
            else:
                outputs.append(x.float().cpu())
        for s in sends:
            s.wait()
        return torch.cat(outputs) if self.stage == last and self.t == 0 else None


class StagePipelineRunner(TensorParallelRunner):
    """The replica's side: start the ranks, send every batch to all of them, answer from the last
    stage's rank 0; health check and shutdown as a tensor-parallel gang's."""

    strategy = "tp_pp"

    def __init__(self, spec: ModelSpec, vocab_size: int, plan: ParallelPlan):
        super().__init__(spec, vocab_size, plan)
        self.world = plan.tp * plan.pp
        # Ranks reserve a GPU where the budget is GPUs (a logical one on a test cluster) and
        # compute on CUDA only where CUDA is there.
        self.reserve_gpus = self.use_gpu
        self.use_gpu = self.reserve_gpus and torch.cuda.is_available()
        self.placement: list[dict[str, Any]] = []

    def start(self) -> None:
        t0 = time.perf_counter()
        addr, port = ray.util.get_node_ip_address(), free_port()
        self.shm_buffer_prefix = shm_buffer_prefix(addr, port)  # none where world != tp; removed anyway
        # Bundle 0 is the replica's own; bundle 1 + s holds stage s's tp ranks (deployments/builder.py).
        self.ranks = spawn_ranks(EncoderStageRank, range(self.world), self.world, self.spec.parallel.rank_num_cpus,
                                 self.reserve_gpus, lambda rank: 1 + rank // self.plan.tp)
        gang_gpus = gang_gpu_ids(self.ranks, self.world) if self.use_gpu else None
        ray.get([r.setup.remote(self.spec, self.plan, self.vocab_size, addr, port, gang_gpus) for r in self.ranks])
        self.gang_gpus = gang_gpus or []
        self.placement = ray.get([r.where.remote() for r in self.ranks])
        self._probe_output()
        self._start_s = time.perf_counter() - t0

    def infer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self._lost is not None:
            raise DeviceLost(self._lost)
        batch = ray.put((input_ids, attention_mask))
        refs = [r.run.remote(batch) for r in self.ranks]
        failed = first_failed_rank(refs)
        if failed is not None:
            self._lost = f"pipeline rank {failed} (stage {failed // self.plan.tp}) failed"
            self.shutdown()
            raise DeviceLost(self._lost)
        return ray.get(refs[(self.plan.pp - 1) * self.plan.tp])

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "devices": [f"{'cuda' if self.use_gpu else 'cpu'}:rank{i}" for i in range(self.world)],
                "pp": self.plan.pp, "micro_batches": self.plan.chunks, "ranks": self.placement}

"""Pipeline parallelism: fairscale.nn.Pipe over the replica's devices (CPU stages on a CPU machine).

The model is cut into units (embeddings, each layer, final head) and Pipe places contiguous groups
of them on its devices, as balanced by the planner, running micro-batches so stages overlap.
"""

from __future__ import annotations

import gc
import warnings
from typing import Any

import torch

from app.config import ModelSpec
from app.models.loader import build_backbone, resolve_device, resolve_dtype, wrap_head
from app.planner import ParallelPlan
from app.runners.base import ModelRunner


def pipeline_devices(spec: ModelSpec, stages: int) -> list[torch.device]:
    first = resolve_device(spec)
    if first.type == "cuda":
        if torch.cuda.device_count() < stages:
            raise RuntimeError(f"fairscale_pp needs {stages} GPUs in this replica; {torch.cuda.device_count()} are visible")
        return [torch.device("cuda", i) for i in range(stages)]
    return [torch.device("cpu")] * stages


class PipelineRunner(ModelRunner):
    strategy = "fairscale_pp"

    def __init__(self, spec: ModelSpec, vocab_size: int, plan: ParallelPlan):
        if not plan.balance or len(plan.balance) != plan.pp:
            raise ValueError(f"a fairscale_pp plan needs a balance of {plan.pp} stages, got {plan.balance}")
        self.spec, self.vocab_size, self.plan = spec, vocab_size, plan
        self.devices = pipeline_devices(spec, plan.pp)
        self.dtype = resolve_dtype(spec, self.devices[0])
        self.pipe: Any = None
        self.output_dim: int | None = None

    def start(self) -> None:
        from fairscale.nn import Pipe  # imported here: only pipeline replicas need fairscale

        from app.models.stages import to_sequential

        head = wrap_head(self.spec, build_backbone(self.spec, self.vocab_size, self.devices[0], self.dtype))
        units = to_sequential(head, self.spec.task)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "upstreamed to torch": kept behind this seam
            self.pipe = Pipe(units, balance=list(self.plan.balance), devices=self.devices,
                             chunks=self.plan.chunks, checkpoint="never")
        probe = torch.ones(1, 4, dtype=torch.long)
        self.output_dim = int(self.infer(probe, torch.ones_like(probe)).shape[-1])

    @torch.no_grad()
    def infer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        assert self.pipe is not None, "start() was not called"
        first = self.devices[0]
        out = self.pipe((input_ids.to(first), attention_mask.to(first)))
        return out.float().cpu()

    def check_health(self) -> None:
        if self.pipe is None:
            raise RuntimeError("pipeline not started")

    def shutdown(self) -> None:
        # Pipe's worker threads keep the interpreter from exiting unless it is dropped first.
        self.pipe = None
        gc.collect()

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "devices": [str(d) for d in self.devices],
            "dtype": str(self.dtype).removeprefix("torch."),
            "output_dim": self.output_dim,
            "pp": self.plan.pp,
            "chunks": self.plan.chunks,
            "balance": list(self.plan.balance or ()),
        }

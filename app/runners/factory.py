"""Pick the runner a plan calls for. Imports of DeepSpeed / Fairscale stay inside their runners."""

from __future__ import annotations

from app.config import ModelSpec
from app.planner import ParallelPlan
from app.runners.base import ModelRunner


def make_runner(spec: ModelSpec, vocab_size: int, plan: ParallelPlan) -> ModelRunner:
    if spec.backend.kind != "torch":
        if plan.strategy != "replicated":
            from app.models.loader import ModelLoadError

            raise ModelLoadError(f"backend: {spec.backend.kind!r} runs a model that fits one process, and the plan "
                                 f"for this one is {plan.strategy}: serve it with backend torch")
        from app.runners.exported import BackendRunner

        return BackendRunner(spec, vocab_size)
    if plan.strategy == "replicated":
        from app.runners.local import LocalRunner

        return LocalRunner(spec, vocab_size)
    if plan.strategy == "deepspeed_tp":
        from app.runners.deepspeed_tp import TensorParallelRunner

        return TensorParallelRunner(spec, vocab_size, plan)
    if plan.strategy == "fairscale_pp":
        from app.runners.fairscale_pp import PipelineRunner

        return PipelineRunner(spec, vocab_size, plan)
    if plan.strategy == "tp_pp":
        from app.runners.stage_pipeline import StagePipelineRunner

        return StagePipelineRunner(spec, vocab_size, plan)
    raise ValueError(f"unknown strategy {plan.strategy!r}")

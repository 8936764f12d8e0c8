"""One served model's spec (`args.models[i]`) and the bounds derived from it."""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from app.config.sections import (AccelerationConfig, AutoscalingOptions, BackendOptions, BatchingConfig, DeploymentOptions,
                                 GenerationOptions, LimitsConfig, ModelSource, ModelVersion, ParallelConfig,
                                 RandomInitSource, TrafficOptions, _Strict)


DEFAULT_VERSION = "1"  # a model without versions is version "1", as in Triton's model repository


class ModelSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    source: ModelSource
    task: Literal["embed", "classify", "generate"]
    num_labels: int = Field(2, ge=2, le=100_000)
    labels: Optional[list[str]] = None
    max_seq_len: int = Field(256, ge=8, le=32_768)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    autoscaling: AutoscalingOptions = Field(default_factory=AutoscalingOptions)
    acceleration: AccelerationConfig = Field(default_factory=AccelerationConfig)
    generation: GenerationOptions = Field(default_factory=GenerationOptions)
    backend: BackendOptions = Field(default_factory=BackendOptions)
    traffic: TrafficOptions = Field(default_factory=TrafficOptions)
    # Versions, each its own deployment (README "Model versions"); none: one version named "1".
    versions: list[ModelVersion] = Field(default_factory=list, max_length=16)

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("labels must be unique")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ModelSpec":
        if self.labels is not None:
            if self.task != "classify":
                raise ValueError("labels: only a 'classify' model has labels")
            if len(self.labels) != self.num_labels:
                raise ValueError(
                    f"labels: {len(self.labels)} labels given but num_labels is {self.num_labels}"
                )
        if self.task == "generate":
            self._check_generator()
        if self.backend.kind != "torch":
            if self.task == "generate":
                raise ValueError(f"backend: {self.backend.kind!r} runs encoders (embed, classify); a generator runs on torch")
            if self.parallel.strategy in ("deepspeed_tp", "fairscale_pp", "tp_pp"):
                raise ValueError(f"backend: {self.backend.kind!r} runs a whole model in one process; "
                                 f"parallel.strategy {self.parallel.strategy!r} needs backend torch")
        if isinstance(self.source, RandomInitSource):
            max_pos = self.source.config.get("max_position_embeddings")
            if max_pos is not None and self.max_seq_len > int(max_pos):
                raise ValueError(
                    f"max_seq_len: {self.max_seq_len} exceeds source.config.max_position_embeddings ({max_pos})"
                )
        budget = self.limits.max_batch_tokens
        if budget is not None and budget < self.max_seq_len:
            raise ValueError(
                f"limits.max_batch_tokens: {budget} is below max_seq_len ({self.max_seq_len}); "
                "one full-length item could never run"
            )
        if self.device == "cpu" and self.deployment.num_gpus > 0:
            raise ValueError("deployment.num_gpus: a model pinned to device 'cpu' should not reserve GPUs")
        target = self.autoscaling.target_ongoing_requests
        if target is not None and target > self.effective_max_ongoing_requests():
            raise ValueError(
                f"autoscaling.target_ongoing_requests: {target} exceeds max_ongoing_requests "
                f"({self.effective_max_ongoing_requests()}); replicas could never reach it"
            )
        self._check_versions()
        bulk = self.traffic.bulk.max_ongoing_requests
        if bulk is not None and bulk >= self.effective_max_ongoing_requests():
            raise ValueError(
                f"traffic.bulk.max_ongoing_requests: {bulk} must be below max_ongoing_requests "
                f"({self.effective_max_ongoing_requests()}) so realtime requests always find a slot in the replica"
            )
        return self

    def _check_versions(self) -> None:
        if not self.versions:
            return
        names = [v.name for v in self.versions]
        if len(set(names)) != len(names):
            raise ValueError(f"versions: names must be unique, got {names}")
        if sum(v.weight for v in self.versions) <= 0:
            raise ValueError("versions: at least one version needs a weight above 0")
        if self.task == "generate":
            raise ValueError("versions: a generator serves one version (versions are for embed and classify models)")
        self.version_specs()  # each version must stand alone as a model

    def version_names(self) -> list[str]:
        return [v.name for v in self.versions] or [DEFAULT_VERSION]

    def version_weights(self) -> dict[str, float]:
        return {v.name: v.weight for v in self.versions} or {DEFAULT_VERSION: 1.0}

    def version_specs(self) -> dict[str, "ModelSpec"]:
        """Each version's own spec (the model's settings with the version's on top, no versions)."""
        if not self.versions:
            return {DEFAULT_VERSION: self}
        base = self.model_dump(exclude={"versions"})
        return {v.name: ModelSpec.model_validate({**base, **{k: o.model_dump() for k, o in v.overrides().items()}})
                for v in self.versions}

    def deployment_name(self, version: str) -> str:
        """A versionless model keeps its own name (so `deployments: [{name: <model>}]` still finds it)."""
        return self.name if not self.versions else f"{self.name}@{version}"

    def _check_generator(self) -> None:
        if isinstance(self.source, RandomInitSource) and self.source.architecture not in ("llama", "opt"):
            raise ValueError(f"source.architecture: {self.source.architecture!r} is not a causal LM; "
                             "task 'generate' takes llama or opt (or a local_dir of any causal LM)")
        g = self.generation
        if g.max_new_tokens >= self.max_seq_len:
            raise ValueError(f"generation.max_new_tokens: {g.max_new_tokens} leaves no room for a prompt in "
                             f"max_seq_len ({self.max_seq_len}), the model's context")
        if self.prompt_token_limit() + g.max_new_tokens > self.max_seq_len:
            raise ValueError(f"generation: max_prompt_tokens ({g.max_prompt_tokens}) + max_new_tokens "
                             f"({g.max_new_tokens}) exceeds max_seq_len ({self.max_seq_len}), the context")

    def intra_op_threads(self, cpu_count: int) -> int:
        """Threads of the model's forward: torch_threads if set, else the replica's CPU share."""
        if self.deployment.torch_threads:
            return self.deployment.torch_threads
        return max(1, min(cpu_count, math.ceil(self.deployment.num_cpus)))

    def prompt_token_limit(self) -> int:
        g = self.generation
        return g.max_prompt_tokens if g.max_prompt_tokens is not None else self.max_seq_len - g.max_new_tokens

    def effective_target_ongoing_requests(self) -> float:
        a = self.autoscaling
        return a.target_ongoing_requests or float(self.min_ongoing_requests)

    @property
    def min_ongoing_requests(self) -> int:
        """A replica must hold at least this many requests or batches can never fill (ray #43288)."""
        if self.task == "generate":
            return self.generation.max_running_sequences
        return self.batching.max_batch_size * self.batching.max_concurrent_batches

    def effective_max_ongoing_requests(self) -> int:
        """Requests one replica holds: the batches it runs plus as many forming behind them, so the
        device never waits for the router between batches and no request queues behind more than
        one batch inside the replica (README "Admission")."""
        if self.deployment.max_ongoing_requests is not None:
            return self.deployment.max_ongoing_requests
        return max(self.min_ongoing_requests * 2, 8)

    def autoscale_items_per_replica(self) -> float:
        """Items in a replica at which the queue-depth policy counts it full (app/autoscaling.py): one
        batch, or 3/4 of its slots where it holds less than 4/3 of a batch. The ingress holds what
        a replica's slots cannot (deployments/slot_gate.py), where the policy does not see it, so a
        replica whose slots hold only its batch would never look fuller than one batch and never
        be scaled out by its queue."""
        return min(float(self.min_ongoing_requests), 0.75 * self.effective_max_ongoing_requests())

    def bulk_max_ongoing_requests(self) -> int:
        """Bulk requests one replica holds: below max_ongoing_requests, so realtime always gets in."""
        bound = self.traffic.bulk.max_ongoing_requests
        return bound if bound is not None else max(1, self.effective_max_ongoing_requests() // 2)

    def bulk_batch_items(self) -> int:
        return min(self.traffic.bulk.batch_items or self.batching.max_batch_size, self.batching.max_batch_size)

    def effective_max_queued_requests(self, callers: int = 1) -> int:
        """Requests each of `callers` (the ingress replicas) holds for this model beyond what its
        replicas hold: one replica's worth in all. Serve counts a request as queued until a replica
        is picked for it, so a burst that free replicas could take at once still passes through
        this queue; a bound below a replica's capacity would shed such bursts while replicas sit
        idle (README "Admission"). Serve bounds the queue at each caller, and HAProxy spreads a
        burst over the callers, so the bound is split between them, down to one batch each (more
        callers would otherwise multiply the queue, and the wait of the requests at its back).
        -1: unbounded."""
        q = self.autoscaling.max_queued_requests
        if q is not None:
            return q
        return max(self.batching.max_batch_size, math.ceil(self.effective_max_ongoing_requests() / max(1, callers)))

    def slot_queue_bound(self, callers: int = 1) -> int:
        """With `ingress.admit_by_replica_slots`: requests each of `callers` holds in arrival order
        while this model's slots are full (deployments/slot_gate.py). One batch in all, split
        between the callers, so a burst is served by the next batch while a sustained overload adds
        at most one batch of wait; `autoscaling.max_queued_requests` when set (-1: unbounded)."""
        q = self.autoscaling.max_queued_requests
        if q is not None:
            return q
        return max(1, math.ceil(self.min_ongoing_requests / max(1, callers)))

    def effective_replica_wait_s(self) -> Optional[float]:
        """limits.replica_wait_s, except that a model scaled from zero replicas waits for its cold
        start unless the bound was set on purpose."""
        if self.autoscaling.enabled and self.autoscaling.min_replicas == 0 \
                and "replica_wait_s" not in self.limits.model_fields_set:
            return None
        return self.limits.replica_wait_s

    def max_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling.enabled else self.deployment.num_replicas

    def label_names(self) -> list[str]:
        return self.labels if self.labels is not None else [f"LABEL_{i}" for i in range(self.num_labels)]

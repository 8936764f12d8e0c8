"""The application's args beside its models: the ingress, costs, and AppArgs, the whole `args:` block."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from app.config.model import ModelSpec
from app.config.sections import _Strict


class GatherOptions(_Strict):
    """Routed mode: each ingress replica merges the requests that arrive while its calls to a model
    are in flight into one call, tokenised at the ingress (app/gather.py). The model server's one
    process then sees few large calls of token ids instead of one call per request: the
    front-end/engine split of Triton and vLLM (CPU replicas parse and tokenise, the GPU process batches)."""

    # Items one merged call may hold (a single larger request still goes, alone).
    max_items: int = Field(64, ge=1, le=4096)
    # Calls to one model an ingress replica keeps in flight; requests arriving while all are out
    # wait for the next (no timer: at light load a request leaves at once). Unset: what measured
    # best with one model server on one H200 (README "The front-end/engine split"): 1 through
    # handles (3,487 req/s against 2,739 with 2), 2 over the direct link (6,544 against 5,827 with 1
    # and 5,640 with 4).
    max_calls_in_flight: int = Field(1, ge=1, le=64)
    # How merged calls reach the model server. `handle`: Serve handle calls. `direct`: a TCP link
    # to the model server's own port, read on its event loop straight into the batch queue,
    # skipping Serve's per-call machinery; dialled through the handle, which also carries the
    # calls while no link is up or when one drops (app/engine_link.py).
    transport: Literal["handle", "direct"] = "handle"
    # direct: links per model per ingress replica (calls go on the least busy), and how often each
    # is redialled so that replicas added since get their share.
    links: int = Field(2, ge=1, le=64)
    relink_s: float = Field(30.0, gt=0, le=3600)

    @model_validator(mode="before")
    @classmethod
    def _calls_in_flight_by_transport(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("max_calls_in_flight") is None:
            raw = {**raw, "max_calls_in_flight": 2 if raw.get("transport") == "direct" else 1}
        return raw


class IngressOptions(_Strict):
    """`routed`: one FastAPI ingress deployment calls one model-server deployment per model through
    Serve handles (many models, each scaled on its own). `fused`: the model server *is* the HTTP
    ingress (one model per application): no second hop, which is the fast path (README, #7).
    In fused mode the model's own `deployment`/`autoscaling` settings apply and the fields below
    except `mode` and `fast_routes` are ignored."""

    mode: Literal["routed", "fused"] = "routed"
    # The inference routes (v2 infer, v1 predict) answered straight from ASGI, ahead of FastAPI's
    # router and dependency solving (same handlers, same errors; README "Fast path" has the cost).
    # Off: every route goes through FastAPI. Applies in both modes.
    fast_routes: bool = True
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, ge=0.0)
    # Requests one ingress replica holds. None: what the models behind it can hold (ongoing plus
    # queued, at their largest replica count), so the ingress never accepts a request that could
    # only wait for a model; past it the proxy answers 503 + Retry-After without running our code.
    max_ongoing_requests: Optional[int] = Field(None, ge=1)
    # Requests the HTTP proxy holds for a full ingress replica before answering 503 (-1: unbounded).
    # Serve's Python proxy counts every request it is still assigning as queued, so a small bound
    # sheds ordinary bursts; 64 absorbs them (the overload runs used 2-4 behind HAProxy).
    max_queued_requests: int = Field(64, ge=-1)
    # Routed, one handle call per request: each ingress replica sends a model version at most its
    # share of the slots (max_ongoing_requests) of that version's RUNNING replicas; past it one
    # batch of realtime requests waits at the ingress in arrival order (ModelSpec.slot_queue_bound)
    # and the rest get 503 + Retry-After at once, instead of waiting in Serve's handle queue while
    # the router re-probes full replicas (README "Admission"; deployments/slot_gate.py).
    # Off: Serve's handle queue (autoscaling.max_queued_requests) alone.
    admit_by_replica_slots: bool = True
    # None: one handle call per request (routed) or no hop at all (fused).
    gather: Optional[GatherOptions] = None
    # A request carrying this header goes to the version its value hashes to (README "Model
    # versions"): one user stays on one version of an A/B split.
    sticky_key_header: str = Field("X-Routing-Key", pattern=r"^[A-Za-z0-9-]{1,64}$")

    @model_validator(mode="after")
    def _gather_needs_routed(self) -> "IngressOptions":
        if self.gather is not None and self.mode != "routed":
            raise ValueError("gather merges the ingress's calls to model servers; it needs mode: routed (fused has no hop)")
        return self


class CostConfig(_Strict):
    """Device prices, turned into cost per 1000 requests (defaults are placeholders: set yours)."""

    gpu_hour_usd: float = Field(2.50, ge=0)
    cpu_hour_usd: float = Field(0.05, ge=0)
    # Sliding window over which device-seconds and served requests are compared.
    window_s: float = Field(60.0, gt=0, le=3600)


class AppArgs(_Strict):
    """The `args:` block of serve_config.yaml."""

    models: list[ModelSpec] = Field(min_length=1)
    ingress: IngressOptions = Field(default_factory=IngressOptions)
    cost: CostConfig = Field(default_factory=CostConfig)

    @model_validator(mode="after")
    def _unique_names(self) -> "AppArgs":
        seen: set[str] = set()
        for i, m in enumerate(self.models):
            if m.name in seen:
                raise ValueError(f"models[{i}].name: duplicate model name {m.name!r}")
            seen.add(m.name)
            if self.ingress.mode == "fused" and len(self.models) != 1:
                raise ValueError(
                    f"ingress.mode: 'fused' serves exactly one model per application ({len(self.models)} given); "
                    "declare one application per model, each with its own route_prefix"
                )
            if self.ingress.mode == "fused" and m.versions:
                raise ValueError(f"models[{i}].versions: versions are separate deployments, served in ingress.mode 'routed'")
            if self.ingress.mode == "fused" and m.task == "generate":
                raise ValueError(f"models[{i}].task: 'generate' is served in ingress.mode 'routed' only")
            max_ongoing = m.deployment.max_ongoing_requests
            if max_ongoing is not None and max_ongoing < m.min_ongoing_requests:
                raise ValueError(
                    f"models[{i}].deployment.max_ongoing_requests: {max_ongoing} is below "
                    f"batching.max_batch_size x max_concurrent_batches = {m.min_ongoing_requests}; "
                    "batches could never fill"
                )
            gather = self.ingress.gather
            if gather is not None and gather.transport == "direct" and m.autoscaling.enabled \
                    and m.autoscaling.policy == "default":
                # Serve's default policy counts handle calls; calls on the direct link are not among them.
                raise ValueError(
                    f"models[{i}].autoscaling.policy: 'default' counts Serve handle calls, which "
                    "ingress.gather.transport 'direct' bypasses; use policy: queue_depth (the batch queue "
                    "the model server reports) or transport: handle"
                )
        return self

    def ingress_max_ongoing_requests(self) -> int:
        if self.ingress.max_ongoing_requests is not None:
            return self.ingress.max_ongoing_requests
        total = 0
        for m in (v for model in self.models for v in model.version_specs().values()):
            queued = m.effective_max_queued_requests(self.ingress.num_replicas)
            if queued < 0:  # an unbounded model queue: the ingress bound is the only one left
                return 1000
            total += m.effective_max_ongoing_requests() * m.max_replicas() + queued
        # Twice what the models hold (at least 64): when they are full, the ingress must still take
        # the next request so the model handle turns it away with 503 at once; an ingress bound
        # equal to the models' would leave that request waiting in the proxy's queue instead.
        return max(64, 2 * total)

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

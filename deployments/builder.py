"""`serve run serve_config.yaml` enters here: validate the args once, plan each model, wire the deployments."""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve import Application

from app.config import AppArgs, ModelSpec, parse_app_args
from app.models.loader import build_config, load_tokenizer
from app.planner import ParallelPlan, PlanError, plan_model
from deployments.generator import GeneratorServer
from deployments.ingress import FusedIngress, Ingress
from deployments.model_server import ModelServer

logger = logging.getLogger("ray.serve")

INGRESS_NAME = "Ingress"

# What every deployment sheds with: a request past its queue bound gets 503 and Retry-After at once
# (Serve answers it at the proxy or the caller's handle, before any of our code runs). Requests
# waiting at a handle re-probe full replicas with a backoff; Serve's default grows it to 0.5 s,
# so at saturation a queued request could lose several rounds to newer ones (unfair, seconds of
# tail latency: measured in docs/performance.md "Overload"); 50 ms keeps the queue close to FIFO.
SHED_OPTIONS: dict[str, Any] = {
    "backpressure_config": {"status_code": 503, "retry_after_s": 1},
}
ROUTER_OPTIONS: dict[str, Any] = {
    "request_router_config": {"initial_backoff_s": 0.01, "backoff_multiplier": 2.0, "max_backoff_s": 0.05},
}


def model_deployment_options(spec: ModelSpec, plan: ParallelPlan, callers: int = 1,
                             name: str | None = None) -> dict[str, Any]:
    d = spec.deployment
    gpu = spec.parallel.devices.kind == "gpu" and spec.device != "cpu"
    options: dict[str, Any] = {
        "name": name or spec.name,
        "num_replicas": d.num_replicas,
        "max_ongoing_requests": spec.effective_max_ongoing_requests(),
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
        # Seeds reconfigure(); `serve deploy` with a changed user_config retunes live (encoders: a
        # generator's batch is the engine's running set, sized at start from memory).
        **({} if spec.task == "generate" else {"user_config": spec.batching.model_dump()}),
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        **ROUTER_OPTIONS,
    }
    a = spec.autoscaling
    options["max_queued_requests"] = spec.effective_max_queued_requests(callers)
    options.update(SHED_OPTIONS)
    if a.enabled:
        options.pop("num_replicas")
        autoscaling: dict[str, Any] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": spec.effective_target_ongoing_requests(),
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
            "metrics_interval_s": a.metrics_interval_s,
            "look_back_period_s": a.look_back_period_s,
        }
        if a.policy == "queue_depth":
            autoscaling["policy"] = {
                "policy_function": "app.autoscaling:QueueDepthPolicy",
                "policy_kwargs": {"items_per_replica": spec.autoscale_items_per_replica(),
                                  "target_queue_wait_ms": a.target_queue_wait_ms},
            }
        options["autoscaling_config"] = autoscaling
    if spec.task == "generate" and plan.strategy != "replicated":
        # The replica is rank 0 of its gang (app/runners/gang_generation.py); bundle s holds stage
        # s's tp ranks, so a stage's all-reduces stay inside one node (a bundle never spans nodes)
        # while PACK puts the stages on as few nodes as hold them (one node where they fit).
        tp, rank_cpus = plan.tp, spec.parallel.rank_num_cpus
        stage_bundle = {"CPU": tp * rank_cpus, **({"GPU": tp} if gpu else {})}
        options["ray_actor_options"] = {"num_cpus": rank_cpus, "num_gpus": 1 if gpu else 0}
        options["placement_group_bundles"] = [dict(stage_bundle) for _ in range(plan.pp)]
        options["placement_group_strategy"] = "PACK"
        options["health_check_period_s"] = 2
    elif plan.strategy == "deepspeed_tp":
        # The replica only drives its ranks: bundle 0 is its own, bundles 1..tp hold one rank each,
        # packed onto one node. Each new replica reserves a whole new gang.
        rank_bundle = {"CPU": spec.parallel.rank_num_cpus, **({"GPU": 1} if gpu else {})}
        options["ray_actor_options"] = {"num_cpus": d.num_cpus, "num_gpus": 0}
        options["placement_group_bundles"] = [{"CPU": d.num_cpus}] + [dict(rank_bundle) for _ in range(plan.tp)]
        options["placement_group_strategy"] = "STRICT_PACK"
        # A gang that lost a rank answers 503 until Serve replaces it, which takes three failed
        # health checks: ping the ranks (cheap) every 2 s rather than every 10 s.
        options["health_check_period_s"] = 2
    elif plan.strategy == "tp_pp":
        # Encoder stages (app/runners/stage_pipeline.py): bundle 0 is the replica's own, bundle
        # 1 + s holds stage s's tp ranks (a stage never spans nodes); PACK spreads stages over nodes
        # only where one node cannot hold them.
        stage_bundle = {"CPU": plan.tp * spec.parallel.rank_num_cpus, **({"GPU": plan.tp} if gpu else {})}
        options["ray_actor_options"] = {"num_cpus": d.num_cpus, "num_gpus": 0}
        options["placement_group_bundles"] = [{"CPU": d.num_cpus}] + [dict(stage_bundle) for _ in range(plan.pp)]
        options["placement_group_strategy"] = "PACK"
        options["health_check_period_s"] = 2
    elif plan.strategy == "fairscale_pp":
        options["ray_actor_options"] = {"num_cpus": d.num_cpus, "num_gpus": plan.pp if gpu else 0}
    return options


def _plan(spec: ModelSpec, index: int) -> tuple[ParallelPlan, int]:
    vocab = len(load_tokenizer(spec))
    try:
        plan = plan_model(spec, vocab)
    except PlanError as e:
        raise PlanError(f"models[{index}] ({spec.name}): {e}") from None
    if plan.strategy == "fairscale_pp" and plan.pp > spec.parallel.devices.per_node and spec.task != "generate":
        raise PlanError(
            f"models[{index}].parallel: {spec.name} needs a {plan.pp}-stage pipeline across nodes; "
            f"fairscale.nn.Pipe runs inside one replica process on one node ({spec.parallel.devices.per_node} devices)"
        )
    logger.info("plan for %s: %s (tp=%d pp=%d chunks=%d, max batch %d) -- %s", spec.name, plan.strategy, plan.tp,
                plan.pp, plan.chunks, plan.max_batch_size, plan.explain())
    return plan, vocab


def build_app(raw_args: dict[str, Any]) -> Application:
    """Build the application from serve_config.yaml's `args` (Serve passes exactly that one dict).

    Batching starts from each model's `batching` block, sent as the deployment's user_config. A
    `deployments: [{name: <model>, user_config: ...}]` entry in the config file overrides it and
    retunes running replicas without a restart; any change under `args` makes Serve rebuild the
    application and restart every replica.
    """
    args: AppArgs = parse_app_args(raw_args)
    if args.ingress.mode == "fused":
        # One deployment that is ingress and model server at once; named after its model so that
        # `deployments: [{name: <model>, user_config: ...}]` retunes it exactly as in routed mode.
        (spec,) = args.models
        plan, vocab = _plan(spec, 0)
        return serve.deployment(FusedIngress).options(**model_deployment_options(spec, plan)).bind(args, plan, vocab)
    handles: dict[str, dict[str, Any]] = {}  # model -> version -> its deployment
    vocab_sizes: dict[str, int] = {}
    for i, model in enumerate(args.models):
        if model.name == INGRESS_NAME:
            raise ValueError(f"models[{i}].name: {INGRESS_NAME!r} is reserved for the HTTP ingress")
        handles[model.name] = {}
        for version, spec in model.version_specs().items():
            plan, vocab = _plan(spec, i)
            # The ingress checks token ids against one vocabulary per model: versions must share it.
            size = int(build_config(spec, vocab).vocab_size)
            if vocab_sizes.setdefault(model.name, size) != size:
                raise ValueError(f"models[{i}].versions: version {version!r} has {size} token ids, "
                                 f"another version {vocab_sizes[model.name]}; versions of a model share a vocabulary")
            options = model_deployment_options(spec, plan, callers=args.ingress.num_replicas,
                                               name=model.deployment_name(version))
            if spec.task == "generate":
                bound = serve.deployment(GeneratorServer).options(**options).bind(spec, plan, args.cost)
            else:
                bound = serve.deployment(ModelServer).options(**options).bind(spec, plan, vocab, args.cost, version)
            handles[model.name][version] = bound
    ing = args.ingress
    ingress = serve.deployment(Ingress).options(
        name=INGRESS_NAME,
        num_replicas=ing.num_replicas,
        max_ongoing_requests=args.ingress_max_ongoing_requests(),
        max_queued_requests=ing.max_queued_requests,
        **SHED_OPTIONS,
        **ROUTER_OPTIONS,  # the proxy's router re-probes a full ingress as a handle does a full model
        ray_actor_options={"num_cpus": ing.num_cpus},
        # The traffic split of each model's versions, live: a `deployments: [{name: Ingress,
        # user_config: {splits: ...}}]` override moves it without restarting anything.
        user_config={"splits": {m.name: m.version_weights() for m in args.models}},
    )
    return ingress.bind(args, handles, vocab_sizes)

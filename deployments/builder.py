"""`serve run serve_config.yaml` enters here: validate the args once, then wire the deployments."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from app.config import AppArgs, ModelSpec, parse_app_args
from deployments.ingress import Ingress
from deployments.model_server import ModelServer

INGRESS_NAME = "Ingress"


def model_deployment_options(spec: ModelSpec) -> dict[str, Any]:
    d = spec.deployment
    return {
        "name": spec.name,
        "num_replicas": d.num_replicas,
        "max_ongoing_requests": spec.effective_max_ongoing_requests(),
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
        # Seeds reconfigure(); `serve deploy` with a changed user_config retunes live.
        "user_config": spec.batching.model_dump(),
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
    }


def build_app(raw_args: dict[str, Any]) -> Application:
    """Build the application from serve_config.yaml's `args` (Serve passes exactly that one dict).

    Batching starts from each model's `batching` block, sent as the deployment's user_config. A
    `deployments: [{name: <model>, user_config: ...}]` entry in the config file overrides it and
    retunes running replicas without a restart; any change under `args` makes Serve rebuild the
    application and restart every replica.
    """
    args: AppArgs = parse_app_args(raw_args)
    handles = {}
    for spec in args.models:
        if spec.name == INGRESS_NAME:
            raise ValueError(f"models: the name {INGRESS_NAME!r} is reserved for the HTTP ingress")
        handles[spec.name] = serve.deployment(ModelServer).options(**model_deployment_options(spec)).bind(spec)
    ing = args.ingress
    ingress = serve.deployment(Ingress).options(
        name=INGRESS_NAME,
        num_replicas=ing.num_replicas,
        max_ongoing_requests=ing.max_ongoing_requests,
        ray_actor_options={"num_cpus": ing.num_cpus},
    )
    return ingress.bind(args, handles)

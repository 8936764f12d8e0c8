"""HTTP ingress: Open Inference Protocol v2 and a simple JSON route, in front of one model server per model;
the generation routes (OpenAI-compatible) come from generate_routes.py.

Every request is parsed and validated here, before it can join a batch; errors become JSON with the
right status (http_edge.py, which also counts and times every request). Serve itself echoes or
assigns `X-Request-ID` on every response; each inference answer also carries `X-Model-Version` and
the `traceparent` of its span (app/tracing.py).
"""


import asyncio
import logging
import time
from dataclasses import replace
from typing import Any, Optional

from fastapi import Request
from fastapi.responses import Response
from opentelemetry.trace import Status, StatusCode
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.config import AppArgs, LimitsConfig, ModelSpec
from app.planner import ParallelPlan
from app.metrics import IngressMetrics
from app.errors import InvalidInput, ModelNotFound
from app.protocols import openapi_body
from app.protocols.v1 import V1_REQUEST_SCHEMA, parse_v1_request, v1_predictions
from app.protocols.v2 import V2_REQUEST_SCHEMA, encode_v2_response, parse_v2_request, triton_model_config, v2_model_metadata
from app.requests import InferenceResult, ModelInput
from app.tracing import Tracer, request_id
from app.traffic import PRIORITY_HEADER, header_class
from app.versions import VersionSplit
from app.bounded import parse_length_header, read_body
from deployments.clients import GatheringClient, HandleClient, LocalClient, ModelClient, as_serving_error
from deployments.generate_routes import GenerationRoutes, merged_generation_limits
from deployments.http_app import api, json_response
from deployments.http_edge import TRACEPARENT, mark_served
from deployments.slot_gate import SlotGate
from deployments.model_server import ModelServer

logger = logging.getLogger("ray.serve")


@serve.ingress(api)
class Ingress(GenerationRoutes):
    """Routed mode: one handle per model-server deployment (`ingress.mode: routed`)."""

    def __init__(self, args: AppArgs, handles: dict[str, dict[str, DeploymentHandle]], vocab_sizes: dict[str, int]):
        gather = args.ingress.gather
        clients: dict[str, dict[str, ModelClient]] = {}
        # Admission by replica slots (deployments/slot_gate.py): one-shot calls through a handle.
        context = serve.get_replica_context() if args.ingress.admit_by_replica_slots else None
        for name, versions in handles.items():
            model = args.model(name)
            # Generators stream through their handle (generate_routes.py); merging is for one-shot calls.
            one_shot = model.task != "generate"
            specs = model.version_specs()
            clients[name] = {v: GatheringClient(specs[v], h, gather) if gather and one_shot
                             else HandleClient(model.deployment_name(v), h, specs[v].effective_replica_wait_s(),
                                               None if context is None or not one_shot else
                                               SlotGate(h.app_name, h.deployment_name,
                                                        specs[v].effective_max_ongoing_requests(), context.deployment,
                                                        specs[v].slot_queue_bound(args.ingress.num_replicas),
                                                        ingress_replica_id=context.replica_id.unique_id))
                             for v, h in versions.items()}
        self.generators = {n: next(iter(vs.values())) for n, vs in handles.items() if args.model(n).task == "generate"}
        self._setup(args, clients, vocab_sizes)

    def _setup(self, args: AppArgs, clients: dict[str, dict[str, ModelClient]], vocab_sizes: dict[str, int]) -> None:
        self.specs: dict[str, ModelSpec] = {m.name: m for m in args.models}
        # Each model's embedding rows: token ids past them are refused here, before any batch.
        self.vocab_sizes = vocab_sizes
        self.clients = clients
        self._metadata: dict[str, dict[str, Any]] = {}
        # The FastAPI app is this replica's own; its state carries what the middleware needs.
        api.state.metrics = IngressMetrics()
        api.state.model_names = frozenset(self.specs)
        api.state.fast_ingress = self if args.ingress.fast_routes else None
        self._started = int(time.time())
        self._generation_limits = merged_generation_limits(self.specs.values())
        self._sticky_header = args.ingress.sticky_key_header.lower()
        self.splits = {m.name: VersionSplit(m.name, m.version_weights()) for m in args.models}
        self.tracer = Tracer("ingress")

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """`splits: {model: {version: weight}}` (the builder seeds it from each version's `weight`):
        a `serve deploy` that changes only this moves traffic between versions without a restart."""
        splits = dict(self.splits)
        for name, weights in (user_config or {}).get("splits", {}).items():
            spec = self.specs.get(name)
            if spec is None:
                raise ValueError(f"Ingress user_config splits: no model {name!r}; models: {sorted(self.specs)}")
            unknown = set(weights) - set(spec.version_names())
            if unknown:
                raise ValueError(f"Ingress user_config splits.{name}: no version(s) {sorted(unknown)}; "
                                 f"versions: {spec.version_names()}")
            splits[name] = VersionSplit(name, {v: float(weights.get(v, 0.0)) for v in spec.version_names()})
        self.splits = splits
        logger.info("traffic splits: %s", {n: s.weights for n, s in splits.items()})

    # ------------------------------------------------------------------ helpers

    def _spec(self, name: str) -> ModelSpec:
        spec = self.specs.get(name)
        if spec is None:
            raise ModelNotFound(f"model {name!r} is not served here; models: {sorted(self.specs)}")
        return spec

    def _encoder_spec(self, name: str) -> ModelSpec:
        spec = self._spec(name)
        if spec.task == "generate":
            raise InvalidInput(f"model {name!r} generates text: use /v1/completions, /v1/chat/completions or "
                               f"/v2/models/{name}/generate")
        return spec

    async def _body(self, request: Request, spec: ModelSpec) -> bytes:
        return await self._read_body(request, spec.limits)

    async def _read_body(self, request: Request, lim: LimitsConfig) -> bytes:
        declared = parse_length_header(request.headers.get("content-length"), "Content-Length")
        return await read_body(request.stream(), declared, lim.max_body_bytes, lim.body_idle_timeout_s,
                               lim.body_timeout_s)

    def _version(self, name: str, request: Request, pinned: Optional[str]) -> str:
        split = self.splits[name]
        if pinned is not None:
            return split.check(pinned)
        return split.pick(request.headers.get(self._sticky_header))

    def _request_class(self, request: Request, spec: ModelSpec) -> str:
        return header_class(request.headers.get(PRIORITY_HEADER), spec.traffic.default_class)

    async def _infer(self, request: Request, name: str, version: str, inputs: ModelInput) -> tuple[InferenceResult, str]:
        """The result and the `traceparent` of this request's span (app/tracing.py), which the
        model server's batch span links to and the response carries back."""
        mark_served(request, version, inputs.traffic_class)
        span = self.tracer.request_span(f"infer {name}", request.headers, {
            "model": name, "model.version": version, "traffic_class": inputs.traffic_class})
        traceparent = Tracer.traceparent(span)
        request.scope[TRACEPARENT] = traceparent  # error answers carry it too (_serving_error)
        try:
            result = await self.clients[name][version].infer(
                replace(inputs, traceparent=traceparent, request_id=request_id() or ""))
        except Exception as e:  # noqa: BLE001 - mapped to a status code
            err = as_serving_error(e)
            span.set_status(Status(StatusCode.ERROR, err.error_type))
            raise err from None
        finally:
            span.end()
        return result, traceparent

    async def _describe(self, name: str, version: Optional[str] = None, fresh: bool = False) -> dict[str, Any]:
        """What a version's model server says of itself (default: the model's first version), with
        the model's versions and split beside it. `fresh`: ask again (live batching, for /v1/models)."""
        version = version or self.specs[name].version_names()[0]
        key = f"{name}@{version}"
        if fresh or key not in self._metadata:
            self._metadata[key] = await self.clients[name][version].describe()
        return {**self._metadata[key], "version": version, "versions": self.splits[name].versions,
                "split": self.splits[name].weights}

    async def _model_ready(self, name: str, version: Optional[str] = None) -> bool:
        versions = [version] if version is not None else list(self.clients[name])
        return all(await asyncio.gather(*(self.clients[name][v].ready() for v in versions)))

    # ------------------------------------------------------------------ v2 protocol

    @api.get("/v2")
    async def server_metadata(self) -> Response:
        return json_response({"name": "batchserve", "version": "0.1.0", "extensions": ["binary_tensor_data"]})

    @api.get("/v2/health/live")
    async def live(self) -> Response:
        return json_response({"live": True})

    @api.get("/v2/health/ready")
    async def ready(self) -> Response:
        states = await asyncio.gather(*(self._model_ready(n) for n in self.specs))
        ok = all(states)
        return json_response({"ready": ok, "models": dict(zip(self.specs, states))}, 200 if ok else 503)

    @api.get("/v2/models/{name}")
    async def model_metadata(self, name: str) -> Response:
        spec = self._spec(name)
        meta = await self._describe(name)
        return json_response(v2_model_metadata(spec, meta.get("output_dim")))

    @api.get("/v2/models/{name}/config")
    async def model_config(self, name: str) -> Response:
        """Triton's model configuration (what tritonclient's get_model_config reads)."""
        spec = self._spec(name)
        meta = await self._describe(name)
        return json_response(triton_model_config(spec, meta.get("output_dim"), meta.get("batching", {}).get("max_batch_size")))

    @api.get("/v2/models/{name}/ready")
    async def model_ready(self, name: str) -> Response:
        self._spec(name)
        ok = await self._model_ready(name)
        return json_response({"name": name, "ready": ok}, 200 if ok else 503)

    @api.get("/v2/models/{name}/versions/{version}")
    async def model_version_metadata(self, name: str, version: str) -> Response:
        spec = self._spec(name)
        meta = await self._describe(name, self.splits[name].check(version))
        return json_response({**v2_model_metadata(spec, meta.get("output_dim")), "versions": [version]})

    @api.get("/v2/models/{name}/versions/{version}/ready")
    async def model_version_ready(self, name: str, version: str) -> Response:
        self._spec(name)
        ok = await self._model_ready(name, self.splits[name].check(version))
        return json_response({"name": name, "version": version, "ready": ok}, 200 if ok else 503)

    @api.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=openapi_body(V2_REQUEST_SCHEMA))
    async def v2_infer_version(self, name: str, version: str, request: Request) -> Response:
        return await self._v2_infer(name, request, version)

    @api.post("/v2/models/{name}/infer", openapi_extra=openapi_body(V2_REQUEST_SCHEMA))
    async def v2_infer(self, name: str, request: Request) -> Response:
        return await self._v2_infer(name, request, None)

    async def _v2_infer(self, name: str, request: Request, version: Optional[str]) -> Response:
        spec = self._encoder_spec(name)
        version = self._version(name, request, version)
        body = await self._body(request, spec)
        header_len = parse_length_header(request.headers.get("inference-header-content-length"),
                                         "Inference-Header-Content-Length")
        req = parse_v2_request(body, header_len, spec, self.vocab_sizes.get(name), self._request_class(request, spec))
        result, traceparent = await self._infer(request, name, version, req.inputs)
        payload, json_len = encode_v2_response(spec, req, result)
        headers = result.timing_headers()
        headers["X-Model-Version"] = version
        headers["traceparent"] = traceparent
        if json_len is not None:
            headers["Inference-Header-Content-Length"] = str(json_len)
            return Response(payload, media_type="application/octet-stream", headers=headers)
        return Response(payload, media_type="application/json", headers=headers)

    # ------------------------------------------------------------------ simple JSON route

    @api.post("/v1/models/{name}/versions/{version}:predict", openapi_extra=openapi_body(V1_REQUEST_SCHEMA))
    async def v1_predict_version(self, name: str, version: str, request: Request) -> Response:
        return await self._v1_predict(name, request, version)

    @api.post("/v1/models/{name}:predict", openapi_extra=openapi_body(V1_REQUEST_SCHEMA))
    async def v1_predict(self, name: str, request: Request) -> Response:
        return await self._v1_predict(name, request, None)

    async def _v1_predict(self, name: str, request: Request, version: Optional[str]) -> Response:
        spec = self._encoder_spec(name)
        version = self._version(name, request, version)
        inputs = parse_v1_request(await self._body(request, spec), spec, self._request_class(request, spec))
        result, traceparent = await self._infer(request, name, version, inputs)
        headers = {**result.timing_headers(), "X-Model-Version": version, "traceparent": traceparent}
        return json_response({"predictions": v1_predictions(spec, result.outputs)}, headers=headers)

    @api.get("/v1/models")
    async def list_models(self) -> Response:
        """OpenAI's list shape (`openai.models.list()` reads it), each entry with the service's own fields."""
        described = await asyncio.gather(*(self._describe(n, fresh=True) for n in self.specs))
        return json_response({"object": "list", "data": [
            {"id": d["name"], "object": "model", "created": self._started, "owned_by": "batchserve", **d}
            for d in described]})


class FusedIngress(Ingress):
    """Fused mode (`ingress.mode: fused`): this replica is both the HTTP ingress and the batched
    model server of the application's one model. Requests skip the handle hop entirely; batching,
    live retune, health checks and autoscaling stats are the model server's own."""

    # Serve's ingress wrapper has an async __init__; a subclass must await it.
    async def __init__(self, args: AppArgs, plan: ParallelPlan, vocab_size: int):
        (spec,) = args.models
        self.server = ModelServer(spec, plan, vocab_size, args.cost)
        await super().__init__(args, {}, {spec.name: self.server.model_vocab})
        self.clients = {spec.name: {spec.version_names()[0]: LocalClient(self.server)}}

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.server.reconfigure(user_config)

    def check_health(self) -> None:
        self.server.check_health()

    def record_autoscaling_stats(self) -> dict[str, float]:
        return self.server.record_autoscaling_stats()

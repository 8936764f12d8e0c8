"""HTTP ingress: Open Inference Protocol v2 and a simple JSON route, in front of one model server per model;
the generation routes (OpenAI-compatible) come from generate_routes.py.

Every request is parsed and validated here, before it can join a batch; errors become JSON with the
right status. Serve itself echoes or assigns `X-Request-ID` on every response.
"""


import asyncio
import logging
import re
import time
from typing import Any, Optional

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.config import AppArgs, LimitsConfig, ModelSpec
from app.planner import ParallelPlan
from app.metrics import IngressMetrics
from app.errors import (
    InvalidInput,
    MethodNotAllowed,
    ModelNotFound,
    Overloaded,
    ReplicaUnavailable,
    RouteNotFound,
    ServingError,
)
from app.protocols import openapi_body
from app.protocols.v1 import V1_REQUEST_SCHEMA, parse_v1_request, v1_predictions
from app.protocols.v2 import V2_REQUEST_SCHEMA, encode_v2_response, parse_v2_request, triton_model_config, v2_model_metadata
from app.requests import InferenceResult, ModelInput
from app.traffic import PRIORITY_HEADER, header_class
from app.versions import VersionSplit
from app.bounded import parse_length_header, read_body
from deployments.clients import GatheringClient, HandleClient, LocalClient, ModelClient, as_serving_error
from deployments.generate_routes import GenerationRoutes, merged_generation_limits
from deployments.http_app import api, json_response
from deployments.model_server import ModelServer

logger = logging.getLogger("ray.serve")


class _Observe:
    """Count every request by model, route and outcome, and time it (app/metrics.py).

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware runs each request through an extra task
    and memory streams, a measurable cost at thousands of requests per second.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_observed(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        except asyncio.CancelledError:
            # The client went away (or the proxy's request timeout cancelled us): not a server error.
            status = 499
            raise
        finally:
            state = scope["app"].state if "app" in scope else None
            metrics: Optional[IngressMetrics] = getattr(state, "metrics", None)
            if metrics is not None:
                # The router (or _FastRoutes) puts the matched route and path parameters on the scope.
                route = scope.get("route")
                template = scope.get("route_template") or (route.path if route is not None else "unmatched")
                name = scope.get("path_params", {}).get("name")
                known = getattr(state, "model_names", ())
                model = "-" if name is None else (name if name in known else "unknown")
                # The routes put the version and traffic class they served on the scope (_served).
                served = scope.get(_SERVED, {})
                metrics.record(model, template, status, (time.perf_counter() - t0) * 1000.0,
                               served.get("version", "-"), served.get("class", "-"))


_SERVED = "batchserve.served"  # scope key: {"version", "class"} of the request, for the metrics


def _served(request: Request, version: str, cls: str) -> None:
    request.scope[_SERVED] = {"version": version, "class": cls}


class _FastRoutes:
    """The inference routes answered straight from ASGI, ahead of FastAPI (`ingress.fast_routes`).

    FastAPI's per-request machinery (middleware layers, a scan of every route, dependency solving,
    endpoint wrappers) costs a replica's one Python core about 250 us per request on the 2-core
    machine, half of what a whole bare no-op request costs (bench/replica_cpu.py measures it);
    serving the model's routes through it cost ~20 % of the replica's CPU. Here the two inference
    routes skip it: the path is matched once, and the very same route methods, limits and error
    mapping answer (FastAPI still serves every other route, and documents these two in
    /openapi.json).
    """

    # (pattern, route path template, Ingress method): the patterns FastAPI compiles for the routes.
    _ROUTES = (
        (re.compile(r"/v2/models/([^/]+)/infer"), "/v2/models/{name}/infer", "v2_infer"),
        (re.compile(r"/v1/models/([^/]+):predict"), "/v1/models/{name}:predict", "v1_predict"),
        (re.compile(r"/v2/models/([^/]+)/versions/([^/]+)/infer"), "/v2/models/{name}/versions/{version}/infer",
         "v2_infer_version"),
        (re.compile(r"/v1/models/([^/]+)/versions/([^/:]+):predict"), "/v1/models/{name}/versions/{version}:predict",
         "v1_predict_version"),
    )

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        ingress = None
        if scope["type"] == "http" and scope["method"] == "POST":
            ingress = getattr(scope["app"].state, "fast_ingress", None)
        if ingress is None:
            return await self.app(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root + "/"):  # served under a route prefix (as Starlette strips it)
            path = path[len(root):]
        for pattern, template, method in self._ROUTES:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            params = dict(zip(("name", "version"), match.groups()))
            # What the router would have set (the route's template and parameters): _Observe reads them.
            scope["route_template"] = template
            scope["path_params"] = params
            request = Request(scope, receive)
            try:
                response = await getattr(ingress, method)(request=request, **params)
            except ServingError as exc:
                response = await _serving_error(request, exc)
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


# Added last runs first: _Observe times and counts what _FastRoutes answers too.
api.add_middleware(_FastRoutes)
api.add_middleware(_Observe)


@api.exception_handler(ServingError)
async def _serving_error(_: Request, exc: ServingError) -> Response:
    headers = {"Retry-After": "1"} if isinstance(exc, (Overloaded, ReplicaUnavailable)) else None
    return json_response(exc.to_json(), exc.status_code, headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's own 404 (no such route) and 405 (wrong method), in the service's error shape."""
    if exc.status_code == 404:
        err: ServingError = RouteNotFound(f"no route {request.method} {request.url.path}; see /docs for the API")
    elif exc.status_code == 405:
        err = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    else:
        err = ServingError(str(exc.detail))
        err.status_code = exc.status_code
        err.error_type = "http_error"
    return json_response(err.to_json(), err.status_code, dict(exc.headers or {}) or None)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
    return json_response(InvalidInput(f"invalid request: {exc.errors()[:3]}").to_json(), 400)


@serve.ingress(api)
class Ingress(GenerationRoutes):
    """Routed mode: one handle per model-server deployment (`ingress.mode: routed`)."""

    def __init__(self, args: AppArgs, handles: dict[str, dict[str, DeploymentHandle]], vocab_sizes: dict[str, int]):
        gather = args.ingress.gather
        clients: dict[str, dict[str, ModelClient]] = {}
        for name, versions in handles.items():
            model = args.model(name)
            # Generators stream through their handle (generate_routes.py); merging is for one-shot calls.
            one_shot = model.task != "generate"
            clients[name] = {v: GatheringClient(model.version_specs()[v], h, gather) if gather and one_shot
                             else HandleClient(model.deployment_name(v), h) for v, h in versions.items()}
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

    async def _infer(self, name: str, version: str, inputs: ModelInput) -> InferenceResult:
        try:
            return await self.clients[name][version].infer(inputs)
        except Exception as e:  # noqa: BLE001 - mapped to a status code
            raise as_serving_error(e) from None

    async def _describe(self, name: str, version: Optional[str] = None) -> dict[str, Any]:
        """What a version's model server says of itself (default: the model's first version), with
        the model's versions and split beside it."""
        version = version or self.specs[name].version_names()[0]
        key = f"{name}@{version}"
        if key not in self._metadata:
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
        _served(request, version, req.inputs.traffic_class)
        result = await self._infer(name, version, req.inputs)
        payload, json_len = encode_v2_response(spec, req, result)
        headers = result.timing_headers()
        headers["X-Model-Version"] = version
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
        _served(request, version, inputs.traffic_class)
        result = await self._infer(name, version, inputs)
        headers = {**result.timing_headers(), "X-Model-Version": version}
        return json_response({"predictions": v1_predictions(spec, result.outputs)}, headers=headers)

    @api.get("/v1/models")
    async def list_models(self) -> Response:
        """OpenAI's list shape (`openai.models.list()` reads it), each entry with the service's own fields."""
        described = await asyncio.gather(*(self._describe(n) for n in self.specs))
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

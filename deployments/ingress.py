"""HTTP ingress: Open Inference Protocol v2 and a simple JSON route, in front of one model server per model.

Every request is parsed and validated here, before it can join a batch; errors become JSON with the
right status. Serve itself echoes or assigns `X-Request-ID` on every response.
"""


import asyncio
import logging
import time
from typing import Any, Optional

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from app.config import AppArgs, ModelSpec
from app.metrics import IngressMetrics
from app.errors import InvalidInput, ModelFailure, ModelNotFound, Overloaded, PayloadTooLarge, ServingError
from app.schemas import (
    InferenceResult,
    ModelInput,
    encode_v2_response,
    parse_v1_request,
    parse_v2_request,
    v1_predictions,
    v2_model_metadata,
)

logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="batchserve",
    description="PyTorch models behind Ray Serve with dynamic batching (Open Inference Protocol v2 and a simple JSON route).",
)

_READY_TIMEOUT_S = 2.0


def _json(doc: Any, status: int = 200, headers: Optional[dict[str, str]] = None) -> Response:
    return Response(
        orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status, media_type="application/json",
        headers=headers,
    )


@api.middleware("http")
async def _observe(request: Request, call_next):
    """Count every request by model, route and outcome, and time it (app/metrics.py)."""
    t0 = time.perf_counter()
    status = 500
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        metrics: Optional[IngressMetrics] = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            route = request.scope.get("route")
            name = request.scope.get("path_params", {}).get("name")
            known = getattr(request.app.state, "model_names", ())
            model = "-" if name is None else (name if name in known else "unknown")
            metrics.record(model, route.path if route is not None else "unmatched", status,
                           (time.perf_counter() - t0) * 1000.0)


@api.exception_handler(ServingError)
async def _serving_error(_: Request, exc: ServingError) -> Response:
    headers = {"Retry-After": "1"} if isinstance(exc, Overloaded) else None
    return _json(exc.to_json(), exc.status_code, headers)


def _unwrap(exc: BaseException) -> ServingError:
    """Map what a model server call raised to a ServingError, keeping client errors as they were."""
    if isinstance(exc, ServingError):
        return exc
    cause = getattr(exc, "cause", None)
    if isinstance(exc, RayTaskError) and isinstance(cause, ServingError):
        return cause
    if isinstance(exc, BackPressureError):
        return Overloaded("the model's queue is full; retry shortly")
    logger.error("model call failed: %r", exc)
    return ModelFailure(f"the model server failed: {type(exc).__name__}")


@serve.ingress(api)
class Ingress:
    def __init__(self, args: AppArgs, handles: dict[str, DeploymentHandle]):
        self.specs: dict[str, ModelSpec] = {m.name: m for m in args.models}
        self.handles = handles
        self._metadata: dict[str, dict[str, Any]] = {}
        # The FastAPI app is this replica's own; its state carries what the middleware needs.
        api.state.metrics = IngressMetrics()
        api.state.model_names = frozenset(self.specs)

    # ------------------------------------------------------------------ helpers

    def _spec(self, name: str) -> ModelSpec:
        spec = self.specs.get(name)
        if spec is None:
            raise ModelNotFound(f"model {name!r} is not served here; models: {sorted(self.specs)}")
        return spec

    async def _body(self, request: Request, spec: ModelSpec) -> bytes:
        limit = spec.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"the body has {declared} bytes; the limit is {limit}")
        body = await request.body()
        if len(body) > limit:
            raise PayloadTooLarge(f"the body has {len(body)} bytes; the limit is {limit}")
        return body

    async def _infer(self, name: str, inputs: ModelInput) -> InferenceResult:
        try:
            try:
                return await self.handles[name].infer.remote(inputs)
            except RayActorError:
                # The replica died mid-request (killed, OOM, node lost). Inference has no side
                # effects, so one retry on another replica is safe; a second failure is reported.
                logger.warning("model %s: replica died during a request; retrying once", name)
                return await self.handles[name].infer.remote(inputs)
        except Exception as e:  # noqa: BLE001 - mapped to a status code
            raise _unwrap(e) from None

    async def _describe(self, name: str) -> dict[str, Any]:
        if name not in self._metadata:
            self._metadata[name] = await self.handles[name].describe.remote()
        return self._metadata[name]

    async def _model_ready(self, name: str) -> bool:
        try:
            return bool(await asyncio.wait_for(self.handles[name].ready.remote(), _READY_TIMEOUT_S))
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False

    # ------------------------------------------------------------------ v2 protocol

    @api.get("/v2")
    async def server_metadata(self) -> Response:
        return _json({"name": "batchserve", "version": "0.1.0", "extensions": ["binary_tensor_data"]})

    @api.get("/v2/health/live")
    async def live(self) -> Response:
        return _json({"live": True})

    @api.get("/v2/health/ready")
    async def ready(self) -> Response:
        states = await asyncio.gather(*(self._model_ready(n) for n in self.specs))
        ok = all(states)
        return _json({"ready": ok, "models": dict(zip(self.specs, states))}, 200 if ok else 503)

    @api.get("/v2/models/{name}")
    async def model_metadata(self, name: str) -> Response:
        spec = self._spec(name)
        meta = await self._describe(name)
        return _json(v2_model_metadata(spec, meta.get("output_dim")))

    @api.get("/v2/models/{name}/ready")
    async def model_ready(self, name: str) -> Response:
        self._spec(name)
        ok = await self._model_ready(name)
        return _json({"name": name, "ready": ok}, 200 if ok else 503)

    @api.post("/v2/models/{name}/infer")
    async def v2_infer(self, name: str, request: Request) -> Response:
        spec = self._spec(name)
        body = await self._body(request, spec)
        header_len = request.headers.get("inference-header-content-length")
        if header_len is not None and not header_len.isdigit():
            raise InvalidInput("Inference-Header-Content-Length must be a non-negative integer")
        req = parse_v2_request(body, int(header_len) if header_len is not None else None, spec)
        result = await self._infer(name, req.inputs)
        payload, json_len = encode_v2_response(spec, req, result)
        headers = result.timing_headers()
        if json_len is not None:
            headers["Inference-Header-Content-Length"] = str(json_len)
            return Response(payload, media_type="application/octet-stream", headers=headers)
        return Response(payload, media_type="application/json", headers=headers)

    # ------------------------------------------------------------------ simple JSON route

    @api.post("/v1/models/{name}:predict")
    async def v1_predict(self, name: str, request: Request) -> Response:
        spec = self._spec(name)
        inputs = parse_v1_request(await self._body(request, spec), spec)
        result = await self._infer(name, inputs)
        return _json({"predictions": v1_predictions(spec, result.outputs)}, headers=result.timing_headers())

    @api.get("/v1/models")
    async def list_models(self) -> Response:
        described = await asyncio.gather(*(self.handles[n].describe.remote() for n in self.specs))
        return _json({"models": described})

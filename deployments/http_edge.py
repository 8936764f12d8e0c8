"""The HTTP edge around the ingress routes: the request counter and timer (_Observe), the
inference routes answered straight from ASGI (_FastRoutes), and the one map from errors to JSON
answers. Registered on the ingress's FastAPI app when this module is imported."""

import asyncio
import re
import time
from typing import Optional

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import InvalidInput, MethodNotAllowed, Overloaded, ReplicaUnavailable, RouteNotFound, ServingError
from app.metrics import IngressMetrics
from deployments.http_app import api, json_response


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
                # This replica's share of the latency (X-Ingress-Ms, README "Try it"): what a client
                # measures beyond it was spent in the proxy, the network and the client itself.
                took = f"{(time.perf_counter() - t0) * 1000.0:.2f}".encode()
                message = {**message, "headers": [*message.get("headers", ()), (b"x-ingress-ms", took)]}
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
                served = scope.get(SERVED, {})
                metrics.record(model, template, status, (time.perf_counter() - t0) * 1000.0,
                               served.get("version", "-"), served.get("class", "-"))


SERVED = "batchserve.served"  # scope key: {"version", "class"} of the request, for the metrics
TRACEPARENT = "batchserve.traceparent"  # scope key: the request span's traceparent, for error answers


def mark_served(request: Request, version: str, cls: str) -> None:
    request.scope[SERVED] = {"version": version, "class": cls}


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
async def _serving_error(request: Request, exc: ServingError) -> Response:
    headers = {"Retry-After": "1"} if isinstance(exc, (Overloaded, ReplicaUnavailable)) else {}
    if TRACEPARENT in request.scope:
        headers["traceparent"] = request.scope[TRACEPARENT]
    return json_response(exc.to_json(), exc.status_code, headers or None)


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

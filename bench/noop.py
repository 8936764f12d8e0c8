"""A no-op deployment behind the same ingress as the model: the ceiling the serving path allows.

Used by the fast-path benchmarks (bench/fast_path.py, bench/replica_cpu.py): same Serve
HTTP path, same request body read, no model. Served requests/s ÷ this = how much the model side
costs. Two flavours: `fastapi` routes through a FastAPI app (as the model's other routes do);
`asgi` is a bare ASGI callable (as the model's inference routes are: `_FastRoutes` in
deployments/ingress.py), the leaner and so the stricter ceiling.
"""

from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve

noop_api = FastAPI(title="noop")

_ANSWER = b'{"model_name":"noop","outputs":[{"name":"logits","datatype":"FP32","shape":[1,2],"data":[0.0,0.0]}]}'
_READY = b'{"ready":true}'


@serve.ingress(noop_api)
class NoOp:
    @noop_api.post("/v2/models/{name}/infer")
    async def infer(self, name: str, request: Request) -> Response:
        await request.body()
        return Response(_ANSWER, media_type="application/json")

    @noop_api.get("/v2/health/ready")
    async def ready(self) -> Response:
        return Response(_READY, media_type="application/json")


async def _read_body(receive) -> bytes:
    chunks = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


async def noop_asgi(scope, receive, send) -> None:
    """Answer every POST with the fixed answer and every GET with ready, after reading the body."""
    if scope["type"] != "http":
        return
    await _read_body(receive)
    body = _ANSWER if scope["method"] == "POST" else _READY
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _noop_asgi_app():
    # Serve calls a plain function given to `serve.ingress` as a builder of the ASGI app.
    return noop_asgi


@serve.ingress(_noop_asgi_app)
class NoOpASGI:
    pass


def build_noop(args: dict) -> serve.Application:
    cls = {"fastapi": NoOp, "asgi": NoOpASGI}[args.get("flavour", "fastapi")]
    return serve.deployment(cls).options(
        num_replicas=int(args.get("num_replicas", 1)),
        max_ongoing_requests=int(args.get("max_ongoing_requests", 1000)),
        ray_actor_options={"num_cpus": float(args.get("num_cpus", 1))},
    ).bind()

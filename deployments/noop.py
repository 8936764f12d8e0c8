"""A no-op deployment behind the same ingress as the model: the ceiling the serving path allows.

Used by the fast-path benchmark (app/bench/fast_path.py): same Serve HTTP path, same FastAPI
routing, same request body read, no model. Served requests/s ÷ this = how much the model side costs.
"""

from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve

noop_api = FastAPI(title="noop")

_ANSWER = b'{"model_name":"noop","outputs":[{"name":"logits","datatype":"FP32","shape":[1,2],"data":[0.0,0.0]}]}'


@serve.ingress(noop_api)
class NoOp:
    @noop_api.post("/v2/models/{name}/infer")
    async def infer(self, name: str, request: Request) -> Response:
        await request.body()
        return Response(_ANSWER, media_type="application/json")

    @noop_api.get("/v2/health/ready")
    async def ready(self) -> Response:
        return Response(b'{"ready":true}', media_type="application/json")


def build_noop(args: dict) -> serve.Application:
    return serve.deployment(NoOp).options(
        num_replicas=int(args.get("num_replicas", 1)),
        max_ongoing_requests=int(args.get("max_ongoing_requests", 1000)),
        ray_actor_options={"num_cpus": float(args.get("num_cpus", 1))},
    ).bind()

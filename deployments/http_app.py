"""The ingress's FastAPI app and its JSON answer, shared by the route modules (ingress.py, generate_routes.py)."""

from __future__ import annotations

from typing import Any, Optional

import orjson
from fastapi import FastAPI
from fastapi.responses import Response

api = FastAPI(
    title="batchserve",
    description="PyTorch models behind Ray Serve: dynamic batching for encoders (Open Inference Protocol v2 and "
                "a simple JSON route), continuous batching for generators (OpenAI-compatible completions and chat).",
)


def json_response(doc: Any, status: int = 200, headers: Optional[dict[str, str]] = None) -> Response:
    return Response(
        orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status, media_type="application/json",
        headers=headers,
    )

"""Wire formats spoken at the HTTP edge: `v2` (Open Inference Protocol: KServe / Triton REST) and
`v1` (TF-Serving-style JSON). Each turns bytes into app/requests.py's types and results back into
bytes; no Ray, no FastAPI."""

from __future__ import annotations

from typing import Any


def openapi_body(schema: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its body itself (raw bytes, parsed by this module)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}

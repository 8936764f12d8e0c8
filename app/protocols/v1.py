"""TF-Serving-style JSON: POST /v1/models/{name}:predict  {"instances": [...]} -> {"predictions": [...]}."""

from __future__ import annotations

from typing import Any

import numpy as np

from app.config import ModelSpec
from app.config.sections import TRAFFIC_CLASSES
from app.errors import InvalidInput
from app.requests import ModelInput
from app.traffic import traffic_class
from app.validation import check_texts, loads_bounded, softmax

# The request body as JSON Schema, published in the OpenAPI document (/openapi.json, /docs) so
# clients and schema-driven fuzzers know the format; the parser stays the authority (it also
# enforces the per-model limits, which a schema cannot know).
_TEXTS = {"type": "array", "items": {"type": "string"}, "minItems": 1}
V1_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["instances"],
    "properties": {"instances": {**_TEXTS, "description": "texts, one per item"},
                   "priority": {"type": "string", "enum": list(TRAFFIC_CLASSES),
                                "description": "traffic class (default: X-Priority, then the model's)"}},
}


def parse_v1_request(body: bytes, spec: ModelSpec, default_class: str = "realtime") -> ModelInput:
    doc = loads_bounded(body, spec)
    if not isinstance(doc, dict):
        raise InvalidInput('the body must be a JSON object like {"instances": ["some text", ...]}')
    unknown = set(doc) - {"instances", "priority"}
    if unknown:
        raise InvalidInput(f"unknown field(s) {sorted(unknown)}; the body takes 'instances' and 'priority'")
    if "instances" not in doc:
        raise InvalidInput("missing field 'instances' (a list of texts)")
    instances = doc["instances"]
    if not isinstance(instances, list):
        raise InvalidInput("'instances' must be a list of texts")
    cls = traffic_class(doc["priority"], "priority") if "priority" in doc else default_class
    return ModelInput(texts=check_texts(instances, spec, "instances"), traffic_class=cls)


def v1_predictions(spec: ModelSpec, outputs: np.ndarray) -> list[Any]:
    if spec.task == "embed":
        return outputs.tolist()
    probs = softmax(outputs)
    labels = spec.label_names()
    best = probs.argmax(axis=-1)
    return [
        {"label": labels[int(b)], "score": float(p[b]), "probabilities": p.tolist()} for b, p in zip(best, probs)
    ]

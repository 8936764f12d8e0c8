"""Checks shared by every wire format: item counts, texts, token ids, bounded JSON, output naming.

Pure functions; everything a request can get wrong is decided before it joins a batch and raised
as a ServingError whose message names the problem.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import orjson

from app.bounded import check_json_bounds
from app.config import ModelSpec
from app.errors import InvalidInput, PayloadTooLarge




def check_item_count(n: int, spec: ModelSpec) -> None:
    if n == 0:
        raise InvalidInput("the request holds no items; send at least one")
    limit = spec.limits.max_items_per_request
    if n > limit:
        raise PayloadTooLarge(f"{n} items in one request; model {spec.name!r} accepts at most {limit}")


def check_texts(texts: list[Any], spec: ModelSpec, where: str) -> list[str]:
    check_item_count(len(texts), spec)
    limit = spec.limits.max_text_chars
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidInput(f"{where}[{i}] must be a string, got {type(t).__name__}")
        if len(t) > limit:
            raise PayloadTooLarge(f"{where}[{i}] has {len(t)} characters; the limit is {limit}")
    return texts


def check_token_ids(rows: list[list[int]], spec: ModelSpec, where: str,
                    vocab_size: Optional[int] = None) -> list[list[int]]:
    check_item_count(len(rows), spec)
    for i, row in enumerate(rows):
        if len(row) == 0:
            raise InvalidInput(f"{where}[{i}] holds no token ids")
        if len(row) > spec.max_seq_len:
            raise PayloadTooLarge(
                f"{where}[{i}] has {len(row)} tokens; model {spec.name!r} accepts at most {spec.max_seq_len}"
            )
        low, high = min(row), max(row)
        if low < 0:
            raise InvalidInput(f"{where}[{i}] holds a negative token id ({low})")
        if vocab_size is not None and high >= vocab_size:
            raise InvalidInput(f"{where}[{i}] holds token id {high}; model {spec.name!r} has {vocab_size}")
    return rows


# Nesting a request of either route needs (v2: object > inputs > tensor > data > rows), with room.
MAX_JSON_DEPTH = 8


def max_json_values(spec: ModelSpec) -> int:
    """Values a well-formed request can hold: every element of input_ids and attention_mask, plus
    the fields around them."""
    return 2 * spec.limits.max_items_per_request * max(spec.max_seq_len, 1) + 256


def output_names(spec: ModelSpec) -> list[str]:
    return ["embedding"] if spec.task == "embed" else ["logits", "probabilities"]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def named_outputs(spec: ModelSpec, outputs: np.ndarray) -> dict[str, np.ndarray]:
    if spec.task == "embed":
        return {"embedding": outputs}
    return {"logits": outputs, "probabilities": softmax(outputs)}


def loads_bounded(body: bytes, spec: Optional[ModelSpec] = None) -> Any:
    """JSON of a request body, measured (depth, values) before any Python object is built."""
    if spec is not None:
        check_json_bounds(body, MAX_JSON_DEPTH, max_json_values(spec))
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"malformed JSON body: {e}") from None

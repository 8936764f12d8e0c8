"""Open Inference Protocol v2 (KServe / Triton REST): JSON and Triton's binary tensor extension,
both ways; model metadata and the Triton model config."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import numpy as np
import orjson

from app.bounded import check_shape
from app.config import ModelSpec
from app.errors import InvalidInput, PayloadTooLarge
from app.requests import InferenceResult, ModelInput
from app.traffic import traffic_class
from app.validation import check_texts, check_token_ids, loads_bounded, named_outputs, output_names


_V2_INT_TYPES = {"INT64": "<i8", "INT32": "<i4"}


@dataclass(frozen=True)
class V2Request:
    inputs: ModelInput
    request_id: Optional[str]
    # Names of the outputs to return, each mapped to whether it goes back as binary data.
    outputs: dict[str, bool] = field(default_factory=dict)


def _shape(t: dict, where: str, dtype: str, spec: ModelSpec) -> list[int]:
    """Texts take [N] or [N, 1], token ids [N, L]: N up to the item limit, L up to max_seq_len."""
    items = spec.limits.max_items_per_request
    if dtype == "BYTES":
        shape = check_shape(t.get("shape"), where, (items, items), ("items", "texts per item"), "[N] or [N, 1]")
    else:
        shape = check_shape(t.get("shape"), where, (items, spec.max_seq_len), ("items", "tokens"), "[N, L]")
    if dtype != "BYTES" and len(shape) == 2 and 0 in shape:
        raise InvalidInput(f"{where}: shape {shape} holds no token ids")
    return shape


def _flatten(data: Any, where: str, limit: int) -> list[Any]:
    """Row-major flatten of nested JSON lists, refusing anything deeper or larger than a tensor can be."""
    out: list[Any] = []
    stack = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, list):
            if depth > 8:
                raise InvalidInput(f"{where}.data is nested deeper than any supported tensor")
            stack.extend((x, depth + 1) for x in reversed(node))
        else:
            out.append(node)
            if len(out) > limit:
                raise PayloadTooLarge(f"{where}.data holds more than {limit} elements")
    return out


def _split_binary(body: bytes, header_len: Optional[int]) -> tuple[bytes, bytes]:
    if header_len is None:
        return body, b""
    if header_len < 0 or header_len > len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length is {header_len} but the body has only {len(body)} bytes"
        )
    return body[:header_len], body[header_len:]


def _decode_bytes_elements(raw: bytes, where: str) -> list[str]:
    """Triton's binary BYTES layout: each element is a 4-byte little-endian length, then its bytes."""
    out, off = [], 0
    while off < len(raw):
        if off + 4 > len(raw):
            raise InvalidInput(f"{where}: truncated binary BYTES element at offset {off}")
        (n,) = struct.unpack_from("<I", raw, off)
        off += 4
        if off + n > len(raw):
            raise InvalidInput(f"{where}: binary BYTES element at offset {off - 4} overruns the data")
        try:
            out.append(raw[off : off + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInput(f"{where}[{len(out)}] is not valid UTF-8") from None
        off += n
    return out


def parse_v2_request(body: bytes, header_len: Optional[int], spec: ModelSpec,
                     vocab_size: Optional[int] = None, default_class: str = "realtime") -> V2Request:
    json_part, binary = _split_binary(body, header_len)
    doc = loads_bounded(json_part, spec)
    if not isinstance(doc, dict):
        raise InvalidInput("the body must be a JSON object with an 'inputs' list")
    unknown = set(doc) - {"id", "inputs", "outputs", "parameters"}
    if unknown:
        raise InvalidInput(f"unknown field(s) {sorted(unknown)} in the inference request")
    req_id = doc.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise InvalidInput("'id' must be a string")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")

    max_elems = spec.limits.max_items_per_request * max(spec.max_seq_len, 1)
    tensors: dict[str, tuple[str, list[int], list[Any]]] = {}
    offset = 0
    for k, t in enumerate(inputs):
        where = f"inputs[{k}]"
        if not isinstance(t, dict):
            raise InvalidInput(f"{where} must be an object with name, datatype, shape and data")
        name, dtype = t.get("name"), t.get("datatype")
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"{where}.name must be a non-empty string")
        if name in tensors:
            raise InvalidInput(f"input {name!r} appears twice")
        where = f"input {name!r}"
        if dtype not in ("BYTES", *_V2_INT_TYPES):
            raise InvalidInput(f"{where}: datatype {dtype!r} is not accepted; send BYTES texts or INT64 token ids")
        shape = _shape(t, where, dtype, spec)
        n_elems = 1
        for d in shape:
            n_elems *= d
        if n_elems > max_elems:
            raise PayloadTooLarge(f"{where}: shape {shape} holds {n_elems} elements; the limit is {max_elems}")
        tparams = t.get("parameters") or {}
        if not isinstance(tparams, dict):
            raise InvalidInput(f"{where}.parameters must be an object")
        bin_size = tparams.get("binary_data_size")
        if bin_size is not None:
            if "data" in t:
                raise InvalidInput(f"{where} has both 'data' and binary_data_size")
            if not isinstance(bin_size, int) or bin_size < 0 or offset + bin_size > len(binary):
                raise InvalidInput(f"{where}: binary_data_size {bin_size!r} does not fit the binary body")
            raw = binary[offset : offset + bin_size]
            offset += bin_size
            if dtype == "BYTES":
                flat: list[Any] = _decode_bytes_elements(raw, where)
            else:
                width = np.dtype(_V2_INT_TYPES[dtype]).itemsize
                if len(raw) % width:
                    raise InvalidInput(f"{where}: {len(raw)} binary bytes is not a whole number of {dtype}")
                flat = np.frombuffer(raw, dtype=_V2_INT_TYPES[dtype]).tolist()
        else:
            if "data" not in t:
                raise InvalidInput(f"{where} has no 'data'")
            flat = _flatten(t["data"], where, max_elems)
        if len(flat) != n_elems:
            raise InvalidInput(f"{where}: shape {shape} needs {n_elems} elements but {len(flat)} were sent")
        tensors[name] = (dtype, shape, flat)
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data are not claimed by any input")

    model_input = _v2_model_input(tensors, spec, vocab_size)
    cls = traffic_class(params["priority"], "parameters.priority") if "priority" in params else default_class
    model_input = replace(model_input, traffic_class=cls)
    want_binary = bool(params.get("binary_data_output", False))
    outputs = _v2_requested_outputs(doc.get("outputs"), spec, want_binary)
    return V2Request(inputs=model_input, request_id=req_id, outputs=outputs)


def _v2_model_input(tensors: dict[str, tuple[str, list[int], list[Any]]], spec: ModelSpec,
                    vocab_size: Optional[int] = None) -> ModelInput:
    byte_inputs = [n for n, (d, _, _) in tensors.items() if d == "BYTES"]
    if byte_inputs:
        if len(tensors) != 1:
            raise InvalidInput("send exactly one BYTES input of texts, and no other input beside it")
        dtype, shape, flat = tensors[byte_inputs[0]]
        if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
            raise InvalidInput(f"input {byte_inputs[0]!r}: texts take shape [N] or [N, 1], got {shape}")
        texts = [x.decode("utf-8", "strict") if isinstance(x, bytes) else x for x in flat]
        return ModelInput(texts=check_texts(texts, spec, f"input {byte_inputs[0]!r}"))

    if "input_ids" not in tensors:
        raise InvalidInput(f"integer inputs must be named 'input_ids' (and optionally 'attention_mask'); got {sorted(tensors)}")
    extra = set(tensors) - {"input_ids", "attention_mask"}
    if extra:
        raise InvalidInput(f"unexpected input(s) {sorted(extra)} beside 'input_ids'")
    _, shape, flat = tensors["input_ids"]
    if len(shape) != 2:
        raise InvalidInput(f"input 'input_ids' takes shape [N, L], got {shape}")
    for v in flat:
        if not isinstance(v, int) or isinstance(v, bool):
            raise InvalidInput("input 'input_ids' must hold integers")
    n, length = shape
    rows = [flat[i * length : (i + 1) * length] for i in range(n)]
    if "attention_mask" in tensors:
        _, mshape, mflat = tensors["attention_mask"]
        if mshape != shape:
            raise InvalidInput(f"input 'attention_mask' has shape {mshape}; it must match input_ids {shape}")
        if any(v not in (0, 1) or isinstance(v, bool) for v in mflat):
            raise InvalidInput("input 'attention_mask' must hold only 0 and 1")
        masks = [mflat[i * length : (i + 1) * length] for i in range(n)]
        rows = [[t for t, m in zip(r, mk) if m == 1] for r, mk in zip(rows, masks)]
    return ModelInput(token_ids=check_token_ids(rows, spec, "input 'input_ids'", vocab_size))


def _v2_requested_outputs(requested: Any, spec: ModelSpec, default_binary: bool) -> dict[str, bool]:
    names = output_names(spec)
    if requested is None:
        return {n: default_binary for n in names}
    if not isinstance(requested, list) or not requested:
        raise InvalidInput("'outputs' must be a non-empty list of {name, parameters}")
    out: dict[str, bool] = {}
    for k, o in enumerate(requested):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise InvalidInput(f"outputs[{k}] must be an object with a 'name'")
        if o["name"] not in names:
            raise InvalidInput(f"outputs[{k}]: unknown output {o['name']!r}; model {spec.name!r} has {names}")
        p = o.get("parameters") or {}
        if not isinstance(p, dict):
            raise InvalidInput(f"outputs[{k}].parameters must be an object")
        out[o["name"]] = bool(p.get("binary_data", default_binary))
    return out


def encode_v2_response(
    spec: ModelSpec, req: V2Request, result: InferenceResult
) -> tuple[bytes, Optional[int]]:
    """JSON body, or Triton's binary extension when any output was asked in binary.

    Returns (body, header_length); header_length goes in Inference-Header-Content-Length when set.
    """
    arrays = named_outputs(spec, result.outputs)
    outs, blobs = [], []
    for name, binary in req.outputs.items():
        arr = np.ascontiguousarray(arrays[name], dtype=np.float32)
        entry: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(arr.shape)}
        if binary:
            raw = arr.astype("<f4", copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = arr.reshape(-1)
        outs.append(entry)
    doc: dict[str, Any] = {
        "model_name": spec.name,
        "model_version": "1",
        "outputs": outs,
        "parameters": {"batch_size": result.batch_size},
    }
    if req.request_id is not None:
        doc["id"] = req.request_id
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def v2_model_metadata(spec: ModelSpec, embed_dim: Optional[int]) -> dict[str, Any]:
    out_dim = embed_dim if spec.task == "embed" else spec.num_labels
    return {
        "name": spec.name,
        "versions": ["1"],
        "platform": "pytorch",
        "inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [-1]},
            {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
            {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
        ],
        "outputs": [{"name": n, "datatype": "FP32", "shape": [-1, out_dim]} for n in output_names(spec)],
    }


def triton_model_config(spec: ModelSpec, embed_dim: Optional[int], max_batch_size: Optional[int]) -> dict[str, Any]:
    """The model's configuration in Triton's JSON form (GET /v2/models/{name}/config)."""
    out_dim = embed_dim if spec.task == "embed" else spec.num_labels
    return {
        "name": spec.name,
        "platform": "pytorch",
        "backend": "pytorch",
        "max_batch_size": spec.limits.max_items_per_request,
        "input": [
            {"name": "text", "data_type": "TYPE_STRING", "dims": [1]},
            {"name": "input_ids", "data_type": "TYPE_INT64", "dims": [-1]},
            {"name": "attention_mask", "data_type": "TYPE_INT64", "dims": [-1]},
        ],
        "output": [{"name": n, "data_type": "TYPE_FP32", "dims": [out_dim or -1]} for n in output_names(spec)],
        "dynamic_batching": {"preferred_batch_size": [max_batch_size or spec.batching.max_batch_size],
                             "max_queue_delay_microseconds": int(spec.batching.batch_wait_timeout_s * 1e6)},
        "version_policy": {"latest": {"num_versions": 1}},
    }


# The request body as JSON Schema for the OpenAPI document (see app/protocols/v1.py).
V2_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "datatype", "shape", "data"],
            "properties": {
                "name": {"type": "string", "enum": ["text", "input_ids", "attention_mask"]},
                "datatype": {"type": "string", "enum": ["BYTES", "INT64", "INT32"]},
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1, "maxItems": 2},
                "data": {"type": "array"},
                "parameters": {"type": "object"},
            }}},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "parameters": {"type": "object"}}}},
        "parameters": {"type": "object"},
    },
}

"""The frames of the direct ingress-to-engine link (`ingress.gather.transport: direct`).

Each frame is a 4-byte little-endian length and a body. Bodies carry token ids and results as raw
arrays with a small fixed header, never pickles: the engine's port is reachable from the cluster's
network, and decoding a frame must not be able to run code.

    hello   b"H" secret(16)                                        ingress -> engine, once per link
    welcome b"W"                                                   engine -> ingress, the hello was right
    call    b"C" id:u64 requests:u32 rows:u32 lens:u32[rows] ids:i32[sum(lens)]
    answer  b"A" id:u64 meta_len:u32 meta:json outputs:bytes       (meta: shape, dtype, timings)
    error   b"E" id:u64 meta_len:u32 meta:json                     (meta: ServingError.to_json())

Pure functions; unit-tested without sockets.
"""

from __future__ import annotations

import asyncio
import hmac
import struct
from dataclasses import fields

import numpy as np
import orjson

from app.errors import ServingError
from app.requests import InferenceResult, ModelInput

SECRET_BYTES = 16
# Far above any legal call (max_items x max_seq_len int32 ids); a larger length means a broken peer.
MAX_FRAME_BYTES = 256 * 2**20

_LEN = struct.Struct("<I")
_CALL = struct.Struct("<cQII")
_REPLY = struct.Struct("<cQI")
_ERRORS: dict[str, type[ServingError]] = {cls.error_type: cls for cls in (ServingError, *ServingError.__subclasses__())}


class WireError(Exception):
    """A frame that does not parse: the peer is not this protocol (or not this version of it)."""


def frame(body: bytes) -> bytes:
    return _LEN.pack(len(body)) + body


HELLO_BYTES = 1 + SECRET_BYTES


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """The next frame's body, refused before it is read if it announces more than `max_bytes`;
    IncompleteReadError at a clean end of stream."""
    (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if n > max_bytes:
        raise WireError(f"frame of {n} bytes announced (at most {max_bytes})")
    return await reader.readexactly(n)


def hello(secret: bytes) -> bytes:
    return frame(b"H" + secret)


def check_hello(body: bytes, secret: bytes) -> bool:
    # Constant time: how long a wrong secret takes to refuse must not tell how much of it was right.
    return len(body) == HELLO_BYTES and body[:1] == b"H" and hmac.compare_digest(body[1:], secret)


WELCOME = b"W"


def encode_call(call_id: int, inputs: ModelInput) -> bytes:
    rows = inputs.token_ids
    if rows is None:
        raise ValueError("the direct link carries token ids; tokenise at the ingress")
    lens = np.fromiter((len(r) for r in rows), dtype="<u4", count=len(rows))
    ids = np.fromiter((t for r in rows for t in r), dtype="<i4", count=int(lens.sum()))
    return frame(_CALL.pack(b"C", call_id, inputs.requests, len(rows)) + lens.tobytes() + ids.tobytes())


def decode_call(body: bytes) -> tuple[int, ModelInput]:
    try:
        kind, call_id, requests, n = _CALL.unpack_from(body)
        if kind != b"C":
            raise WireError(f"expected a call frame, got kind {kind!r}")
        at = _CALL.size
        lens = np.frombuffer(body, dtype="<u4", count=n, offset=at)
        at += 4 * n
        ids = np.frombuffer(body, dtype="<i4", offset=at)
    except (struct.error, ValueError) as e:
        raise WireError(f"malformed call frame: {e}") from None
    if ids.size != int(lens.sum(dtype=np.int64)):
        raise WireError(f"call frame holds {ids.size} token ids, its row lengths say {int(lens.sum(dtype=np.int64))}")
    flat = ids.tolist()
    bounds = [0] + np.cumsum(lens, dtype=np.int64).tolist()
    return call_id, ModelInput(token_ids=[flat[a:b] for a, b in zip(bounds, bounds[1:])], requests=requests)


def encode_answer(call_id: int, result: InferenceResult) -> bytes:
    outputs = np.ascontiguousarray(result.outputs)
    meta = {f.name: getattr(result, f.name) for f in fields(result) if f.name != "outputs"}
    meta["shape"], meta["dtype"] = outputs.shape, outputs.dtype.str
    raw = orjson.dumps(meta)
    return frame(_REPLY.pack(b"A", call_id, len(raw)) + raw + outputs.tobytes())


def encode_error(call_id: int, error: ServingError) -> bytes:
    raw = orjson.dumps(error.to_json())
    return frame(_REPLY.pack(b"E", call_id, len(raw)) + raw)


def decode_reply(body: bytes) -> tuple[int, InferenceResult | ServingError]:
    """(call id, the result, or the ServingError the engine answered with)."""
    try:
        kind, call_id, n = _REPLY.unpack_from(body)
        meta = orjson.loads(body[_REPLY.size:_REPLY.size + n])
        if kind == b"E":
            return call_id, _ERRORS.get(meta["type"], ServingError)(meta["error"])
        if kind != b"A":
            raise WireError(f"expected an answer frame, got kind {kind!r}")
        shape, dtype = meta.pop("shape"), meta.pop("dtype")
        outputs = np.frombuffer(body, dtype=np.dtype(dtype), offset=_REPLY.size + n).reshape(shape)
        return call_id, InferenceResult(outputs=outputs, **meta)
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise WireError(f"malformed reply frame: {e}") from None

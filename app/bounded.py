"""Bounded work per request, decided before anything large is allocated.

A request's cost must be known from a few bytes before the service pays it: headers are parsed
strictly, a body is read with its size limit and a time limit enforced while it arrives (chunked
or not), and JSON is measured (nesting depth, number of values) with C-speed scans before a parser
builds one Python object. Pure functions, no framework: the ingress passes its ASGI body stream.
"""

from __future__ import annotations

import asyncio
import re
from typing import AsyncIterator, Optional

import numpy as np

from app.errors import InvalidInput, PayloadTooLarge, RequestTimeout

_DECIMAL = re.compile(rb"[0-9]{1,15}")
# A JSON string, escapes included (the unrolled form: linear time, no backtracking blow-up).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def parse_length_header(value: Optional[str], name: str) -> Optional[int]:
    """A byte count from a header: ASCII digits only, at most 15 of them (`int()` also takes '²',
    '١٢' and ' 12_0 ', which no client means)."""
    if value is None:
        return None
    raw = value.encode("latin-1", "replace")
    if _DECIMAL.fullmatch(raw) is None:
        raise InvalidInput(f"{name} must be a decimal byte count (ASCII digits, at most 15); got {value[:32]!r}")
    return int(raw)


FIRST_CHUNK_GRACE_S = 5.0


async def read_body(chunks: AsyncIterator[bytes], declared_length: Optional[int], limit_bytes: int,
                    idle_timeout_s: float, total_timeout_s: float) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `limit_bytes` (from the
    declared length, or while chunks arrive), and with 408 when the client stops sending for
    `idle_timeout_s` (FIRST_CHUNK_GRACE_S for the first piece) or takes longer than
    `total_timeout_s` in all."""
    if declared_length is not None and declared_length > limit_bytes:
        raise PayloadTooLarge(f"the body has {declared_length} bytes; the limit is {limit_bytes}")
    parts: list[bytes] = []
    size = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + total_timeout_s
    it = chunks.__aiter__()
    first = True
    while True:
        # The first piece may wait longer: Serve's proxy hands the body to the replica in messages the
        # replica pulls, and on a loaded host that hand-off alone has taken over a second for a small,
        # complete request. Pauses after it are the client's.
        idle = max(idle_timeout_s, FIRST_CHUNK_GRACE_S) if first else idle_timeout_s
        first = False
        wait = min(idle, deadline - loop.time())
        try:
            chunk = await asyncio.wait_for(it.__anext__(), timeout=max(wait, 0.0))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive in time ({size} bytes received; a body must keep "
                f"arriving, with pauses under {idle_timeout_s:g} s, and be complete within {total_timeout_s:g} s)"
            ) from None
        size += len(chunk)
        if size > limit_bytes:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit_bytes} bytes")
        if chunk:
            parts.append(chunk)
    return b"".join(parts)


def check_json_bounds(body: bytes, max_depth: int, max_values: int) -> None:
    """Refuse JSON nested deeper than `max_depth` or holding more than `max_values` values, before it
    is parsed. Strings are blanked first, so commas and brackets inside texts are not counted; the
    value count is an upper bound (separators + 1), so a valid document within the limits passes."""
    if not body:
        return
    structural = _JSON_STRING.sub(b'""', body) if b'"' in body else body
    values = structural.count(b",") + 1
    if values > max_values:
        raise PayloadTooLarge(f"the JSON body holds more than {max_values} values")
    if structural.count(b"[") + structural.count(b"{") <= max_depth:
        return
    b = np.frombuffer(structural, dtype=np.uint8)
    step = ((b == 0x5B) | (b == 0x7B)).astype(np.int32) - ((b == 0x5D) | (b == 0x7D)).astype(np.int32)
    if int(np.cumsum(step).max()) > max_depth:
        raise InvalidInput(f"the JSON body is nested deeper than {max_depth} levels")


def check_shape(shape: object, where: str, max_dims: tuple[int, ...], dim_names: tuple[str, ...],
                form: str) -> list[int]:
    """A tensor shape: a list of at most len(max_dims) non-negative integers, each within its bound.
    Checked one dimension at a time on Python integers, so no product can overflow."""
    if not isinstance(shape, list) or not shape or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"{where}.shape must be a non-empty list of integers")
    if len(shape) > len(max_dims):
        raise InvalidInput(f"{where}: takes shape {form}, got {shape}")
    for d, bound, name in zip(shape, max_dims, dim_names):
        if d < 0:
            raise InvalidInput(f"{where}.shape has a negative dimension: {shape}")
        if d > bound:
            raise PayloadTooLarge(f"{where}: shape {shape} has {d} {name}; the limit is {bound}")
    return shape

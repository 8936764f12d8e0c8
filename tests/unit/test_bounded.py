"""Bounded work per request (app/bounded.py): strict headers, bodies cut off while they arrive,
JSON measured before it is parsed, shapes checked without overflow."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from app.bounded import check_json_bounds, check_shape, parse_length_header, read_body
from app.errors import InvalidInput, PayloadTooLarge, RequestTimeout


@pytest.mark.parametrize("value", ["²", "١٢", " 12", "12 ", "1_0", "+5", "-1", "", "0x10", "1" * 16])
def test_length_header_takes_ascii_digits_only(value):
    with pytest.raises(InvalidInput):
        parse_length_header(value, "Inference-Header-Content-Length")


def test_length_header_values():
    assert parse_length_header(None, "X") is None
    assert parse_length_header("0", "X") == 0
    assert parse_length_header("123456789012345", "X") == 123456789012345


async def _chunks(parts, pause_s=0.0, stall_after=None):
    for i, p in enumerate(parts):
        if stall_after is not None and i == stall_after:
            await asyncio.sleep(3600)
        if pause_s:
            await asyncio.sleep(pause_s)
        yield p


def test_body_is_read_whole_within_limits():
    body = asyncio.run(read_body(_chunks([b"ab", b"", b"cd"]), None, 10, 1.0, 5.0))
    assert body == b"abcd"


def test_declared_length_over_the_limit_is_refused_before_reading():
    async def never():
        raise AssertionError("read")
        yield b""

    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_body(never(), 11, 10, 1.0, 5.0))


def test_chunked_body_is_cut_off_as_soon_as_it_passes_the_limit():
    consumed = []

    async def endless():
        while True:
            consumed.append(1)
            yield b"x" * 1000

    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_body(endless(), None, 10_000, 1.0, 5.0))
    assert len(consumed) == 11  # stopped at the first chunk past the limit


def test_stalled_body_times_out_after_the_idle_timeout():
    t0 = time.perf_counter()
    with pytest.raises(RequestTimeout) as e:
        asyncio.run(read_body(_chunks([b"a", b"b"], stall_after=1), None, 100, 0.2, 5.0))
    assert 0.15 < time.perf_counter() - t0 < 1.0
    assert e.value.status_code == 408


def test_slow_but_steady_body_hits_the_total_timeout():
    with pytest.raises(RequestTimeout):
        asyncio.run(read_body(_chunks([b"a"] * 100, pause_s=0.05), None, 1000, 1.0, 0.3))


def test_json_bounds_count_values_outside_strings_only():
    texts = {"instances": ["a, b, c, [d], {e}" * 100, 'quote \\" , [ inside']}
    check_json_bounds(orjson.dumps(texts), max_depth=3, max_values=5)
    with pytest.raises(PayloadTooLarge):
        check_json_bounds(b"[" + b"[]," * 1000 + b"[]]", max_depth=8, max_values=500)


def test_json_bounds_refuse_deep_nesting_fast():
    deep = b"[" * 100_000 + b"]" * 100_000
    t0 = time.perf_counter()
    with pytest.raises(InvalidInput):
        check_json_bounds(deep, max_depth=8, max_values=10)
    assert time.perf_counter() - t0 < 0.5
    check_json_bounds(b'{"a": [[1, 2], [3, 4]]}', max_depth=3, max_values=10)


def test_json_bounds_are_fast_on_a_large_hostile_body():
    body = b'{"inputs": [{"data": [' + b"[]," * 2_700_000 + b"[]]}]}"
    t0 = time.perf_counter()
    with pytest.raises(PayloadTooLarge):
        check_json_bounds(body, max_depth=8, max_values=100_000)
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("shape, error", [
    ([10**9, 0], PayloadTooLarge), ([4294967296, 4294967296], PayloadTooLarge), ([2, 10**6], PayloadTooLarge),
    ([1, 2, 3], InvalidInput), ([-1, 4], InvalidInput), ([], InvalidInput), ([True, 2], InvalidInput),
    ("4", InvalidInput), ([1.0, 2], InvalidInput),
])
def test_shapes_are_bounded_per_dimension(shape, error):
    with pytest.raises(error):
        check_shape(shape, "input 'input_ids'", (64, 256), ("items", "tokens"), "[N, L]")


def test_good_shapes_pass():
    assert check_shape([64, 256], "x", (64, 256), ("items", "tokens"), "[N, L]") == [64, 256]
    assert check_shape([3], "x", (64, 1), ("items", "texts"), "[N]") == [3]


def test_the_first_piece_may_be_late_but_a_later_pause_may_not():
    async def late_first():
        await asyncio.sleep(1.0)  # a loaded proxy handing over a small, complete body
        yield b"whole"

    assert asyncio.run(read_body(late_first(), None, 100, 0.2, 5.0)) == b"whole"
    t0 = time.perf_counter()
    with pytest.raises(RequestTimeout):
        asyncio.run(read_body(_chunks([b"a", b"b"], stall_after=1), None, 100, 0.2, 5.0))
    assert time.perf_counter() - t0 < 1.0  # stalled after its first piece: the idle bound holds

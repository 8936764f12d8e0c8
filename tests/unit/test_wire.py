"""The direct link's frames: calls and answers round-trip exactly; errors keep their type; a broken
or hostile frame is refused with WireError rather than misread."""

import asyncio
import struct

import numpy as np
import pytest

from app import wire
from app.errors import InvalidInput, Overloaded, PayloadTooLarge, ServingError
from app.requests import InferenceResult, ModelInput


def body(framed: bytes) -> bytes:
    (n,) = struct.unpack_from("<I", framed)
    assert len(framed) == 4 + n
    return framed[4:]


def test_a_call_round_trips_rows_of_any_length():
    rows = [[101, 7, 102], [101, 102], [5] * 128, [2**31 - 1]]
    call_id, got = wire.decode_call(body(wire.encode_call(2**40 + 3, ModelInput(token_ids=rows, requests=3))))
    assert call_id == 2**40 + 3 and got.token_ids == rows and got.requests == 3 and got.texts is None


def test_texts_do_not_travel():
    with pytest.raises(ValueError, match="token ids"):
        wire.encode_call(1, ModelInput(texts=["hi"]))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64])
def test_an_answer_round_trips_outputs_and_timings(dtype):
    out = np.arange(12, dtype=dtype).reshape(3, 4)
    sent = InferenceResult(outputs=out, batch_size=9, queue_wait_ms=1.25, batch_ms=3.5, replica="rep", node="n1")
    call_id, got = wire.decode_reply(body(wire.encode_answer(7, sent)))
    assert call_id == 7 and isinstance(got, InferenceResult)
    assert got.outputs.dtype == out.dtype and np.array_equal(got.outputs, out)
    assert (got.batch_size, got.queue_wait_ms, got.batch_ms, got.replica, got.node) == (9, 1.25, 3.5, "rep", "n1")


@pytest.mark.parametrize("error", [InvalidInput("bad id 9"), PayloadTooLarge("too big"), Overloaded("full"),
                                   ServingError("boom")])
def test_an_error_keeps_its_type_and_message(error):
    call_id, got = wire.decode_reply(body(wire.encode_error(11, error)))
    assert call_id == 11 and type(got) is type(error) and got.message == error.message
    assert got.status_code == error.status_code


def test_an_unknown_error_type_is_a_500():
    raw = b'{"type":"from_the_future","error":"m"}'
    got = wire.decode_reply(struct.pack("<cQI", b"E", 1, len(raw)) + raw)[1]
    assert type(got) is ServingError and got.status_code == 500


@pytest.mark.parametrize("bad", [
    b"",
    b"X" + bytes(16),  # not a call
    struct.pack("<cQII", b"C", 1, 1, 2) + struct.pack("<II", 2, 2) + struct.pack("<i", 5),  # fewer ids than lengths say
    struct.pack("<cQII", b"C", 1, 1, 1000),  # row lengths cut short
])
def test_a_malformed_call_is_refused(bad):
    with pytest.raises(wire.WireError):
        wire.decode_call(bad)


@pytest.mark.parametrize("bad", [b"", b"A" + bytes(3), struct.pack("<cQI", b"A", 1, 4) + b"{no}"])
def test_a_malformed_reply_is_refused(bad):
    with pytest.raises(wire.WireError):
        wire.decode_reply(bad)


def test_hello_checks_the_secret():
    secret = bytes(range(wire.SECRET_BYTES))
    assert wire.check_hello(body(wire.hello(secret)), secret)
    assert not wire.check_hello(body(wire.hello(bytes(wire.SECRET_BYTES))), secret)
    assert not wire.check_hello(b"H", secret)


def test_an_absurd_frame_length_is_refused_before_reading_it():
    async def scenario():
        reader = asyncio.StreamReader()
        reader.feed_data(struct.pack("<I", wire.MAX_FRAME_BYTES + 1))
        with pytest.raises(wire.WireError, match="announced"):
            await wire.read_frame(reader)

    asyncio.run(scenario())

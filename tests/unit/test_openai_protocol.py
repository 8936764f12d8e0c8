"""OpenAI and Triton generate wire formats (app/protocols/openai.py) and streamed detokenisation
with stop strings (app/models/chat.py): pure, no Ray, no model."""

from __future__ import annotations

import orjson
import pytest

from app.config import ModelSpec
from app.errors import InvalidInput, ModelNotFound
from app.models.chat import StreamDecoder
from app.protocols.openai import Answer, parse_chat, parse_completion, parse_v2_generate

SPEC = ModelSpec.model_validate({
    "name": "gen", "task": "generate", "max_seq_len": 512,
    "source": {"kind": "random_init", "architecture": "llama"},
    "generation": {"max_new_tokens": 100, "default_max_tokens": 16, "temperature": 0.7, "stop": ["\n\n"]},
})


def spec_of(name: str) -> ModelSpec:
    if name != "gen":
        raise ModelNotFound(f"model {name!r} is not served here")
    return SPEC


def body(**doc) -> bytes:
    return orjson.dumps(doc)


def test_completion_defaults_come_from_the_model():
    _, call, _ = parse_completion(body(model="gen", prompt="hi"), spec_of)
    assert (call.prompt, call.max_tokens, call.temperature, call.top_p, call.stop) == ("hi", 16, 0.7, 1.0, ["\n\n"])
    _, seeded, _ = parse_completion(body(model="gen", prompt=["hi"], seed=5, stop="END", temperature=0), spec_of)
    assert (seeded.seed, seeded.stop, seeded.temperature) == (5, ["END"], 0.0)


@pytest.mark.parametrize("doc, needle", [
    ({"model": "gen", "prompt": "x", "n": 2}, "n = 1"),
    ({"model": "gen", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": "gen", "prompt": "x", "max_tokens": 101}, "limit of 100"),
    ({"model": "gen", "prompt": ["a", "b"]}, "one prompt"),
    ({"model": "gen", "prompt": "x", "temperature": 3}, "temperature"),
    ({"model": "gen", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "gen", "prompt": "x", "logprobs": 3}, "logprobs"),
    ({"model": "gen"}, "prompt"),
])
def test_bad_completions_are_refused_with_the_field(doc, needle):
    with pytest.raises(InvalidInput, match=needle):
        parse_completion(orjson.dumps(doc), spec_of)


def test_unknown_model_and_malformed_messages():
    with pytest.raises(ModelNotFound):
        parse_completion(body(model="other", prompt="x"), spec_of)
    for messages in ([], [{"role": "wizard", "content": "x"}], [{"content": "x"}], "hello"):
        with pytest.raises(InvalidInput, match="messages"):
            parse_chat(body(model="gen", messages=messages), spec_of)
    with pytest.raises(InvalidInput, match="JSON"):
        parse_chat(b"{not json", spec_of)


def test_chat_takes_text_parts_and_max_completion_tokens():
    _, call, _ = parse_chat(body(model="gen", max_completion_tokens=9, messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]), spec_of)
    assert call.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert call.max_tokens == 9


def test_v2_generate_parameters():
    call = parse_v2_generate(body(text_input="hi", parameters={"max_tokens": 5, "temperature": 0}), SPEC)
    assert (call.prompt, call.max_tokens, call.temperature) == ("hi", 5, 0.0)
    with pytest.raises(InvalidInput, match="text_input"):
        parse_v2_generate(body(parameters={}), SPEC)


def test_answer_shapes():
    a = Answer("chat", "gen")
    whole = a.whole("hello", "stop", 3, 2)
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    first, last = a.chunk("he", None), a.chunk("", "length")
    assert first["choices"][0]["delta"] == {"content": "he", "role": "assistant"}
    assert last["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length", "logprobs": None}
    c = Answer("completion", "gen").chunk("x", None)
    assert c["object"] == "text_completion" and c["choices"][0]["text"] == "x"


class CharTokenizer:
    """One token per character (ids are code points): decoding is exact, which isolates the stop logic."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_stop_string_straddling_two_events_ends_before_it():
    d = StreamDecoder(CharTokenizer(), ["END"])
    out = [d.push(ids("hello E")), d.push(ids("N")), d.push(ids("D and more"))]
    assert "".join(out) == "hello " and d.stopped
    assert out[0] == "hello "  # "E" is held back: it may begin the stop string


def test_held_back_text_is_released_when_it_is_not_a_stop():
    d = StreamDecoder(CharTokenizer(), ["END"])
    assert d.push(ids("abE")) == "ab"
    assert d.push(ids("x")) == "Ex"
    assert d.push(ids("E"), final=True) == "E" and not d.stopped


def test_incomplete_characters_wait_for_their_bytes():
    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    d = StreamDecoder(Bytes(), [])
    euro = "€".encode()
    assert d.push([ord("a"), euro[0]]) == "a"
    assert d.push([euro[1]]) == ""
    assert d.push([euro[2]]) == "€"

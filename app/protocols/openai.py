"""OpenAI-compatible completions and chat completions, and the Open Inference Protocol's generate
extension (as Triton serves it): request parsing into one internal call, answers and stream chunks.

Pure: no Ray, no model. The ingress parses and bounds here; the generator replica gets a
`GenerateCall` and streams `GenEvent`s back; the answer shapes are built here from those.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.config import ModelSpec
from app.errors import InvalidInput, ServingError
from app.traffic import header_class, traffic_class

MAX_MESSAGES = 256


class _Request(BaseModel):
    # OpenAI clients send fields this server does not use (user, metadata, ...): ignored, as vLLM does.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=128)
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stop: Union[str, list[str], None] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    logprobs: Any = None
    echo: bool = False
    # The traffic class (README "Traffic classes"); the X-Priority header says it too, this wins.
    priority: Any = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n = 1 is served (one choice per request)")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop: up to 4 non-empty strings of at most 256 characters")
        return stops

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v not in (None, False, 0):
            raise ValueError("logprobs are not served")
        return None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not served")
        return v


class CompletionRequest(_Request):
    prompt: Union[str, list[str]]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("one prompt per request (a list of exactly one string)")
            v = v[0]
        return v


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[_Part]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


@dataclass
class GenerateCall:
    """What the generator replica is asked: a prompt or a transcript, and how to sample."""

    prompt: Optional[str]
    messages: Optional[list[dict[str, str]]]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str] = field(default_factory=list)
    traffic_class: str = "realtime"


@dataclass
class GenEvent:
    """One step of a generation as the replica reports it: text added, and at the end the reason
    and the token counts. `error` ends a stream that failed after it started."""

    text: str = ""
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[dict[str, str]] = None
    # On the start event only: who generates (the ingress answers them as X-Replica / X-Node).
    replica: str = ""
    node: str = ""

    def served_by_headers(self) -> dict[str, str]:
        return {"X-Replica": self.replica, "X-Node": self.node} if self.replica else {}


def _invalid(e: ValidationError) -> InvalidInput:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return InvalidInput(f"{where}: {first['msg']}")


def _text_chars(spec: ModelSpec, chars: int) -> None:
    limit = spec.limits.max_text_chars
    if chars > limit:
        raise InvalidInput(f"the prompt has {chars} characters, over this model's limit of {limit}")


def _call(spec: ModelSpec, req: _Request, max_tokens: Optional[int], prompt: Optional[str],
          messages: Optional[list[dict[str, str]]], priority_header: Optional[str]) -> GenerateCall:
    g = spec.generation
    n = g.default_max_tokens if max_tokens is None else max_tokens
    if n > g.max_new_tokens:
        raise InvalidInput(f"max_tokens: {n} exceeds this model's limit of {g.max_new_tokens}")
    return GenerateCall(
        prompt=prompt, messages=messages, max_tokens=n,
        temperature=g.temperature if req.temperature is None else req.temperature,
        top_p=g.top_p if req.top_p is None else req.top_p,
        # No seed: a fresh one, so the request samples; the same seed gives the same text.
        seed=secrets.randbits(63) if req.seed is None else req.seed,
        stop=list(req.stop or []) or list(g.stop),  # type: ignore[arg-type]
        traffic_class=(header_class(priority_header, spec.traffic.default_class) if req.priority is None
                       else traffic_class(req.priority, "priority")),
    )


def parse_completion(body: bytes, spec_of, priority_header: Optional[str] = None
                     ) -> tuple[CompletionRequest, GenerateCall, ModelSpec]:
    req = _parse(CompletionRequest, body)
    spec = spec_of(req.model)
    _text_chars(spec, len(req.prompt))  # type: ignore[arg-type]
    return req, _call(spec, req, req.max_tokens, req.prompt, None, priority_header), spec  # type: ignore[arg-type]


def parse_chat(body: bytes, spec_of, priority_header: Optional[str] = None
               ) -> tuple[ChatRequest, GenerateCall, ModelSpec]:
    req = _parse(ChatRequest, body)
    spec = spec_of(req.model)
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    _text_chars(spec, sum(len(m["content"]) for m in messages))
    return req, _call(spec, req, req.max_completion_tokens or req.max_tokens, None, messages, priority_header), spec


def _parse(cls, body: bytes):
    doc = _parse_object(body)
    try:
        return cls.model_validate(doc)
    except ValidationError as e:
        raise _invalid(e) from None


def parse_v2_generate(body: bytes, spec: ModelSpec, priority_header: Optional[str] = None) -> GenerateCall:
    """Triton's generate extension: {"text_input": ..., "parameters": {max_tokens, temperature, priority, ...}}."""
    doc = _parse_object(body)
    text = doc.get("text_input")
    if not isinstance(text, str):
        raise InvalidInput("text_input: a string is required")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("parameters: must be an object")
    try:
        req = CompletionRequest.model_validate({**params, "model": spec.name, "prompt": text, "stream": False})
    except ValidationError as e:
        raise _invalid(e) from None
    _text_chars(spec, len(text))
    return _call(spec, req, req.max_tokens, text, None, priority_header)


def _parse_object(body: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"body is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("body must be a JSON object")
    return doc


# ---------------------------------------------------------------------------------------- answers


def openai_error(exc: ServingError) -> dict[str, Any]:
    """The error body OpenAI clients parse (`error.message`, `error.type`)."""
    return {"error": {"message": exc.message, "type": exc.error_type, "param": None, "code": exc.status_code}}


class Answer:
    """Builds a completion or chat answer, whole or as stream chunks, for one request."""

    def __init__(self, kind: Literal["completion", "chat"], model: str):
        self.kind = kind
        self.model = model
        self.id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.first = True

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def whole(self, text: str, finish_reason: Optional[str], prompt_tokens: int, completion_tokens: int) -> dict:
        if self.kind == "completion":
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
            doc = self._envelope("text_completion", [choice])
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                      "logprobs": None}
            doc = self._envelope("chat.completion", [choice])
        doc["usage"] = self.usage(prompt_tokens, completion_tokens)
        return doc

    def chunk(self, text: str, finish_reason: Optional[str]) -> dict:
        if self.kind == "completion":
            return self._envelope("text_completion", [{"index": 0, "text": text, "finish_reason": finish_reason,
                                                       "logprobs": None}])
        delta: dict[str, Any] = {"content": text} if text or not finish_reason else {}
        if self.first:
            delta["role"] = "assistant"
        self.first = False
        return self._envelope("chat.completion.chunk", [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                                         "logprobs": None}])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        doc = self._envelope(obj, [])
        doc["usage"] = self.usage(prompt_tokens, completion_tokens)
        return doc


def sse(doc: Any) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"

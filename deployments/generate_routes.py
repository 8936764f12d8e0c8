"""The generation routes of the ingress: OpenAI-compatible completions and chat completions
(whole or streamed as server-sent events) and Triton's generate / generate_stream.

The body is parsed and bounded here (app/protocols/openai.py); the generator replica tokenises,
generates and streams events back through a streaming Serve handle call. Errors raised before the
first event (unknown model, too long, queue full) get their HTTP status; an error after the stream
began ends it with an error event. A client that goes away cancels the handle call, and with it
the sequence.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterable, Optional

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from ray.serve.handle import DeploymentHandle

from app.config import LimitsConfig, ModelSpec
from app.errors import GenerationTimeout, InvalidInput, ModelFailure, ServingError
from app.traffic import PRIORITY_HEADER
from app.protocols.openai import (SSE_DONE, Answer, GenerateCall, GenEvent, openai_error, parse_chat,
                                  parse_completion, parse_v2_generate, sse)
from deployments.clients import as_serving_error
from deployments.replica_wait import placed
from deployments.http_app import api, json_response

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def merged_generation_limits(specs: Iterable[ModelSpec]) -> Optional[LimitsConfig]:
    """The loosest body limits of the generators (an OpenAI body names its model inside): None if none."""
    limits = [s.limits for s in specs if s.task == "generate"]
    if not limits:
        return None
    return limits[0].model_copy(update={
        "max_body_bytes": max(lim.max_body_bytes for lim in limits),
        "body_idle_timeout_s": max(lim.body_idle_timeout_s for lim in limits),
        "body_timeout_s": max(lim.body_timeout_s for lim in limits)})


def _event_error(ev: GenEvent) -> ServingError:
    err = ev.error or {}
    exc: ServingError = GenerationTimeout(err.get("message", "timeout")) if err.get("type") == "timeout" \
        else ModelFailure(err.get("message", "generation failed"))
    return exc


class GenerationRoutes:
    """Mixed into the Ingress; needs `self.specs`, `self.generators` (name -> handle) and `self._spec`."""

    specs: dict[str, ModelSpec]
    generators: dict[str, DeploymentHandle]
    _generation_limits: Optional[LimitsConfig]  # merged_generation_limits(), set by the Ingress

    def _generator_spec(self, name: str) -> ModelSpec:
        spec = self._spec(name)  # type: ignore[attr-defined]
        if spec.task != "generate":
            raise InvalidInput(f"model {name!r} does not generate text (task {spec.task!r}); "
                               f"use /v2/models/{name}/infer or /v1/models/{name}:predict")
        return spec

    async def _generation_body(self, request: Request, spec: Optional[ModelSpec] = None) -> bytes:
        # The model is named inside an OpenAI body: bound it by the largest generator limits first.
        limits = spec.limits if spec is not None else self._generation_limits
        if limits is None:
            raise InvalidInput("no generative model is served here")
        return await self._read_body(request, limits)  # type: ignore[attr-defined]

    async def _start(self, name: str, call: GenerateCall) -> tuple[Any, GenEvent]:
        """Send the call; wait for the replica's start event (admission passed) or its error."""
        handle = self.generators[name]
        gen = handle.options(stream=True).generate.remote(call)
        try:
            await placed(gen, handle, self._spec(name).effective_replica_wait_s())  # type: ignore[attr-defined]
            first = await gen.__anext__()
        except StopAsyncIteration:
            raise ModelFailure("the generator ended without an answer") from None
        except Exception as e:  # noqa: BLE001 - mapped to a status code
            gen.cancel()
            raise as_serving_error(e) from None
        if first.error is not None:
            raise _event_error(first)
        return gen, first

    async def _collect(self, gen) -> tuple[str, GenEvent]:
        parts: list[str] = []
        try:
            async for ev in gen:
                if ev.error is not None:
                    raise _event_error(ev)
                parts.append(ev.text)
                if ev.finish_reason is not None:
                    return "".join(parts), ev
        except ServingError:
            raise
        except Exception as e:  # noqa: BLE001
            raise as_serving_error(e) from None
        finally:
            gen.cancel()
        raise ModelFailure("the generator's stream ended without a finish reason")

    async def _openai(self, kind: str, request: Request) -> Response:
        try:
            body = await self._generation_body(request)
            parse = parse_completion if kind == "completion" else parse_chat
            req, call, spec = parse(body, self._generator_spec, request.headers.get(PRIORITY_HEADER))
            gen, start = await self._start(spec.name, call)
        except ServingError as e:
            return json_response(openai_error(e), e.status_code, {"Retry-After": "1"} if e.status_code == 503 else None)
        answer = Answer(kind, spec.name)  # type: ignore[arg-type]
        if not req.stream:
            try:
                text, last = await self._collect(gen)
            except ServingError as e:
                return json_response(openai_error(e), e.status_code)
            return json_response(answer.whole(text, last.finish_reason, last.prompt_tokens, last.completion_tokens),
                                 headers=start.served_by_headers())
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(self._sse(gen, answer, include_usage), media_type="text/event-stream",
                                 headers={**_SSE_HEADERS, **start.served_by_headers()})

    async def _sse(self, gen, answer: Answer, include_usage: bool) -> AsyncIterator[bytes]:
        try:
            if answer.kind == "chat":
                yield sse(answer.chunk("", None))  # the role arrives first, as OpenAI sends it
            async for ev in gen:
                if ev.error is not None:
                    yield sse({"error": {**ev.error, "param": None, "code": None}})
                    break
                if ev.text or ev.finish_reason is not None:
                    yield sse(answer.chunk(ev.text, ev.finish_reason))
                if ev.finish_reason is not None:
                    if include_usage:
                        yield sse(answer.usage_chunk(ev.prompt_tokens, ev.completion_tokens))
                    break
            yield SSE_DONE
        except Exception as e:  # noqa: BLE001 - the status is sent already: end with an error event
            err = as_serving_error(e)
            yield sse(openai_error(err))
        finally:
            gen.cancel()  # a client that went away stops its sequence at the next step

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._openai("completion", request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._openai("chat", request)

    # ------------------------------------------------------------------ Triton's generate extension

    @api.post("/v2/models/{name}/generate")
    async def v2_generate(self, name: str, request: Request) -> Response:
        spec = self._generator_spec(name)
        call = parse_v2_generate(await self._generation_body(request, spec), spec, request.headers.get(PRIORITY_HEADER))
        gen, start = await self._start(name, call)
        text, last = await self._collect(gen)
        return json_response({"model_name": name, "model_version": "1", "text_output": text,
                              "finish_reason": last.finish_reason}, headers=start.served_by_headers())

    @api.post("/v2/models/{name}/generate_stream")
    async def v2_generate_stream(self, name: str, request: Request) -> Response:
        spec = self._generator_spec(name)
        call = parse_v2_generate(await self._generation_body(request, spec), spec, request.headers.get(PRIORITY_HEADER))
        gen, start = await self._start(name, call)

        async def events() -> AsyncIterator[bytes]:
            try:
                async for ev in gen:
                    if ev.error is not None:
                        yield sse({"error": ev.error["message"]})
                        return
                    if ev.text or ev.finish_reason is not None:
                        yield sse({"model_name": name, "model_version": "1", "text_output": ev.text,
                                   **({"finish_reason": ev.finish_reason} if ev.finish_reason else {})})
                    if ev.finish_reason is not None:
                        return
            except Exception as e:  # noqa: BLE001
                yield sse({"error": as_serving_error(e).message})
            finally:
                gen.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**_SSE_HEADERS, **start.served_by_headers()})

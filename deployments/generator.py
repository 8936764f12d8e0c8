"""A generator replica: the Serve shell around the continuous-batching engine (app/engine/generation.py).

Serve decides admission (max_ongoing_requests: the sequences a replica holds; the handle queue
beyond it, shed with 503). No `@serve.batch` here: the engine's loop admits a request into the
running batch at the next decoding step, and a batch-forming wait in front of it would only delay
the first token. The ingress calls `generate` as a streaming handle method; an ingress that stops
reading (client gone) cancels the call, which cancels the sequence.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, AsyncIterator

import ray
from ray import serve

from app.config import CostConfig, ModelSpec
from app.engine.startup import tune_process
from app.errors import PayloadTooLarge, ServingError
from app.metrics import GenerationMetrics
from app.models.chat import GenerationText
from app.models.loader import build_config, resolve_device, resolve_dtype
from app.planner import ParallelPlan
from app.protocols.openai import GenerateCall, GenEvent

logger = logging.getLogger("ray.serve")


class GeneratorServer:
    def __init__(self, spec: ModelSpec, plan: ParallelPlan, cost: CostConfig):
        # Here, not at module level: transformers' continuous batching imports torch._dynamo (~2.5 s),
        # and every `serve run` builds the app (imports this module) before any replica starts.
        from app.engine.engine_process import EngineProcess, build_engine, child_environment
        from app.engine.generation import SamplingParams

        self._sampling_params = SamplingParams
        t0 = time.perf_counter()
        self.spec, self.plan = spec, plan
        tune_process(spec)
        self.text = GenerationText(spec)
        g = spec.generation
        engine_args = dict(eos_token_ids=self.text.eos_token_ids(build_config(spec, len(self.text))),
                           max_running=g.max_running_sequences,
                           # Serve's max_ongoing_requests admits; this is a backstop above it, since
                           # a cancelled stream leaves Serve's count a moment before it leaves ours.
                           max_sequences=2 * spec.effective_max_ongoing_requests(),
                           max_step_tokens=g.max_step_tokens, page_size=g.page_size,
                           max_context_tokens=spec.max_seq_len,
                           # Bulk: a share of the running batch (traffic.bulk.batch_items, else half)
                           # and of the sequences held, so realtime always finds room.
                           bulk_max_running=spec.traffic.bulk.batch_items,
                           bulk_max_sequences=spec.bulk_max_ongoing_requests())
        self.gang = None
        if plan.strategy != "replicated":  # a gang: the builder gave this replica its placement group
            from app.runners.gang_generation import GenerationGang

            self.gang = GenerationGang(spec, plan, len(self.text))
            self.engine = self.gang.start(engine_args)
            device, dtype = self.gang.device, resolve_dtype(spec, self.gang.device)
        else:
            device = resolve_device(spec)
            dtype = resolve_dtype(spec, device)
            if g.engine_process:  # the decoding loop in its own interpreter (app/engine/engine_process.py)
                self.engine = EngineProcess(spec, len(self.text), engine_args,
                                            environment=child_environment(on_cpu=device.type == "cpu"))
            else:
                self.engine = build_engine(spec, len(self.text), engine_args)
        budget = self.engine.budget
        self.served_by = serve.get_replica_context().replica_id.unique_id
        self.node = ray.get_runtime_context().get_node_id()
        gpus = self.gang.gang_gpus if self.gang is not None else [str(i) for i in ray.get_gpu_ids()]
        self.metrics = GenerationMetrics(spec, plan, cost, gpus, self.engine.stats)
        self.device = device
        logger.info("generator %s ready in %.1fs on %s (%s): KV cache %s", spec.name, time.perf_counter() - t0,
                    device, str(dtype).removeprefix("torch."), budget.as_dict())

    def __del__(self):
        if getattr(self, "gang", None) is not None:
            self.gang.shutdown()
        elif getattr(self, "engine", None) is not None:
            self.engine.shutdown()
        if getattr(self, "metrics", None) is not None:
            self.metrics.stop()

    # ------------------------------------------------------------------ Serve hooks

    def check_health(self) -> None:
        self.engine.check_health()
        if self.gang is not None:
            self.gang.check_health()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Sequences held, for the queue-depth policy (app/autoscaling.py); generation has no batch queue wait."""
        return {"queued_items": float(self.engine.stats().held), "queue_wait_p99_ms": 0.0}

    # ------------------------------------------------------------------ handle methods

    async def ready(self) -> bool:
        return True

    async def describe(self) -> dict[str, Any]:
        g = self.spec.generation
        return {"name": self.spec.name, "task": "generate", "replica": self.served_by, "strategy": self.plan.strategy,
                "devices": [str(self.device)], **(self.gang.describe() if self.gang is not None else {}), **self.engine.describe(),
                "now": dataclasses.asdict(self.engine.stats()),
                "generation": {"max_prompt_tokens": self.spec.prompt_token_limit(), "max_new_tokens": g.max_new_tokens,
                               "default_max_tokens": g.default_max_tokens}}

    async def generate(self, call: GenerateCall) -> AsyncIterator[GenEvent]:
        """First a start event (the prompt's token count: the request was admitted), then text
        deltas, the last with its finish reason and counts. Client errors (too long, overloaded)
        are raised before the start event, so the ingress can still answer them with a status."""
        t0 = time.perf_counter()
        g = self.spec.generation
        ids = self.text.encode_prompt(call.prompt) if call.messages is None else self.text.encode_chat(call.messages)
        if len(ids) > self.spec.prompt_token_limit():
            raise PayloadTooLarge(f"the prompt has {len(ids)} tokens, over this model's limit of "
                                  f"{self.spec.prompt_token_limit()}")
        params = self._sampling_params(call.max_tokens, call.temperature, call.top_p, call.seed)
        stream = self.engine.stream(ids, params, bulk=call.traffic_class == "bulk")
        decoder = self.text.decoder(call.stop)
        produced, last, started = 0, None, False
        interval = g.stream_interval_ms / 1000.0
        try:
            async with asyncio.timeout(g.request_timeout_s):
                first = await anext(stream)  # admission errors surface here, before anything is sent
                yield GenEvent(prompt_tokens=len(ids), replica=self.served_by, node=self.node)
                started = True
                event = first
                while True:
                    now = time.perf_counter()
                    if last is None:
                        self.metrics.sequence_started(len(ids), (now - t0) * 1000.0)
                    self.metrics.tokens(len(event.tokens), None if last is None else (now - last) * 1000.0)
                    last = now
                    produced += len(event.tokens)
                    text = decoder.push(event.tokens, final=event.finished)
                    if decoder.stopped:
                        yield GenEvent(text, "stop", len(ids), produced)
                        return
                    if event.finished:
                        yield GenEvent(text, event.finish_reason, len(ids), produced)
                        return
                    if text:
                        yield GenEvent(text)
                        if interval:
                            # The tokens of the steps run meanwhile come as one event (the engine's
                            # outputs are cumulative): one message down the stream instead of several.
                            await asyncio.sleep(interval)
                    event = await anext(stream)
        except TimeoutError:
            yield GenEvent(error={"message": f"generation exceeded {g.request_timeout_s:g} s", "type": "timeout"},
                           prompt_tokens=len(ids), completion_tokens=produced)
        except ServingError as e:
            if not started:
                raise
            yield GenEvent(error={"message": e.message, "type": e.error_type}, prompt_tokens=len(ids),
                           completion_tokens=produced)
        finally:
            await stream.aclose()  # an unfinished sequence is cancelled and its cache blocks freed

"""Iteration-level (continuous) batching for generators, on transformers' continuous-batching manager.

The manager (`transformers.generation.continuous_batching`) owns the scheduler and the paged KV
cache: at every step its loop admits waiting requests into the running batch (prefill, chunked to
the step's token budget) beside the decoding ones, runs one forward pass over all of them, and
retires sequences that finish. This module is what the service adds around it:

- the KV budget from measured memory (app/kv_cache.py), given to the manager as its block count;
- sampling per request, reproducible by seed (app/engine/sampling.py), in the same batch as greedy;
- admission: a bounded number of sequences held (running + waiting) and refusal before queueing of
  a request that could never fit;
- traffic classes: bulk sequences are held to their own bound (past it, 503 to bulk alone) and at
  most `bulk_max_running` of them are in the manager at once; the rest wait here, so realtime
  requests always find room in the running batch beside bulk (README "Traffic classes");
- an async stream of new tokens per request, on the caller's event loop; a consumer that goes away
  (client disconnect, timeout) cancels its sequence, which frees its cache blocks at the next step;
- the statistics the metrics and the autoscaler read.

No Ray here: the Serve shell (deployments/generator.py) and the tests drive it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

import torch

from app.engine.sampling import sampling_kwargs, seeded_sampling_processors
from app.errors import InvalidInput, ModelFailure, Overloaded, PayloadTooLarge, ReplicaUnavailable
from app.kv_cache import KVBudget
from app.models import sequence_sdpa

logger = logging.getLogger("ray.serve")

# The manager writes an INFO line per scheduling decision; the replica log is not the place for them.
logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass
class TokenEvent:
    """New tokens of one request since its last event; `finished` once, with the reason."""

    tokens: list[int]
    finished: bool = False
    finish_reason: Optional[str] = None  # "stop" (an end-of-sequence token) or "length"


@dataclass(frozen=True)
class _Lost:
    """Put in every open stream's queue when the engine is aborted (a tensor-parallel rank died)."""

    reason: str


@dataclass
class GenerationStats:
    running: int
    waiting: int
    held: int  # admitted and not yet finished: running + waiting
    kv_used_fraction: float


class GenerationEngine:
    """One model's continuous-batching loop. `model` is a transformers causal LM already on its
    device; `page_size` tokens per cache block; at most `max_running` sequences decode together and
    `max_sequences` requests are held at once (the rest of them wait for a place in the batch)."""

    def __init__(self, model: Any, eos_token_ids: list[int], budget: KVBudget, *, max_running: int,
                 max_sequences: int, max_step_tokens: int, page_size: int = 32, max_context_tokens: int,
                 bulk_max_running: Optional[int] = None, bulk_max_sequences: Optional[int] = None,
                 manager_options: Optional[dict[str, Any]] = None):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        if budget.tokens < page_size:
            raise ValueError(f"KV cache budget of {budget.tokens} tokens is below one page ({page_size})")
        self.budget = budget
        self.max_sequences = max_sequences
        self.max_running = max_running
        self.max_context_tokens = max_context_tokens
        self.eos_token_ids = eos_token_ids or [-1]
        self._ids = itertools.count()
        self._held = 0
        # Open streams' queues and loops, so abort() can end them from any thread.
        self._open: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._lost: Optional[str] = None
        # Bulk: at most bulk_max_running in the manager (running or in its queue), bulk_max_sequences held.
        self.bulk_max_running = min(max_running, bulk_max_running or max(1, max_running // 2))
        self.bulk_max_sequences = min(max_sequences, bulk_max_sequences or max(1, max_sequences // 2))
        self._bulk_held = 0
        self._bulk_slots = asyncio.Semaphore(self.bulk_max_running)
        generation = GenerationConfig(do_sample=False, eos_token_id=self.eos_token_ids, pad_token_id=0,
                                      max_new_tokens=1)
        cb = ContinuousBatchingConfig(
            num_blocks=budget.tokens // page_size, page_size=page_size, max_batch_tokens=max_step_tokens,
            # On attention without varlen kernels (sdpa: CPU, or no flash-attn) a step's mask spans
            # every running sequence's keys, so a step costs ~running^2: the cap bounds it.
            max_requests_per_batch=max_running,
            # Prefix sharing keeps finished requests' blocks cached for reuse; off, the cache in use
            # is exactly the running sequences' (the metric and the budget mean what they say).
            allow_block_sharing=False,
            max_queue_size=0,  # the bound is ours (max_sequences), checked before the manager's queue
            # Further ContinuousBatchingConfig fields (use_cuda_graph, ...): for benchmarks.
            **(manager_options or {}),
        )
        on_gpu = next(model.parameters()).device.type == "cuda"
        if on_gpu:
            # SDPA's cuDNN backend held the manager's thread 67-73 % of every step on one H200 (a
            # 1.1 B model: 62.6 ms a token with it, 13.7 ms without at 8 streams, 59.8 -> 37.4 ms at
            # 64; bench.profile_generate --sdp cudnn, docs/performance.md). A step's shapes change
            # every step (packed tokens, cached keys); flash and memory-efficient SDPA serve them.
            torch.backends.cuda.enable_cudnn_sdp(False)
        # Attention per sequence, not over the whole packed step (app/models/sequence_sdpa.py): the
        # flash kernel's varlen call on CUDA, one SDPA call a sequence on CPU.
        sequence_sdpa.install()
        self.manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=cb)
        # Always argmax in the manager; temperature, top-p and the seeded noise come first (sampling.py).
        # A step that is graphed, compiled or prepared ahead runs every sampling pass (sampling.py).
        o = manager_options or {}
        static = bool(o.get("use_cuda_graph") or o.get("default_compile_level") or o.get("use_async_batching"))
        self.manager.logit_processor = seeded_sampling_processors(static_passes=static)
        self.manager.start()

    # ------------------------------------------------------------------ requests

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse, before it queues, a request that could never run: 413 when too long for the model
        or for the whole KV cache."""
        if max_new_tokens < 1:
            raise InvalidInput("max_tokens must be at least 1")
        total = prompt_tokens + max_new_tokens
        if total > self.max_context_tokens:
            raise PayloadTooLarge(f"prompt ({prompt_tokens} tokens) + max_tokens ({max_new_tokens}) = {total} "
                                  f"exceeds the model's context of {self.max_context_tokens} tokens")
        if total > self.budget.tokens:
            raise PayloadTooLarge(f"prompt + max_tokens = {total} tokens can never fit this replica's KV cache "
                                  f"({self.budget.tokens} tokens)")

    async def stream(self, prompt_ids: list[int], params: SamplingParams, bulk: bool = False
                     ) -> AsyncIterator[TokenEvent]:
        """New tokens as the steps produce them. Closing the iterator early (the caller stopped
        reading, was cancelled or timed out) cancels the sequence. A bulk sequence first waits for
        one of the bulk places in the running batch."""
        self.check_fits(len(prompt_ids), params.max_new_tokens)
        if self._held >= self.max_sequences:
            raise Overloaded(f"{self._held} sequences already held by this replica (max {self.max_sequences})")
        if bulk and self._bulk_held >= self.bulk_max_sequences:
            raise Overloaded(f"bulk limit: {self._bulk_held} bulk sequences already held by this replica "
                             f"(max {self.bulk_max_sequences}); realtime requests are still admitted")
        if self._lost is not None:
            raise ReplicaUnavailable(self._lost)
        if not self.manager.is_running():
            raise ModelFailure("the generation loop has stopped")
        self._held += 1
        self._bulk_held += bulk
        try:
            async with self._bulk_slots if bulk else contextlib.nullcontext():
                # aclosing: a consumer that goes away closes the sequence now, not when it is collected.
                async with contextlib.aclosing(self._run(prompt_ids, params)) as events:
                    async for event in events:
                        yield event
        finally:
            self._held -= 1
            self._bulk_held -= bulk

    async def _run(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        request_id = f"g{next(self._ids)}"
        outputs: asyncio.Queue = asyncio.Queue()
        self.manager.register_result_handler(request_id, outputs.put_nowait)
        self._open[request_id] = (outputs, asyncio.get_running_loop())
        finished = False
        try:
            self.manager.add_request(prompt_ids, request_id=request_id, max_new_tokens=params.max_new_tokens,
                                     streaming=True, eos_token_id=self.eos_token_ids,
                                     **sampling_kwargs(params.temperature, params.top_p, params.seed))
            sent = 0
            while not finished:
                out = await outputs.get()
                # Outputs are cumulative: when this loop fell behind the manager's steps, one event
                # carries every token since the last (fewer messages down the stream's hops).
                while not isinstance(out, _Lost) and not outputs.empty() and out.error is None and not out.is_finished():
                    out = outputs.get_nowait()
                if isinstance(out, _Lost):
                    raise ReplicaUnavailable(out.reason)
                if out.error is not None:
                    raise ModelFailure(f"generation failed: {out.error}")
                finished = out.is_finished()
                new = out.generated_tokens[sent:]
                sent = len(out.generated_tokens)
                reason = None
                if finished:
                    ended_on_eos = bool(out.generated_tokens) and out.generated_tokens[-1] in self.eos_token_ids
                    reason = "stop" if ended_on_eos else "length"
                if new or finished:
                    yield TokenEvent(new, finished, reason)
        finally:
            self._open.pop(request_id, None)
            if not finished:
                self.manager.cancel_request(request_id)
                with self.manager.output_router._lock:
                    self.manager.output_router.result_handlers.pop(request_id, None)

    # ------------------------------------------------------------------ state

    def stats(self) -> GenerationStats:
        processor = self.manager.batch_processor
        if processor is None:
            return GenerationStats(0, 0, self._held, 0.0)
        scheduler = processor.scheduler
        used = 1.0 - float(processor.cache.compute_free_capacity(relative=True))
        running = len(scheduler.active_requests)
        # Waiting: held here but not in the running batch (in the manager's queue or its scheduler's).
        return GenerationStats(running, max(0, self._held - running), self._held, max(0.0, used))

    def abort(self, reason: str) -> None:
        """End every open stream with 503 `reason` and refuse new ones; from any thread. For a loop
        that can no longer step (a tensor-parallel rank died and the others wait in a collective
        that will never complete): the replica is to be replaced."""
        self._lost = reason
        for outputs, loop in list(self._open.values()):
            with contextlib.suppress(RuntimeError):  # a loop already closed has no stream to end
                loop.call_soon_threadsafe(outputs.put_nowait, _Lost(reason))

    def check_health(self) -> None:
        if self._lost is not None:
            raise RuntimeError(self._lost)
        status = self.manager.background_thread_status
        if status.fatal_error is not None or not self.manager.is_running():
            raise RuntimeError(f"generation loop is down: {status.fatal_error!r}")

    def describe(self) -> dict[str, Any]:
        return {**self.budget.as_dict(), "max_running_sequences": self.max_running, "max_held_sequences": self.max_sequences,
                "max_context_tokens": self.max_context_tokens, "bulk_max_running_sequences": self.bulk_max_running,
                "bulk_max_held_sequences": self.bulk_max_sequences}

    def shutdown(self) -> None:
        if self.manager.is_running():
            self.manager.stop(block=True, timeout=10, hard_stop=True)

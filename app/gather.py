"""Concurrent requests for one model leave an ingress replica as one call (`ingress.gather`).

Routed mode made one Serve handle call per request, so the model server's process paid Ray's
per-call cost (receive, deserialise, schedule onto its loop, reply) for every request, on the same
core that feeds the GPU. Here an ingress replica keeps at most `slots` calls to the model in flight;
requests that arrive meanwhile wait and leave together in the next call. It is self-clocking, like
Nagle's algorithm: at light load a request leaves at once (no timer, no added wait); under load a
call carries what arrived during one round trip. Texts are tokenised here, once per call, so token
ids travel and the GPU process spends its core on batches: the front-end/engine split of Triton's
ensembles and vLLM's API server.

A merged call that fails for a reason that may be one request's own (a bad input, a model failure,
over the token budget) is retried one request per call, so a bad request fails alone, as it does
inside a batch; a reason that is the server's (overloaded, replica lost) fails every request at once.

Pure asyncio: the call, the tokeniser and the error mapping are passed in; unit-tested without Ray.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Awaitable, Callable, Sequence

from app.engine.coalesce import BatchCoalescer
from app.errors import ModelFailure, Overloaded, ReplicaUnavailable, ServingError
from app.requests import InferenceResult, ModelInput

# The model server's answer to a merged call is the server's state, not any one request's.
_SERVER_SIDE = (Overloaded, ReplicaUnavailable)


@dataclass
class _Waiting:
    inputs: ModelInput
    arrived_s: float


def _items(waiting: Sequence[_Waiting]) -> int:
    return sum(len(w.inputs) for w in waiting)


class RequestGatherer:
    """`infer(inputs)` as the model server would answer it, sharing calls with concurrent requests.

    `call` sends one ModelInput to the model server and raises ServingError on failure;
    `encode` turns inputs into token id rows (texts tokenised, token ids passed through)."""

    def __init__(self, call: Callable[[ModelInput], Awaitable[InferenceResult]],
                 encode: Callable[[Sequence[ModelInput]], list[list[int]]], max_items: int, slots: int):
        self._call = call
        self._encode = encode
        self._coalescer: BatchCoalescer[_Waiting, InferenceResult | ServingError] = BatchCoalescer(
            self._send, _items, lambda: max_items, slots=slots)
        self.calls = 0  # merged calls sent (for tests and logs)

    async def infer(self, inputs: ModelInput) -> InferenceResult:
        (result,) = await self._coalescer.submit([_Waiting(inputs, time.perf_counter())])
        if isinstance(result, ServingError):
            raise result
        return result

    async def _send(self, waiting: list[_Waiting], bulk_lane: bool = False) -> list[InferenceResult | ServingError]:
        """One merged call (the gatherer carries realtime requests only: bulk_lane is never set)."""
        sent = time.perf_counter()
        self.calls += 1
        try:
            merged = ModelInput(token_ids=self._encode([w.inputs for w in waiting]),
                                requests=sum(w.inputs.requests for w in waiting))
            result = await self._call(merged)
            return self._split(result, waiting, sent)
        except ServingError as e:
            if len(waiting) == 1 or isinstance(e, _SERVER_SIDE):
                return [e] * len(waiting)
            alone = await asyncio.gather(*(self._send([w]) for w in waiting))
            return [r for (r,) in alone]

    @staticmethod
    def _split(result: InferenceResult, waiting: list[_Waiting], sent: float) -> list[InferenceResult | ServingError]:
        sizes = [len(w.inputs) for w in waiting]
        if result.outputs.shape[0] != sum(sizes):
            failure = ModelFailure(f"the model server returned {result.outputs.shape[0]} rows for {sum(sizes)} items")
            return [failure] * len(waiting)
        out, start = [], 0
        for w, n in zip(waiting, sizes):
            # Queue wait as the client lived it: waiting here for a call, then in the server's batch queue.
            out.append(replace(result, outputs=result.outputs[start:start + n],
                               queue_wait_ms=(sent - w.arrived_s) * 1000.0 + result.queue_wait_ms,
                               gathered=len(waiting)))
            start += n
        return out

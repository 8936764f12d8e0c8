"""How the ingress reaches a model: through a Serve handle (routed), with concurrent requests merged
into one call (routed with `ingress.gather`) sent through the handle or over a direct link to the
model server (`gather.transport: direct`), or in the same process (fused).

All answer the same three calls, so the HTTP routes do not care which mode the application runs in.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import replace
from typing import Any, Optional, Protocol

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from app.batching import check_token_budget
from app.config import GatherOptions, ModelSpec
from app.engine_link import EngineLinks
from app.errors import ModelFailure, Overloaded, ServingError
from app.gather import RequestGatherer
from app.requests import InferenceResult, ModelInput
from deployments.replica_wait import placed
from deployments.slot_gate import SlotGate

logger = logging.getLogger("ray.serve")

_READY_TIMEOUT_S = 2.0
_ADDRESS_TIMEOUT_S = 10.0  # a model server still starting may be slow to answer; the handle carries calls meanwhile


def as_serving_error(exc: BaseException) -> ServingError:
    """Map what a model server call raised to a ServingError, keeping client errors as they were."""
    if isinstance(exc, ServingError):
        return exc
    cause = getattr(exc, "cause", None)
    if isinstance(exc, RayTaskError) and isinstance(cause, ServingError):
        return cause
    if isinstance(exc, BackPressureError):
        return Overloaded("the model's queue is full; retry shortly")
    logger.error("model call failed: %r", exc)
    return ModelFailure(f"the model server failed: {type(exc).__name__}")


class ModelClient(Protocol):
    async def infer(self, inputs: ModelInput) -> InferenceResult: ...

    async def describe(self) -> dict[str, Any]: ...

    async def ready(self) -> bool: ...


class HandleClient:
    """A model server deployment behind a Serve handle (one extra hop, scaled on its own)."""

    def __init__(self, name: str, handle: DeploymentHandle, replica_wait_s: Optional[float] = None,
                 gate: Optional[SlotGate] = None):
        self.name = name
        self.handle = handle
        self.replica_wait_s = replica_wait_s  # ModelSpec.effective_replica_wait_s()
        self.gate = gate  # admission by replica slots (deployments/slot_gate.py), or None

    async def _send(self, inputs: ModelInput) -> InferenceResult:
        response = self.handle.infer.remote(inputs)
        await placed(response, self.handle, self.replica_wait_s)
        return await response

    async def infer(self, inputs: ModelInput) -> InferenceResult:
        # Bulk requests keep Serve's queue: the model server bounds them on their own (traffic
        # classes), and they must not take the slots that realtime requests are admitted by.
        if self.gate is None or inputs.traffic_class != "realtime":
            return await self._timed(inputs, 0.0)
        t0 = time.perf_counter()
        await self.gate.enter()
        try:
            return await self._timed(inputs, (time.perf_counter() - t0) * 1e3)
        finally:
            self.gate.exit()

    async def _timed(self, inputs: ModelInput, admission_wait_ms: float) -> InferenceResult:
        """The result, with this ingress's share of its time (X-Admission-Wait-Ms, X-Model-Call-Ms):
        the call's round trip less the replica's queue and batch is the hop to the replica and back."""
        t0 = time.perf_counter()
        result = await self._infer(inputs)
        return replace(result, admission_wait_ms=admission_wait_ms, call_ms=(time.perf_counter() - t0) * 1e3)

    async def _infer(self, inputs: ModelInput) -> InferenceResult:
        try:
            return await self._send(inputs)
        except RayActorError:
            # The replica died mid-request (killed, OOM, node lost). Inference has no side effects,
            # so one retry on another replica is safe; a second failure is reported.
            logger.warning("model %s: replica died during a request; retrying once", self.name)
            return await self._send(inputs)

    async def describe(self) -> dict[str, Any]:
        return await self.handle.describe.remote()

    async def ready(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.handle.ready.remote(), _READY_TIMEOUT_S))
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False


class GatheringClient(HandleClient):
    """A handle whose calls carry every request that arrived while the previous calls were out,
    tokenised here (app/gather.py): the ingress replicas are the front end, the model server the engine."""

    def __init__(self, spec: ModelSpec, handle: DeploymentHandle, options: GatherOptions):
        from app.models.loader import load_tokenizer
        from app.models.tokenize import TextEncoder

        super().__init__(spec.name, handle, spec.effective_replica_wait_s())
        self.spec = spec
        # An ingress replica holds a share of one core: tokenise on the calling thread rather than
        # through the tokenizer's pool of one thread per host core (which spin between calls).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.encoder = TextEncoder(load_tokenizer(spec), spec.max_seq_len)
        self.links: EngineLinks | None = None
        call = self._call
        if options.transport == "direct":
            self.links = EngineLinks(spec.name, self._engine_address, self._call, options.links, options.relink_s)
            call = self.links.call
        # infer() tokenises each request, so encoding a merged call only passes its token ids through.
        self.gatherer = RequestGatherer(call, self.encoder.encode, options.max_items, options.max_calls_in_flight)

    async def _engine_address(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.handle.engine_address.remote(), _ADDRESS_TIMEOUT_S)

    async def _call(self, inputs: ModelInput) -> InferenceResult:
        try:
            return await super().infer(inputs)
        except Exception as e:  # noqa: BLE001 - mapped so the gatherer can tell whose fault it was
            raise as_serving_error(e) from None

    async def infer(self, inputs: ModelInput) -> InferenceResult:
        if inputs.texts is not None:
            # Tokenised as it arrives, while the previous call is out, so a merged call leaves with
            # its ids ready rather than tokenising every text of the call (~0.35 ms each on the H200
            # host) when it leaves. On a worker thread it measured no better (README, "The
            # front-end/engine split").
            inputs = ModelInput(token_ids=self.encoder.encode([inputs]), requests=inputs.requests)
        # Checked per request here: the server cannot tell the merged requests apart.
        check_token_budget(inputs, self.spec, self.encoder)
        if inputs.traffic_class != "realtime":
            # A merged call carries one class; bulk requests are large already, so they go alone
            # and the realtime calls the gatherer merges stay realtime.
            return await self._call(inputs)
        return await self.gatherer.infer(inputs)


class LocalClient:
    """The model server living in this very replica (fused mode): a plain await, no hop."""

    def __init__(self, server: Any):
        self.server = server

    async def infer(self, inputs: ModelInput) -> InferenceResult:
        return await self.server.infer(inputs)

    async def describe(self) -> dict[str, Any]:
        return await self.server.describe()

    async def ready(self) -> bool:
        return await self.server.ready()

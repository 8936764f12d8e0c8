"""How the ingress reaches a model: through a Serve handle (routed) or in the same process (fused).

Both answer the same three calls, so the HTTP routes do not care which mode the application runs in.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from app.schemas import InferenceResult, ModelInput

logger = logging.getLogger("ray.serve")

_READY_TIMEOUT_S = 2.0


class ModelClient(Protocol):
    async def infer(self, inputs: ModelInput) -> InferenceResult: ...

    async def describe(self) -> dict[str, Any]: ...

    async def ready(self) -> bool: ...


class HandleClient:
    """A model server deployment behind a Serve handle (one extra hop, scaled on its own)."""

    def __init__(self, name: str, handle: DeploymentHandle):
        self.name = name
        self.handle = handle

    async def infer(self, inputs: ModelInput) -> InferenceResult:
        try:
            return await self.handle.infer.remote(inputs)
        except RayActorError:
            # The replica died mid-request (killed, OOM, node lost). Inference has no side effects,
            # so one retry on another replica is safe; a second failure is reported.
            logger.warning("model %s: replica died during a request; retrying once", self.name)
            return await self.handle.infer.remote(inputs)

    async def describe(self) -> dict[str, Any]:
        return await self.handle.describe.remote()

    async def ready(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.handle.ready.remote(), _READY_TIMEOUT_S))
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False


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

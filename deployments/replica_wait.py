"""The ingress's bound on waiting for a replica while a model has none up.

Serve's router holds a request for as long as no replica of its deployment is running: while a gang
is replaced after a lost rank (~20 s on the test cluster) or a lone replica restarts, clients see a
hang. `placed` waits for the router to give the call to a replica; past `limits.replica_wait_s` it
asks the controller whether the deployment has a RUNNING replica at all. None: the call is
cancelled and answered 503 + Retry-After. Some: the replicas are busy, and the request keeps its
place in the queue, which max_queued_requests already bounds (a busy model sheds there, not here).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional

from app.errors import ReplicaUnavailable

logger = logging.getLogger("ray.serve")

_CENSUS_MAX_AGE_S = 1.0  # one controller read a second per ingress process, and only while requests flow


class ReplicaCensus:
    """RUNNING replicas per (application, deployment), read from the controller's status
    (controller_details) at most once per max_age_s and shared by every caller."""

    def __init__(self, max_age_s: float = _CENSUS_MAX_AGE_S):
        self.max_age_s = max_age_s
        self._read_at = float("-inf")
        self._running: dict[tuple[str, str], list[str]] = {}  # sorted replica ids
        self._pending: Optional[asyncio.Future] = None

    async def running(self, app: str, deployment: str) -> int:
        """The count, read again first when the last read is older than max_age_s."""
        if self._stale():
            await asyncio.shield(self._refresh())
        return len(self._running.get((app, deployment), ()))

    async def running_now(self, app: str, deployment: str) -> int:
        """The last read's count without waiting for the controller (only the very first read is
        awaited); a stale one is read again in the background. For every request's path."""
        return len(await self.running_ids_now(app, deployment))

    async def running_ids_now(self, app: str, deployment: str) -> list[str]:
        """The last read's RUNNING replica ids, sorted, as running_now reads them."""
        if self._read_at == float("-inf"):
            await asyncio.shield(self._refresh())
        elif self._stale():
            self._refresh()
        return self._running.get((app, deployment), [])

    def _stale(self) -> bool:
        return time.monotonic() - self._read_at > self.max_age_s

    def _refresh(self) -> asyncio.Future:
        """The read in flight, or a new one: one at a time, shared by every caller."""
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(self._read_async())
        return self._pending

    async def _read_async(self) -> None:
        running = await asyncio.to_thread(self.read)
        self._running, self._read_at = running, time.monotonic()

    @staticmethod
    def read() -> dict[tuple[str, str], list[str]]:
        try:
            return running_replicas(controller_details())
        except Exception as e:  # noqa: BLE001 - an unreadable controller counts as no replica
            logger.warning("replica census: the controller's status failed: %r", e)
            return {}


def controller_details() -> dict[str, Any]:
    """The controller's status document as plain data (the shape of Serve's REST API,
    ServeInstanceDetails); {} without a controller. `serve.status()` validates the same document
    into pydantic models, and that re-pickles every deployment's request router class: ~40 ms of
    GIL-holding CPU per call on 2 cores, which the ingress's event loop had to share once a second.
    The plain document costs ~1 ms; with it, half load's time before the model replica fell from
    p99 25-37 ms to 9-10 ms on 16 cores (docs/performance.md, session 31). The client call is
    Serve's private API, as of the pinned Ray 2.60."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return {} if client is None else client.get_serve_details()


def running_replicas(details: dict[str, Any]) -> dict[tuple[str, str], list[str]]:
    """The ids of the RUNNING replicas per (application, deployment), sorted, in a
    controller_details() document."""
    return {(a, d): sorted(str(r.get("replica_id")) for r in dep.get("replicas") or ()
                           if _state(r.get("state")) == "RUNNING")
            for a, app in (details.get("applications") or {}).items()
            for d, dep in (app.get("deployments") or {}).items()}


def _state(state: Any) -> str:
    """A ReplicaState, or its value as the REST API's JSON has it."""
    return str(getattr(state, "value", state))


CENSUS = ReplicaCensus()


async def placed(response: Any, handle: Any, wait_s: Optional[float], census: ReplicaCensus = CENSUS) -> None:
    """Return once Serve's router has given `response`'s call to a replica of `handle`'s deployment;
    ReplicaUnavailable (503) if it waited wait_s and the deployment has no RUNNING replica.

    The replica is cached on the response, so awaiting or iterating it afterwards costs nothing
    more. `_fetch_future_result_async` is how Serve's own `await response` gets its replica (Ray
    2.60, pinned); a Ray without it skips the bound rather than failing the request."""
    fetch = getattr(response, "_fetch_future_result_async", None)
    if wait_s is None or fetch is None:
        return
    assignment = asyncio.ensure_future(fetch())
    try:
        while True:
            done, _ = await asyncio.wait({assignment}, timeout=wait_s)  # waits without cancelling it
            if done:
                assignment.result()
                return
            if await census.running(handle.app_name, handle.deployment_name) == 0:
                response.cancel()
                raise ReplicaUnavailable(
                    f"no replica of {handle.deployment_name} is running (starting or being replaced) "
                    f"and none took the request within {wait_s:g} s; retry shortly")
    finally:
        if not assignment.done():
            assignment.cancel()

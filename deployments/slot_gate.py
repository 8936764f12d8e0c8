"""Admission at the ingress by the model's replica slots (`ingress.admit_by_replica_slots`, on by default).

At overload an accepted request's tail sits before the model replica (docs/performance.md, session
21): Serve's router holds it in the caller's handle queue and re-probes full replicas until one
frees a slot, newer requests win some of those rounds, and several ingress replicas race for each
freed slot. Here each ingress replica keeps its requests in flight to a model version at its share
of the slots that the version's RUNNING replicas have (`max_ongoing_requests` each), so a request it
sends always finds a free slot. Requests past the share wait here in arrival order, at most
`queue_bound` of them (ModelSpec.slot_queue_bound: one batch over all ingress replicas, so a burst
is served by the next batch), and each takes the slot of a request that finishes; past that they
answer 503 + Retry-After at once. Replica counts come from the controller's status (ReplicaCensus,
read at most once a second in the background and shared).
"""

from __future__ import annotations

import asyncio
import collections
import math
from typing import Optional

from app.errors import Overloaded
from deployments.replica_wait import CENSUS, ReplicaCensus


def share_of_slots(model_replicas: int, slots_per_replica: int, ingress_replicas: int) -> int:
    """One ingress replica's share of the model's slots, rounded up (at least 1) so that a model
    with fewer slots than ingress replicas still takes requests from each of them."""
    return max(1, math.ceil(model_replicas * slots_per_replica / max(1, ingress_replicas)))


class SlotGate:
    def __init__(self, app: str, deployment: str, slots_per_replica: int, ingress_deployment: str,
                 queue_bound: int, census: ReplicaCensus = CENSUS):
        self.app, self.deployment, self.ingress_deployment = app, deployment, ingress_deployment
        self.slots_per_replica = slots_per_replica
        self.queue_bound = queue_bound
        self.census = census
        self.in_flight = 0
        self._bound: Optional[int] = None
        self._waiting: collections.deque[asyncio.Future] = collections.deque()

    async def bound(self) -> Optional[int]:
        """None while the model has no RUNNING replica (replica_wait.placed answers that case)."""
        # The last read, never a wait for the controller on a request's path: a refresh in line
        # added ~30 ms to 1 % of requests at half load on 16 cores (docs/performance.md, session 27).
        replicas = await self.census.running_now(self.app, self.deployment)
        if replicas == 0:
            return None
        ingresses = await self.census.running_now(self.app, self.ingress_deployment)
        return share_of_slots(replicas, self.slots_per_replica, ingresses)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def enter(self) -> None:
        """Return holding one of this ingress's slots; Overloaded when they and the queue are full."""
        self._bound = await self.bound()
        self._release()  # the share may have grown (scale-out) since the last request left
        if self._bound is None or (self.in_flight < self._bound and not self._waiting):
            self.in_flight += 1
            return
        if 0 <= self.queue_bound <= len(self._waiting):  # -1: unbounded
            raise Overloaded(f"{self.deployment}: this ingress's {self._bound} model slots and its queue of "
                             f"{self.queue_bound} are full; retry shortly")
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            await turn  # _release counted us in before resolving it
        except asyncio.CancelledError:  # the client left while waiting
            if turn.done() and not turn.cancelled():
                self.exit()  # the slot was already ours: pass it on
            else:
                self._waiting.remove(turn)
            raise

    def exit(self) -> None:
        self.in_flight -= 1
        self._release()

    def _release(self) -> None:
        """Hand free slots to the longest-waiting requests."""
        while self._waiting and (self._bound is None or self.in_flight < self._bound):
            turn = self._waiting.popleft()
            if turn.done():
                continue
            self.in_flight += 1
            turn.set_result(None)

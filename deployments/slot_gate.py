"""Admission at the ingress by the model's replica slots (`ingress.admit_by_replica_slots`, on by default).

At overload an accepted request's tail sits before the model replica (docs/performance.md, session
21): Serve's router holds it in the caller's handle queue and re-probes full replicas until one
frees a slot, newer requests win some of those rounds, and several ingress replicas race for each
freed slot. Here each ingress replica keeps its requests in flight to a model version at its share
of the slots that the version's RUNNING replicas have (`max_ongoing_requests` each), so a request it
sends finds a free slot (the shares add up to the slots: share_of_slots). Requests
past the share wait here in arrival order, at most `queue_bound` of them (ModelSpec.slot_queue_bound:
one batch over all ingress replicas, so a burst is served by the next batch), and each takes the
slot of a request that finishes; past that they answer 503 + Retry-After at once. Replica counts
come from the controller's status (ReplicaCensus, read at most once a second in the background and
shared).

The queue is for bursts, not for a standing overload (CoDel's distinction; Facebook's "controlled
delay" queues in "Fail at scale"): a burst that fits the slots and the queue is served whole, but
once the queue has overflowed (a request shed), and for `OVERLOAD_MEMORY_S` after the last such
overflow, a request that has waited more than `overload_wait_s` is answered 503 + Retry-After
instead of holding its place. In a standing overload the queue would otherwise add its whole length
to every accepted request: on one 16-core host at 10x, accepted p99 273 ms (3.6-4.7x the half-load
p99) with the plain queue against 178-231 ms (2.1-3.3x) with this, same machine (docs/performance.md,
session 29).

Each ingress replica sees only its own arrivals, so the rule needs each to get its part of them:
HAProxy's `roundrobin` (RAY_SERVE_HAPROXY_BALANCE_ALGORITHM, set where Ray starts; README
"Admission"). Serve's default, `leastconn`, sends new arrivals away from the ingress whose queue
is full, so that queue stops overflowing and its requests wait a whole batch there: with the shares
dealt out exactly, accepted p99 509-670 ms under leastconn against 394-437 ms under roundrobin
(docs/performance.md, session 32).
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import time
from typing import Any, Callable, Optional

from app.errors import Overloaded
from deployments.replica_wait import CENSUS, ReplicaCensus

OVERLOAD_MEMORY_S = 1.0  # overload mode lasts this long after the queue last overflowed
# In overload mode, the longest a request waits here for a slot. Env: the benchmark's lever (0: the
# gate alone past the share; a negative value: never, the queue's wait is unbounded as before).
OVERLOAD_WAIT_ENV = "BATCHSERVE_SLOT_GATE_OVERLOAD_WAIT_MS"
DEFAULT_OVERLOAD_WAIT_S = 0.02
# The benchmark's lever for the shares before session 33: "1" rounds every share up (ignores the rank).
SHARES_ROUNDED_UP_ENV = "BATCHSERVE_SLOT_SHARES_ROUNDED_UP"
_FROM_ENV = object()


def overload_wait_s(environ=os.environ) -> Optional[float]:
    """The overload-mode wait (seconds) from the environment's lever, or the default; None: never."""
    raw = environ.get(OVERLOAD_WAIT_ENV)
    if raw is None:
        return DEFAULT_OVERLOAD_WAIT_S
    ms = float(raw)
    return None if ms < 0 else ms / 1000.0


def share_of_slots(model_replicas: int, slots_per_replica: int, ingress_replicas: int,
                   rank: Optional[int] = None) -> int:
    """One ingress replica's share of the model's slots, at least 1 so that a model with fewer slots
    than ingress replicas still takes requests from each of them.

    `rank` is this ingress replica's place among the RUNNING ingress replicas (sorted by replica id):
    the slots are dealt out whole, the first `slots % ingress_replicas` getting one more, so the
    shares add up to the slots exactly (3 ingress replicas over 16 slots: 6, 5, 5). Shares rounded
    up (6, 6, 6) keep more requests in flight than the replicas hold: a replica turns the extra ones
    away and each waits in Serve's router for a slot, about a batch, where the gate's overload rule
    cannot see it (on 16 cores at 10x: the hop to the replica and back p99 45 ms with 2 over, 69 ms
    with 3 over, 5 ms at half load). Rounded down (5, 5, 5) the replica runs batches of 7 and 8 in
    turn and ~10 % fewer requests are served. Dealt out, the hop's p99 was 22-30 ms against 40-51 ms
    rounded up in the same calls, 16 cores at 10x (docs/performance.md, sessions 30 and 32-34).
    Without a rank (this replica not RUNNING in the census yet): rounded up."""
    total, n = model_replicas * slots_per_replica, max(1, ingress_replicas)
    if rank is None or not 0 <= rank < n:
        return max(1, math.ceil(total / n))
    return max(1, total // n + (1 if rank < total % n else 0))


class SlotGate:
    def __init__(self, app: str, deployment: str, slots_per_replica: int, ingress_deployment: str,
                 queue_bound: int, census: ReplicaCensus = CENSUS, overload_wait: Any = _FROM_ENV,
                 clock: Callable[[], float] = time.monotonic, ingress_replica_id: Optional[str] = None):
        self.app, self.deployment, self.ingress_deployment = app, deployment, ingress_deployment
        # This ingress replica's id: its rank among them (none, and every share is rounded up).
        self.ingress_replica_id = None if os.environ.get(SHARES_ROUNDED_UP_ENV) == "1" else ingress_replica_id
        self.slots_per_replica = slots_per_replica
        self.queue_bound = queue_bound
        self.census = census
        self.overload_wait: Optional[float] = overload_wait_s() if overload_wait is _FROM_ENV else overload_wait
        self.clock = clock
        self.in_flight = 0
        self.shed_stale = 0  # requests answered 503 after waiting overload_wait in overload mode
        self._bound: Optional[int] = None
        self._overload_until = -math.inf
        self._waiting: collections.deque[tuple[float, asyncio.Future]] = collections.deque()

    async def bound(self) -> Optional[int]:
        """None while the model has no RUNNING replica (replica_wait.placed answers that case)."""
        # The last read, never a wait for the controller on a request's path: a refresh in line
        # added ~30 ms to 1 % of requests at half load on 16 cores (docs/performance.md, session 27).
        replicas = await self.census.running_now(self.app, self.deployment)
        if replicas == 0:
            return None
        ingresses = await self.census.running_ids_now(self.app, self.ingress_deployment)
        rank = ingresses.index(self.ingress_replica_id) if self.ingress_replica_id in ingresses else None
        return share_of_slots(replicas, self.slots_per_replica, len(ingresses), rank)

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
            self._overload_until = self.clock() + OVERLOAD_MEMORY_S
            self._shed_stale()
            if self.queue_bound <= len(self._waiting):
                raise Overloaded(f"{self.deployment}: this ingress's {self._bound} model slots and its queue of "
                                 f"{self.queue_bound} are full; retry shortly")
        turn = asyncio.get_running_loop().create_future()
        entry = (self.clock(), turn)
        self._waiting.append(entry)
        try:
            await turn  # _release counted us in before resolving it (or _shed_stale refused us)
        except asyncio.CancelledError:  # the client left while waiting
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self.exit()  # the slot was already ours: pass it on
            elif entry in self._waiting:
                self._waiting.remove(entry)
            raise

    def exit(self) -> None:
        self.in_flight -= 1
        self._release()

    def _release(self) -> None:
        """Hand free slots to the longest-waiting requests (in overload mode, those not yet stale)."""
        self._shed_stale()
        while self._waiting and (self._bound is None or self.in_flight < self._bound):
            _, turn = self._waiting.popleft()
            if turn.done():
                continue
            self.in_flight += 1
            turn.set_result(None)

    def _shed_stale(self) -> None:
        """In overload mode, answer 503 to the requests that waited longer than overload_wait."""
        if self.overload_wait is None or not self._waiting:
            return
        now = self.clock()
        if now >= self._overload_until:
            return
        while self._waiting and now - self._waiting[0][0] > self.overload_wait:
            _, turn = self._waiting.popleft()
            if turn.done():
                continue
            self.shed_stale += 1
            turn.set_exception(Overloaded(f"{self.deployment}: overloaded; no model slot freed within "
                                          f"{self.overload_wait * 1000:.0f} ms; retry shortly"))

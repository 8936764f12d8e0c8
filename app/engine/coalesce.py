"""Merge the batches Serve closes while the device is busy into one device batch.

Ray Serve 2.60's `@serve.batch` closes a batch when its wait runs out, whether or not the previous
batch has finished; with `max_concurrent_batches=1` the closed batches then queue behind a
semaphore, each as small as what arrived during one wait. Under load the device ran hundreds of
one- or two-item batches a second and the per-batch cost (thread hand-off, tokenizer call, launch,
copy back) became the limit (measured: 567 req/s on one H200 replica, p50 228 ms).

A device batch here is formed when a runner slot frees up — as in Triton's dynamic batcher — from
everything Serve has closed since, up to the item cap. Serve still decides when requests are
batched, the cap, the wait and backpressure; this only stops small closed batches from running
one by one. Pure asyncio: no Ray, unit-tested on its own.

Traffic classes: Serve's batch queue is FIFO, so each class has its own (the shell's two
`@serve.batch` methods) and the classes meet here, in two lanes of `slots` device batches each.
The realtime lane runs realtime batches, filling what they leave with bulk ones; the bulk lane runs
bulk batches alone, at most `bulk_items` each. So a realtime request never waits for a bulk batch
to finish, and bulk always progresses: the batcher runs the bulk lane on threads of lower CPU
priority (batcher.py), which is bulk's guaranteed share while realtime keeps the device busy.
With `lanes=False` (runners that take one call at a time: tensor and pipeline gangs) there is one
lane, which takes realtime batches first.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Awaitable, Callable, Generic, Optional, Sequence, TypeVar

E = TypeVar("E")  # a batch entry
R = TypeVar("R")  # its result
_Pending = tuple  # (entries, future): a closed batch waiting for a device batch


class BatchCoalescer(Generic[E, R]):
    def __init__(self, run: Callable[[list[E], bool], Awaitable[list[R]]], size_of: Callable[[Sequence[E]], int],
                 max_items: Callable[[], int], slots: int = 1, bulk_items: Optional[Callable[[], int]] = None,
                 lanes: bool = True):
        self._run = run  # (entries, on the bulk lane) -> results
        self._size_of = size_of
        self._max_items = max_items
        self._bulk_items = bulk_items or max_items
        self._lanes = lanes
        self._slots = slots
        self._busy = {False: 0, True: 0}  # device batches running per lane (True: bulk)
        # (entries, future), oldest first, one queue per class.
        self._realtime: deque[_Pending] = deque()
        self._bulk: deque[_Pending] = deque()

    @property
    def waiting_batches(self) -> int:
        return len(self._realtime) + len(self._bulk)

    async def submit(self, entries: list[E], bulk: bool = False) -> list[R]:
        """Results for `entries`, in order, once a device batch holding them has run."""
        future: asyncio.Future[list[R]] = asyncio.get_running_loop().create_future()
        (self._bulk if bulk else self._realtime).append((entries, future))
        lane = bulk and self._lanes
        if self._busy[lane] < self._slots:
            self._busy[lane] += 1
            asyncio.get_running_loop().create_task(self._drain(lane))
        return await future

    def _take(self, bulk_lane: bool) -> list[_Pending]:
        """The closed batches of the next device batch of a lane, up to the cap (always at least
        one): realtime first then bulk on the realtime lane (or the one lane), bulk alone on the
        bulk lane, up to bulk_items."""
        _drop_cancelled(self._realtime)
        _drop_cancelled(self._bulk)
        if bulk_lane:
            queues, cap = [self._bulk], self._bulk_items()
        elif self._lanes and not self._realtime:
            return []  # bulk alone is the bulk lane's
        else:
            queues = [self._realtime, self._bulk]
            cap = self._max_items() if self._realtime else self._bulk_items()
        taken: list[_Pending] = []
        items = 0
        for queue in queues:
            while queue:
                entries, future = queue[0]
                if future.done():  # its caller went away (cancelled): nothing to compute
                    queue.popleft()
                    continue
                size = self._size_of(entries)
                if taken and items + size > cap:
                    break
                taken.append(queue.popleft())
                items += size
        return taken

    async def _drain(self, bulk_lane: bool) -> None:
        try:
            while True:
                taken = self._take(bulk_lane)
                if not taken:
                    return
                merged = [e for entries, _ in taken for e in entries]
                try:
                    results = await self._run(merged, bulk_lane)
                except BaseException as exc:  # noqa: BLE001 - every caller of this device batch gets it
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                start = 0
                for entries, future in taken:
                    part = results[start : start + len(entries)]
                    start += len(entries)
                    if not future.done():
                        future.set_result(part)
        finally:
            self._busy[bulk_lane] -= 1


def _drop_cancelled(queue: deque) -> None:
    while queue and queue[0][1].done():
        queue.popleft()

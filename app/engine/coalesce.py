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
`@serve.batch` methods) and the classes meet here. A device batch takes realtime batches first and
fills what they leave with bulk ones; a batch of bulk alone holds at most `bulk_items`, so a
realtime request arriving behind it waits for a short batch. A bulk batch that has waited
`bulk_max_wait_s` ages into arrival order with realtime: bulk is never starved, and while realtime
load leaves room it costs realtime nothing (a guaranteed bulk share per batch would tax every
realtime batch, loaded or not).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Awaitable, Callable, Generic, Optional, Sequence, TypeVar

E = TypeVar("E")  # a batch entry
R = TypeVar("R")  # its result
_Pending = tuple  # (closed at, entries, future): a closed batch waiting for a device batch


class BatchCoalescer(Generic[E, R]):
    def __init__(self, run: Callable[[list[E]], Awaitable[list[R]]], size_of: Callable[[Sequence[E]], int],
                 max_items: Callable[[], int], slots: int = 1, bulk_items: Optional[Callable[[], int]] = None,
                 bulk_max_wait_s: float = float("inf"), clock: Callable[[], float] = time.monotonic):
        self._run = run
        self._size_of = size_of
        self._max_items = max_items
        self._bulk_items = bulk_items or max_items
        self._bulk_max_wait_s = bulk_max_wait_s
        self._clock = clock
        self._slots = slots
        self._busy = 0
        # (closed at, entries, future), oldest first, one queue per class.
        self._realtime: deque[_Pending] = deque()
        self._bulk: deque[_Pending] = deque()

    @property
    def waiting_batches(self) -> int:
        return len(self._realtime) + len(self._bulk)

    async def submit(self, entries: list[E], bulk: bool = False) -> list[R]:
        """Results for `entries`, in order, once a device batch holding them has run."""
        future: asyncio.Future[list[R]] = asyncio.get_running_loop().create_future()
        (self._bulk if bulk else self._realtime).append((self._clock(), entries, future))
        if self._busy < self._slots:
            self._busy += 1
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    def _order(self) -> list[deque[_Pending]]:
        """Which class leads the next device batch: realtime, unless the oldest bulk batch has aged
        past bulk_max_wait_s ahead of the oldest realtime one."""
        _drop_cancelled(self._realtime)
        _drop_cancelled(self._bulk)
        if self._bulk and (not self._realtime or (
                self._clock() - self._bulk[0][0] >= self._bulk_max_wait_s and self._bulk[0][0] <= self._realtime[0][0])):
            return [self._bulk, self._realtime]
        return [self._realtime, self._bulk]

    def _take(self) -> list[tuple[list[E], asyncio.Future[list[R]]]]:
        """The closed batches of the next device batch, its leading class first, up to the cap
        (always at least one); a device batch of bulk alone stops at bulk_items."""
        lead, fill = self._order()
        cap = self._max_items() if lead is self._realtime and lead else self._bulk_items()
        taken: list[tuple[list[E], asyncio.Future[list[R]]]] = []
        items = 0
        for queue in (lead, fill):
            while queue:
                _, entries, future = queue[0]
                if future.done():  # its caller went away (cancelled): nothing to compute
                    queue.popleft()
                    continue
                size = self._size_of(entries)
                if taken and items + size > cap:
                    break
                queue.popleft()
                taken.append((entries, future))
                items += size
        return taken

    async def _drain(self) -> None:
        try:
            while True:
                taken = self._take()
                if not taken:
                    return
                merged = [e for entries, _ in taken for e in entries]
                try:
                    results = await self._run(merged)
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
            self._busy -= 1


def _drop_cancelled(queue: deque) -> None:
    while queue and queue[0][2].done():
        queue.popleft()

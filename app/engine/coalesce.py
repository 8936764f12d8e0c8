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
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Awaitable, Callable, Generic, Sequence, TypeVar

E = TypeVar("E")  # a batch entry
R = TypeVar("R")  # its result


class BatchCoalescer(Generic[E, R]):
    def __init__(self, run: Callable[[list[E]], Awaitable[list[R]]], size_of: Callable[[Sequence[E]], int],
                 max_items: Callable[[], int], slots: int = 1):
        self._run = run
        self._size_of = size_of
        self._max_items = max_items
        self._slots = slots
        self._busy = 0
        self._pending: deque[tuple[list[E], asyncio.Future[list[R]]]] = deque()

    @property
    def waiting_batches(self) -> int:
        return len(self._pending)

    async def submit(self, entries: list[E]) -> list[R]:
        """Results for `entries`, in order, once a device batch holding them has run."""
        future: asyncio.Future[list[R]] = asyncio.get_running_loop().create_future()
        self._pending.append((entries, future))
        if self._busy < self._slots:
            self._busy += 1
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    def _take(self) -> list[tuple[list[E], asyncio.Future[list[R]]]]:
        """The oldest closed batches that fit the cap together (always at least one)."""
        cap = self._max_items()
        taken, items = [], 0
        while self._pending:
            entries, future = self._pending[0]
            if future.done():  # its caller went away (cancelled): nothing to compute
                self._pending.popleft()
                continue
            size = self._size_of(entries)
            if taken and items + size > cap:
                break
            taken.append(self._pending.popleft())
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

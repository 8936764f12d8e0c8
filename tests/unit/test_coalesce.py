"""The coalescer merges batches closed while the device is busy, keeps order, and fails together."""

import asyncio

import pytest

from app.engine.coalesce import BatchCoalescer


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


class Device:
    def __init__(self, fail_on=None):
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.fail_on = fail_on

    async def run(self, entries: list[int]) -> list[int]:
        self.batches.append(list(entries))
        await self.gate.wait()
        if self.fail_on is not None and self.fail_on in entries:
            raise RuntimeError("device failed")
        return [e * 10 for e in entries]


def test_batches_closed_while_busy_run_as_one_within_the_cap():
    async def scenario():
        dev = Device()
        co = BatchCoalescer(dev.run, len, lambda: 5, slots=1)
        first = asyncio.create_task(co.submit([1, 2]))
        await settle()
        later = [asyncio.create_task(co.submit(b)) for b in ([3], [4, 5], [6, 7], [8])]
        await settle()
        assert dev.batches == [[1, 2]] and co.waiting_batches == 4
        dev.gate.set()
        results = await asyncio.gather(first, *later)
        return dev.batches, results

    batches, results = asyncio.run(scenario())
    assert batches == [[1, 2], [3, 4, 5, 6, 7], [8]]  # 1+2+2 items fill the cap of 5; the rest next
    assert results == [[10, 20], [30], [40, 50], [60, 70], [80]]


def test_a_batch_larger_than_the_cap_still_runs_alone():
    async def scenario():
        dev = Device()
        dev.gate.set()
        co = BatchCoalescer(dev.run, len, lambda: 2, slots=1)
        return await co.submit([1, 2, 3]), dev.batches

    assert asyncio.run(scenario()) == ([10, 20, 30], [[1, 2, 3]])


def test_a_device_failure_reaches_every_caller_of_that_batch_only():
    async def scenario():
        dev = Device(fail_on=4)
        co = BatchCoalescer(dev.run, len, lambda: 3, slots=1)
        a = asyncio.create_task(co.submit([1]))
        await settle()
        b, c, d = (asyncio.create_task(co.submit(x)) for x in ([3], [4], [5, 6]))
        await settle()
        dev.gate.set()
        return await asyncio.gather(a, b, c, d, return_exceptions=True)

    a, b, c, d = asyncio.run(scenario())
    assert a == [10] and d == [50, 60]
    assert isinstance(b, RuntimeError) and isinstance(c, RuntimeError)


def test_cancelled_callers_are_skipped_and_nothing_wedges():
    async def scenario():
        dev = Device()
        co = BatchCoalescer(dev.run, len, lambda: 10, slots=1)
        a = asyncio.create_task(co.submit([1]))
        await settle()
        gone = asyncio.create_task(co.submit([2]))
        kept = asyncio.create_task(co.submit([3]))
        await settle()
        gone.cancel()
        dev.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await gone
        after = await co.submit([4])
        return await a, await kept, after, dev.batches

    a, kept, after, batches = asyncio.run(scenario())
    assert (a, kept, after) == ([10], [30], [40])
    assert [2] not in [b for b in batches] and all(2 not in b for b in batches)


def test_two_slots_run_two_device_batches_at_once():
    async def scenario():
        dev = Device()
        co = BatchCoalescer(dev.run, len, lambda: 10, slots=2)
        tasks = [asyncio.create_task(co.submit([0]))]
        await settle()
        tasks += [asyncio.create_task(co.submit([i])) for i in (1, 2)]
        await settle()
        running = [list(b) for b in dev.batches]
        dev.gate.set()
        await asyncio.gather(*tasks)
        return running

    assert asyncio.run(scenario()) == [[0], [1, 2]]


def test_realtime_batches_lead_and_bulk_fills_what_they_leave():
    async def scenario():
        dev = Device()
        co = BatchCoalescer(dev.run, len, lambda: 4, slots=1, bulk_items=lambda: 2)
        first = asyncio.create_task(co.submit([100, 101], bulk=True))
        await settle()
        # Closed while the device is busy: two bulk batches first, then two realtime ones.
        later = [asyncio.create_task(co.submit(b, bulk=True)) for b in ([102], [103, 104])]
        later += [asyncio.create_task(co.submit(b)) for b in ([1], [2, 3])]
        await settle()
        dev.gate.set()
        await asyncio.gather(first, *later)
        return dev.batches

    # Realtime's 3 items lead; bulk [102] fills the cap of 4; bulk alone then stops at 2 items.
    assert asyncio.run(scenario()) == [[100, 101], [1, 2, 3, 102], [103, 104]]


def test_a_bulk_batch_that_waited_past_its_limit_leads_again():
    async def scenario():
        now = [0.0]
        dev = Device()
        co = BatchCoalescer(dev.run, len, lambda: 2, slots=1, bulk_items=lambda: 2, bulk_max_wait_s=1.0,
                            clock=lambda: now[0])
        first = asyncio.create_task(co.submit([1]))
        await settle()
        aged = asyncio.create_task(co.submit([100, 101], bulk=True))
        now[0] = 0.5
        fresh = [asyncio.create_task(co.submit([i])) for i in (2, 3, 4, 5)]
        await settle()
        now[0] = 5.0  # the bulk batch has waited 5 s: past its 1 s, and older than every realtime batch
        dev.gate.set()
        await asyncio.gather(first, aged, *fresh)
        return dev.batches

    assert asyncio.run(scenario()) == [[1], [100, 101], [2, 3], [4, 5]]


def test_without_aging_bulk_waits_while_realtime_keeps_the_device_busy():
    async def scenario():
        dev = Device()
        co = BatchCoalescer(dev.run, len, lambda: 2, slots=1, bulk_items=lambda: 2)
        first = asyncio.create_task(co.submit([1]))
        await settle()
        bulk = asyncio.create_task(co.submit([100, 101], bulk=True))
        rt = [asyncio.create_task(co.submit([i])) for i in (2, 3, 4, 5)]
        await settle()
        dev.gate.set()
        await asyncio.gather(first, bulk, *rt)
        return dev.batches

    assert asyncio.run(scenario()) == [[1], [2, 3], [4, 5], [100, 101]]

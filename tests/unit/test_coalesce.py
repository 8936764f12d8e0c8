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

    async def run(self, entries: list[int], bulk_lane: bool = False) -> list[int]:
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


class LaneDevice(Device):
    """Records which lane each device batch ran on."""

    async def run(self, entries, bulk_lane=False):
        self.batches.append((bulk_lane, list(entries)))
        await self.gate.wait()
        return [e * 10 for e in entries]


def test_realtime_never_waits_for_a_running_bulk_batch_and_fills_with_bulk():
    async def scenario():
        dev = LaneDevice()
        co = BatchCoalescer(dev.run, len, lambda: 4, slots=1, bulk_items=lambda: 2)
        first = asyncio.create_task(co.submit([100, 101], bulk=True))
        await settle()
        later = [asyncio.create_task(co.submit(b, bulk=True)) for b in ([102], [103, 104])]
        rt = asyncio.create_task(co.submit([1, 2]))
        await settle()
        # The bulk lane is busy with [100, 101]; the realtime batch started at once beside it and
        # took bulk [102] into its room (1 + 2 + 1 <= 4; [103, 104] would not fit).
        started = list(dev.batches)
        dev.gate.set()
        await asyncio.gather(first, rt, *later)
        return started, dev.batches

    started, batches = asyncio.run(scenario())
    assert started == [(True, [100, 101]), (False, [1, 2, 102])]
    assert batches[2:] == [(True, [103, 104])]  # bulk alone stops at bulk_items


def test_bulk_alone_runs_on_the_bulk_lane_only_and_progresses_under_realtime_load():
    async def scenario():
        dev = LaneDevice()
        co = BatchCoalescer(dev.run, len, lambda: 2, slots=1, bulk_items=lambda: 2)
        rt = [asyncio.create_task(co.submit([i])) for i in (1, 2, 3, 4, 5)]
        bulk = asyncio.create_task(co.submit([100, 101], bulk=True))
        await settle()
        started = list(dev.batches)
        dev.gate.set()
        await asyncio.gather(bulk, *rt)
        return started

    assert asyncio.run(scenario()) == [(False, [1, 2]), (True, [100, 101])]  # side by side


def test_one_lane_runs_realtime_first():
    async def scenario():
        dev = LaneDevice()
        co = BatchCoalescer(dev.run, len, lambda: 2, slots=1, bulk_items=lambda: 2, lanes=False)
        first = asyncio.create_task(co.submit([1]))
        await settle()
        bulk = asyncio.create_task(co.submit([100, 101], bulk=True))
        rt = [asyncio.create_task(co.submit([i])) for i in (2, 3, 4, 5)]
        await settle()
        dev.gate.set()
        await asyncio.gather(first, bulk, *rt)
        return dev.batches

    assert asyncio.run(scenario()) == [(False, [1]), (False, [2, 3]), (False, [4, 5]), (False, [100, 101])]

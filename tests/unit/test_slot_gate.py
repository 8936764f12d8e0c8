"""The ingress's admission by model replica slots (deployments.slot_gate), without Ray: a scripted
controller census."""

from __future__ import annotations

import asyncio

import pytest

from app.config import ModelSpec
from app.errors import Overloaded
from deployments.replica_wait import ReplicaCensus
from deployments.slot_gate import (DEFAULT_OVERLOAD_WAIT_S, OVERLOAD_MEMORY_S, OVERLOAD_WAIT_ENV, SHARES_ROUNDED_UP_ENV,
                                   SlotGate,
                                   overload_wait_s, share_of_slots)


class _Census(ReplicaCensus):
    def __init__(self, counts: dict[tuple[str, str], int]):
        super().__init__(max_age_s=0.0)
        self.counts = counts

    def read(self):
        return {key: [f"r{i}" for i in range(n)] for key, n in self.counts.items()}


@pytest.mark.parametrize("replicas, slots, ingresses, share", [
    (1, 16, 1, 16), (2, 16, 3, 11), (1, 16, 3, 6), (1, 2, 3, 1), (0, 16, 1, 1), (4, 16, 0, 64)])
def test_without_a_rank_an_ingress_share_is_its_part_of_the_slots_rounded_up_and_never_zero(replicas, slots,
                                                                                           ingresses, share):
    assert share_of_slots(replicas, slots, ingresses) == share


@pytest.mark.parametrize("replicas, slots, ingresses, shares", [
    (1, 16, 3, [6, 5, 5]), (2, 16, 3, [11, 11, 10]), (1, 16, 4, [4, 4, 4, 4]), (2, 16, 5, [7, 7, 6, 6, 6]),
    (1, 2, 3, [1, 1, 1])])
def test_ranked_shares_deal_out_the_slots_whole_and_never_zero(replicas, slots, ingresses, shares):
    dealt = [share_of_slots(replicas, slots, ingresses, rank) for rank in range(ingresses)]
    assert dealt == shares
    if replicas * slots >= ingresses:
        assert sum(dealt) == replicas * slots
    assert share_of_slots(replicas, slots, ingresses, ingresses) == max(shares)  # not among them: rounded up


def test_a_gate_takes_the_share_of_its_rank_among_the_running_ingress_replicas():
    census = _Census({("app", "m"): 1, ("app", "Ingress"): 3})  # 4 slots over 3 ingresses: 2, 1, 1

    async def shares():
        return [await SlotGate("app", "m", 4, "Ingress", 0, census, ingress_replica_id=rid).bound()
                for rid in ("r0", "r1", "r2", "starting")]
    assert asyncio.run(shares()) == [2, 1, 1, 2]


def test_the_benchmark_lever_rounds_every_share_up(monkeypatch):
    monkeypatch.setenv(SHARES_ROUNDED_UP_ENV, "1")
    census = _Census({("app", "m"): 1, ("app", "Ingress"): 3})
    shares = [asyncio.run(SlotGate("app", "m", 4, "Ingress", 0, census, ingress_replica_id=rid).bound())
              for rid in ("r0", "r1", "r2")]
    assert shares == [2, 2, 2]


def _gate(census: _Census, queue: int, **kw) -> SlotGate:
    return SlotGate("app", "m", 4, "Ingress", queue, census, **kw)  # 4 slots a replica


def _one_replica_gate(queue: int, **kw) -> SlotGate:
    """One model replica (4 slots) and one ingress replica: the whole share is this gate's."""
    return _gate(_Census({("app", "m"): 1, ("app", "Ingress"): 1}), queue, **kw)


async def _queued_behind_full_slots(gate: SlotGate, waiting: int) -> list[asyncio.Task]:
    """Take the gate's 4 slots, then start `waiting` more requests (each queued or shed)."""
    for _ in range(4):
        await gate.enter()
    tasks = [asyncio.create_task(gate.enter()) for _ in range(waiting)]
    await asyncio.sleep(0)
    return tasks


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_past_the_share_requests_queue_in_order_then_are_shed_and_take_freed_slots_first_come_first_served():
    census = _Census({("app", "m"): 2, ("app", "Ingress"): 3})  # 2 x 4 slots over 3 ingresses: 3 each
    gate = _gate(census, queue=2)

    async def scenario():
        for _ in range(3):
            await gate.enter()
        first, second = asyncio.create_task(gate.enter()), asyncio.create_task(gate.enter())
        await asyncio.sleep(0)
        assert gate.waiting == 2 and not first.done()
        with pytest.raises(Overloaded):
            await gate.enter()
        assert gate.in_flight == 3  # a shed request is never counted
        gate.exit()
        await asyncio.sleep(0)
        assert first.done() and not second.done() and gate.in_flight == 3  # the slot went to the oldest
        gate.exit()
        await asyncio.sleep(0)
        assert second.done() and gate.waiting == 0

    asyncio.run(scenario())


def test_a_grown_share_lets_waiting_requests_in_without_waiting_for_an_exit():
    census = _Census({("app", "m"): 1, ("app", "Ingress"): 1})
    gate = _gate(census, queue=8)

    async def scenario():
        waiters = await _queued_behind_full_slots(gate, 3)
        assert gate.waiting == 3
        census.counts[("app", "m")] = 2  # scaled out: 8 slots
        await census.running("app", "m")  # the next read (on the path it happens in the background)
        await gate.enter()  # the next arrival finds the share grown and releases the queue first
        await asyncio.gather(*waiters)
        assert gate.in_flight == 8 and gate.waiting == 0

    asyncio.run(scenario())


def test_a_client_that_leaves_while_waiting_gives_up_its_place_and_any_slot_it_was_handed():
    gate = _one_replica_gate(queue=8)

    async def scenario():
        leaver, stayer = await _queued_behind_full_slots(gate, 2)
        leaver.cancel()
        await asyncio.gather(leaver, return_exceptions=True)
        assert gate.waiting == 1
        gate.exit()
        await stayer
        assert gate.in_flight == 4
        # Handed a slot and cancelled before it ran: the slot passes on, it is not lost.
        late, last = asyncio.create_task(gate.enter()), asyncio.create_task(gate.enter())
        await asyncio.sleep(0)
        gate.exit()  # resolves `late`'s turn ...
        late.cancel()  # ... which is cancelled before it resumes
        await asyncio.gather(late, return_exceptions=True)
        await last
        assert gate.in_flight == 4 and gate.waiting == 0

    asyncio.run(scenario())


def test_a_gate_queue_of_zero_sheds_at_the_share_and_minus_one_never_sheds():
    async def scenario(queue: int) -> int:
        tasks = await _queued_behind_full_slots(_one_replica_gate(queue), 20)
        results = await asyncio.gather(*(asyncio.wait_for(t, 0.05) for t in tasks), return_exceptions=True)
        shed = sum(isinstance(r, Overloaded) for r in results)
        return shed

    assert asyncio.run(scenario(0)) == 20
    assert asyncio.run(scenario(-1)) == 0


def test_no_running_replica_leaves_the_request_to_the_replica_wait():
    gate = _gate(_Census({("app", "Ingress"): 1}), queue=0)

    async def scenario():
        for _ in range(10):
            await gate.enter()

    asyncio.run(scenario())
    assert gate.in_flight == 10


def test_the_queue_is_one_batch_over_the_ingress_replicas_unless_set():
    spec = ModelSpec(name="m", task="embed", source={"kind": "random_init", "architecture": "bert"},
                     batching={"max_batch_size": 8})
    assert [spec.slot_queue_bound(n) for n in (1, 3, 16)] == [8, 3, 1]
    set_ = ModelSpec(name="m", task="embed", source={"kind": "random_init", "architecture": "bert"},
                     batching={"max_batch_size": 8}, autoscaling={"max_queued_requests": 2})
    assert set_.slot_queue_bound(3) == 2


def test_a_handle_queue_of_zero_is_refused_as_config():
    # Serve counts a request as queued until a replica is picked for it: 0 would refuse them all.
    with pytest.raises(ValueError, match="max_queued_requests 0"):
        ModelSpec(name="m", task="embed", source={"kind": "random_init", "architecture": "bert"},
                  autoscaling={"max_queued_requests": 0})


def test_a_burst_that_fits_the_queue_is_served_whole_however_long_it_waits():
    clock = _Clock()
    gate = _one_replica_gate(queue=4, overload_wait=0.02, clock=clock)

    async def scenario():
        waiters = await _queued_behind_full_slots(gate, 4)
        clock.now += 5.0  # a slow batch: no overflow, so no overload mode
        for _ in range(4):
            gate.exit()
        await asyncio.gather(*waiters)
        assert gate.in_flight == 4 and gate.shed_stale == 0

    asyncio.run(scenario())


def test_after_an_overflow_stale_waiters_are_shed_and_fresh_ones_keep_their_place():
    clock = _Clock()
    gate = _one_replica_gate(queue=2, overload_wait=0.02, clock=clock)

    async def scenario():
        old = await _queued_behind_full_slots(gate, 2)
        clock.now += 0.05  # the two queued requests are now stale, but no overflow yet: they stay
        gate.exit()
        await asyncio.sleep(0)
        assert old[0].done() and not old[1].done() and gate.shed_stale == 0
        gate.exit()
        await asyncio.sleep(0)
        assert old[1].done()
        # A standing overload: the queue fills, the next arrival overflows it.
        queued = [asyncio.create_task(gate.enter()) for _ in range(2)]
        await asyncio.sleep(0)
        clock.now += 0.05
        fresh = asyncio.create_task(gate.enter())  # the overflow: the stale two are shed, it queues
        await asyncio.sleep(0)
        results = await asyncio.gather(*queued, return_exceptions=True)
        assert all(isinstance(r, Overloaded) for r in results) and gate.shed_stale == 2
        assert not fresh.done() and gate.waiting == 1 and gate.in_flight == 4
        gate.exit()
        await fresh  # a freed slot goes to the fresh waiter
        # Still in overload mode: a waiter that goes stale is shed when the next request arrives.
        late = asyncio.create_task(gate.enter())
        await asyncio.sleep(0)
        clock.now += 0.05
        next_one = asyncio.create_task(gate.enter())
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await late
        assert not next_one.done() and gate.waiting == 1
        # The mode ends OVERLOAD_MEMORY_S after the last overflow: waiting is unbounded in time again.
        clock.now += OVERLOAD_MEMORY_S
        gate.exit()
        await next_one
        assert gate.in_flight == 4 and gate.waiting == 0

    asyncio.run(scenario())


def test_without_an_overload_wait_the_queue_never_sheds_by_age():
    clock = _Clock()
    gate = _one_replica_gate(queue=1, overload_wait=None, clock=clock)

    async def scenario():
        (waiter,) = await _queued_behind_full_slots(gate, 1)
        clock.now += 10.0
        with pytest.raises(Overloaded):
            await gate.enter()  # the queue is full: the newcomer is shed, not the one waiting
        gate.exit()
        await waiter
        assert gate.shed_stale == 0

    asyncio.run(scenario())


def test_the_overload_wait_lever():
    assert overload_wait_s({}) == DEFAULT_OVERLOAD_WAIT_S
    assert overload_wait_s({OVERLOAD_WAIT_ENV: "50"}) == 0.05
    assert overload_wait_s({OVERLOAD_WAIT_ENV: "0"}) == 0.0
    assert overload_wait_s({OVERLOAD_WAIT_ENV: "-1"}) is None

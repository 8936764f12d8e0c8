"""The engine without Ray: a fake runner, a fake encoder, Serve's batch queue replaced by direct
calls. Ordering, the cap, isolation, out-of-memory split, cancellation and retunes."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import torch

from app.batching import BatchEntry
from app.config import BatchingConfig
from app.engine.oneshot import OneShotEngine
from app.engine.faults import FaultInjection, fault_drill, faults_from_env
from app.errors import ModelFailure, ReplicaUnavailable
from app.runners.base import DeviceLost, ModelRunner
from app.requests import ModelInput

POISON = 13


class FakeRunner(ModelRunner):
    """Sums each row's ids; fails on POISON, runs out of memory above `fits` rows, records shapes."""

    strategy = "fake"

    def __init__(self, fits: int | None = None, gate: threading.Event | None = None):
        self.fits, self.gate = fits, gate
        self.shapes: list[tuple[int, int]] = []
        self.released = 0
        self.lost = False

    def start(self) -> None:
        pass

    def infer(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            self.gate.wait(5)
        if self.lost:
            raise DeviceLost("rank 1 died")
        self.shapes.append(tuple(ids.shape))
        if (ids == POISON).any():
            raise RuntimeError("poisoned batch")
        if self.fits is not None and ids.shape[0] > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return (ids * mask).float().sum(dim=1, keepdim=True)

    def release_cached_memory(self) -> None:
        self.released += 1

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.strategy}


class IdEncoder:
    pad_id = 0

    def encode(self, inputs):
        return [row for x in inputs for row in x.token_ids]


class Recorder:
    def __init__(self):
        self.events: list[tuple] = []

    def enqueued(self): self.events.append(("enqueued",))
    def dequeued(self, n=1): self.events.append(("dequeued", n))
    def batch_done(self, items, duration_ms, waits_ms): self.events.append(("batch", items))
    def request_served(self, requests=1): self.events.append(("served", requests))
    def batching(self, wait_s, max_batch_size): self.events.append(("batching", wait_s, max_batch_size))


def engine(runner=None, memory_limit=1024, batch_tokens=None, faults=None, **batching) -> OneShotEngine:
    cfg = BatchingConfig.model_validate({"max_batch_size": 8, "batch_wait_timeout_s": 0.0, **batching})
    return OneShotEngine("fake", runner or FakeRunner(), IdEncoder(), cfg, memory_limit, Recorder(),
                         batch_tokens=batch_tokens, before_batch=fault_drill(faults or FaultInjection()),
                         served_by=("replica-1", "node-1"))


def direct(e: OneShotEngine):
    """Serve's batch queue stand-in: each entry is handed to the engine as its own closed batch."""
    async def enqueue(entry: BatchEntry):
        return (await e.batcher.run([entry]))[0]
    return enqueue


def sums(rows):
    return [[float(sum(r))] for r in rows]


def test_each_request_gets_its_own_rows_in_order_and_batches_merge_while_the_device_is_busy():
    gate = threading.Event()
    e = engine(FakeRunner(gate=gate))

    async def main():
        requests = [ModelInput(token_ids=[[i, 1], [i, 2]]) for i in range(6)]
        tasks = [asyncio.create_task(e.infer(r, direct(e))) for r in requests]
        await asyncio.sleep(0.05)  # the first device batch holds the slot; the rest queue behind it
        gate.set()
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    for i, r in enumerate(results):
        assert r.outputs.tolist() == sums([[i, 1], [i, 2]])
        assert (r.replica, r.node) == ("replica-1", "node-1")
    # One slot, six closed batches of 2 items waiting for it: merged into device batches within the
    # cap of 8 items (4 requests, then the other 2), not run one by one.
    assert [rows for rows, _ in e.batcher.runner.shapes] == [8, 4]
    assert e.pending_items == 0
    served = [ev for ev in e.observer.events if ev[0] == "served"]
    assert len(served) == 6


def test_a_request_above_the_cap_is_chunked_and_put_back_together():
    e = engine(max_batch_size=4)
    rows = [[i, 1] for i in range(10)]
    result = asyncio.run(e.infer(ModelInput(token_ids=rows), direct(e)))
    assert result.outputs.tolist() == sums(rows)
    assert all(n <= 4 for n, _ in e.batcher.runner.shapes)


def test_the_cap_is_bounded_by_memory_and_retunes_are_validated_and_bounded():
    e = engine(memory_limit=6, max_batch_size=64)
    assert e.control.max_batch_size == 6  # memory wins over the config
    e.retune({"max_batch_size": 5, "batch_wait_timeout_s": 0.02})
    assert (e.control.max_batch_size, e.control.wait_s) == (5, 0.02)
    assert ("batching", 0.02, 5) in e.observer.events
    e.retune({"max_batch_size": 100})
    assert e.control.max_batch_size == 6
    with pytest.raises(ValueError, match="max_batch_szie"):
        e.retune({"max_batch_szie": 3})
    assert e.control.max_batch_size == 6  # a refused retune changes nothing
    e.retune({"max_concurrent_batches": 3})
    assert e.batcher.slots == 3 and e.batcher.executor._max_workers == 3


def test_a_failing_item_fails_alone_and_its_batch_mates_are_answered():
    e = engine()
    entries = [BatchEntry(ModelInput(token_ids=[[i + 1, i + 2]]), 0.0) for i in range(7)]
    entries.insert(3, BatchEntry(ModelInput(token_ids=[[POISON]]), 0.0))
    results = e.batcher.compute_isolated(entries, 0.0)
    assert isinstance(results[3], ModelFailure) and "poisoned batch" in str(results[3])
    good = [r for i, r in enumerate(results) if i != 3]
    assert [float(r.outputs[0, 0]) for r in good] == [2 * i + 3 for i in range(7)]


def test_out_of_memory_splits_until_it_fits_and_lowers_the_cap():
    e = engine(FakeRunner(fits=2))
    entries = [BatchEntry(ModelInput(token_ids=[[i, 1]]), 0.0) for i in range(5)]
    entries.append(BatchEntry(ModelInput(token_ids=[[10 * k, 1] for k in range(1, 6)]), 0.0))
    results = asyncio.run(e.batcher.run(entries))
    assert [float(r.outputs[0, 0]) for r in results[:5]] == [i + 1 for i in range(5)]
    assert results[5].outputs[:, 0].tolist() == [11, 21, 31, 41, 51]  # split, answered in order
    assert e.batcher.runner.released >= 1
    assert e.control.max_batch_size <= 2 and e.control.memory_limit <= 2
    assert ("batching", 0.0, e.control.max_batch_size) in e.observer.events


def test_a_lost_device_fails_the_whole_batch_at_once_without_bisecting():
    runner = FakeRunner()
    runner.lost = True
    e = engine(runner)
    entries = [BatchEntry(ModelInput(token_ids=[[i]]), 0.0) for i in range(4)]
    results = e.batcher.compute_isolated(entries, 0.0)
    assert all(isinstance(r, ReplicaUnavailable) for r in results)


def test_token_budget_cuts_device_batches():
    e = engine(batch_tokens=8)
    entries = [BatchEntry(ModelInput(token_ids=[[1] * n]), 0.0) for n in (2, 3, 4, 1, 8)]
    results = e.batcher.compute_isolated(entries, 0.0)
    assert [float(r.outputs[0, 0]) for r in results] == [2, 3, 4, 1, 8]
    assert all(b * length <= 8 for b, length in e.batcher.runner.shapes)


def test_a_cancelled_request_never_runs_and_leaves_nothing_behind():
    gate = threading.Event()
    e = engine(FakeRunner(gate=gate))

    async def main():
        first = asyncio.create_task(e.infer(ModelInput(token_ids=[[1]]), direct(e)))
        await asyncio.sleep(0.02)
        doomed = asyncio.create_task(e.infer(ModelInput(token_ids=[[2]]), direct(e)))
        await asyncio.sleep(0.02)
        doomed.cancel()
        gate.set()
        await first
        with pytest.raises(asyncio.CancelledError):
            await doomed
        after = await e.infer(ModelInput(token_ids=[[3]]), direct(e))
        return after

    after = asyncio.run(main())
    assert after.outputs.tolist() == [[3.0]]
    assert [rows for rows, _ in e.batcher.runner.shapes] == [1, 1]  # the cancelled one never ran
    assert e.pending_items == 0
    dequeued = sum(ev[1] for ev in e.observer.events if ev[0] == "dequeued")
    assert dequeued == sum(1 for ev in e.observer.events if ev[0] == "enqueued")


def test_fault_drills_are_off_unless_asked_and_fail_where_the_model_would():
    assert fault_drill(FaultInjection()) is None
    e = engine(faults=FaultInjection(fail_on_text="boom"))
    entries = [BatchEntry(ModelInput(texts=["boom"]), 0.0)]
    e.batcher.encoder = type("E", (), {"pad_id": 0, "encode": lambda self, xs: [[1] for x in xs for _ in x.texts]})()
    assert isinstance(e.batcher.compute_isolated(entries, 0.0)[0], ModelFailure)


def test_autoscaling_stats_count_items_in_the_replica():
    e = engine()
    asyncio.run(e.infer(ModelInput(token_ids=[[1], [2]]), direct(e)))
    stats = e.autoscaling_stats()
    assert stats["queued_items"] == 0.0 and stats["queue_wait_p99_ms"] >= 0.0


def test_fault_drills_come_from_the_environment_not_the_config():
    import orjson

    from app.config import ConfigError, parse_app_args
    from tests.helpers import tiny_bert_spec

    env = {"BATCHSERVE_FAULTS": orjson.dumps({"tiny": {"batch_delay_s": 0.5}}).decode()}
    assert faults_from_env("tiny", env).batch_delay_s == 0.5
    assert faults_from_env("other", env) == FaultInjection()
    assert faults_from_env("tiny", {}) == FaultInjection()
    for bad in ("[1]", "{not json", '{"tiny": {"batch_delay_s": -1}}', '{"tiny": {"typo": 1}}'):
        with pytest.raises(ValueError, match="BATCHSERVE_FAULTS"):
            faults_from_env("tiny", {"BATCHSERVE_FAULTS": bad})
    with pytest.raises(ConfigError, match="faults: unknown field"):
        parse_app_args({"models": [tiny_bert_spec(faults={"batch_delay_s": 1})]})


def test_a_request_predicted_to_wait_past_the_budget_is_shed_at_once():
    from app.errors import Overloaded

    class SlowRunner(FakeRunner):
        def infer(self, ids, mask):
            import time
            time.sleep(0.05)  # 50 ms a batch of up to 2 items: ~40 items/s
            return super().infer(ids, mask)

    e = engine(SlowRunner(), max_batch_size=2)
    e.max_queue_wait_ms = 120.0

    async def main():
        await e.infer(ModelInput(token_ids=[[1], [1]]), direct(e))  # the rate is measured: ~40 items/s
        assert 30 < e.items_per_s() < 45
        admitted = [asyncio.create_task(e.infer(ModelInput(token_ids=[[i]]), direct(e))) for i in range(4)]
        await asyncio.sleep(0)
        # 4 items ahead at ~40 items/s is ~100 ms: within the budget. 6 ahead is ~150 ms: shed.
        more = [asyncio.create_task(e.infer(ModelInput(token_ids=[[9]]), direct(e))) for _ in range(3)]
        return await asyncio.gather(*admitted), await asyncio.gather(*more, return_exceptions=True)

    admitted, more = asyncio.run(main())
    assert [r.outputs.tolist() for r in admitted] == [[[float(i)]] for i in range(4)]
    assert not isinstance(more[0], Exception)  # the 5th: ~100 ms ahead of it, admitted
    assert all(isinstance(r, Overloaded) for r in more[1:]) and "would queue" in str(more[1])
    off = engine(SlowRunner(), max_batch_size=2)  # no budget: nothing is shed
    asyncio.run(off.infer(ModelInput(token_ids=[[1], [1]]), direct(off)))
    assert off.max_queue_wait_ms is None


def test_a_full_bulk_class_refuses_bulk_and_still_takes_realtime():
    from app.engine.oneshot import BulkPolicy
    from app.errors import Overloaded

    gate = threading.Event()
    cfg = BatchingConfig.model_validate({"max_batch_size": 8, "batch_wait_timeout_s": 0.0})
    e = OneShotEngine("fake", FakeRunner(gate=gate), IdEncoder(), cfg, 1024, Recorder(),
                      bulk=BulkPolicy(max_ongoing_requests=1, batch_items=2))

    async def main():
        held = asyncio.create_task(e.infer(ModelInput(token_ids=[[1, 1]] * 5, traffic_class="bulk"), direct(e),
                                           direct_bulk(e)))
        await asyncio.sleep(0.02)
        with pytest.raises(Overloaded, match="bulk limit"):
            await e.infer(ModelInput(token_ids=[[2, 2]], traffic_class="bulk"), direct(e), direct_bulk(e))
        realtime = asyncio.create_task(e.infer(ModelInput(token_ids=[[3, 3]]), direct(e), direct_bulk(e)))
        await asyncio.sleep(0.02)
        gate.set()
        return await held, await realtime

    bulk, realtime = asyncio.run(main())
    assert bulk.outputs.tolist() == sums([[1, 1]] * 5) and realtime.outputs.tolist() == sums([[3, 3]])
    assert e.batcher.runner.shapes[0][0] == 2  # the first bulk chunk ran alone, at bulk's batch_items
    assert e.bulk_requests == 0


def direct_bulk(e: OneShotEngine):
    async def enqueue(entry: BatchEntry):
        return (await e.batcher.run([entry], bulk=True))[0]
    return enqueue

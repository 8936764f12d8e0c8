"""The ingress's bound on waiting for a replica while a model has none running
(deployments.replica_wait) and its config default."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.config import ModelSpec
from app.errors import ReplicaUnavailable
from deployments.replica_wait import ReplicaCensus, placed, running_replicas


class _Response:
    """What `placed` needs of a Serve DeploymentResponse: the replica-assignment await and cancel()."""

    def __init__(self, assign_after_s: float):
        self.assign_after_s = assign_after_s
        self.cancelled = False
        self.assigned = False

    async def _fetch_future_result_async(self):
        await asyncio.sleep(self.assign_after_s)
        self.assigned = True
        return object()

    def cancel(self) -> None:
        self.cancelled = True


class _Handle:
    app_name, deployment_name = "app", "m"


class _Census(ReplicaCensus):
    """The controller's answer, scripted: RUNNING replicas of app/m, and how often it was asked."""

    def __init__(self, running: int):
        super().__init__(max_age_s=0.0)
        self.replicas = running
        self.reads = 0

    def read(self):
        self.reads += 1
        return {("app", "m"): [f"r{i}" for i in range(self.replicas)]}


def _placed(r: _Response, wait_s, census: _Census) -> float:
    t0 = time.monotonic()
    asyncio.run(placed(r, _Handle(), wait_s, census))
    return time.monotonic() - t0


def test_a_call_waiting_while_no_replica_runs_is_cancelled_and_answered_503_at_the_bound():
    r, census = _Response(assign_after_s=60), _Census(running=0)
    t0 = time.monotonic()
    with pytest.raises(ReplicaUnavailable) as err:
        _placed(r, 0.2, census)
    assert 0.2 <= time.monotonic() - t0 < 1.0
    assert r.cancelled and not r.assigned and census.reads == 1
    assert err.value.status_code == 503 and "no replica of m is running" in str(err.value)


def test_a_call_waiting_behind_busy_replicas_keeps_its_place():
    # Replicas run but are full: the queue bound sheds overload; the wait bound must not.
    r, census = _Response(assign_after_s=0.5), _Census(running=2)
    took = _placed(r, 0.1, census)
    assert r.assigned and not r.cancelled and took >= 0.5
    assert census.reads >= 3  # asked again at each bound while it waited


def test_a_call_placed_in_time_never_asks_the_controller():
    r, census = _Response(assign_after_s=0.01), _Census(running=0)
    _placed(r, 1.0, census)
    assert r.assigned and not r.cancelled and census.reads == 0


def test_no_bound_leaves_the_waiting_to_the_caller():
    r, census = _Response(assign_after_s=0.3), _Census(running=0)
    assert _placed(r, None, census) < 0.2
    assert not r.cancelled and not r.assigned and census.reads == 0


def test_the_census_shares_one_controller_read_between_waiters():
    census = _Census(running=1)
    census.max_age_s = 60.0

    async def many():
        return await asyncio.gather(*(census.running("app", "m") for _ in range(20)))

    assert asyncio.run(many()) == [1] * 20 and census.reads == 1
    assert asyncio.run(census.running("app", "other")) == 0 and census.reads == 1


def _spec(**over) -> ModelSpec:
    base = {"name": "m", "source": {"kind": "random_init", "architecture": "bert"}, "task": "embed"}
    return ModelSpec.model_validate({**base, **over})


def test_the_replica_wait_defaults_to_a_bound_but_waits_for_a_cold_start_from_zero():
    assert _spec().effective_replica_wait_s() == 5.0
    zero = {"enabled": True, "min_replicas": 0, "max_replicas": 2}
    assert _spec(autoscaling=zero).effective_replica_wait_s() is None
    assert _spec(autoscaling=zero, limits={"replica_wait_s": 30}).effective_replica_wait_s() == 30
    assert _spec(limits={"replica_wait_s": None}).effective_replica_wait_s() is None
    with pytest.raises(ValueError):
        _spec(limits={"replica_wait_s": 0})


def test_running_replicas_reads_the_controller_document():
    """Replica states as the controller hands them (enums) or as the REST API's JSON has them."""
    class State:
        def __init__(self, value):
            self.value = value

    details = {"applications": {
        "a": {"deployments": {
            "m": {"replicas": [{"replica_id": "zq", "state": State("RUNNING")}, {"replica_id": "ab", "state": "RUNNING"},
                               {"replica_id": "cd", "state": "STARTING"}]},
            "ingress": {"replicas": [{"replica_id": "ef", "state": "STOPPING"}]},
            "new": {"replicas": []}}},
        "b": {"deployments": {}}}}
    assert running_replicas(details) == {("a", "m"): ["ab", "zq"], ("a", "ingress"): [], ("a", "new"): []}
    assert running_replicas({}) == {} and running_replicas({"applications": None}) == {}

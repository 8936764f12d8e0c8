"""Autoscaling across a multi-node cluster with logical GPUs: up under a burst, down after it, and
not one request lost on the way; tensor-parallel replicas scale as whole gangs."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from bench.scaleup import Traffic, drive
from tests.helpers import tiny_bert_spec
from tests.integration.conftest import app_entry, app_status, extra_app

pytestmark = pytest.mark.integration


def running_replicas(app: str, deployment: str) -> int:
    status = app_status(app)
    if status is None or deployment not in status.deployments:
        return 0
    return status.deployments[deployment].replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module", params=["default", "queue_depth"])
def scaling_url(base_url, request):
    """The same small model under Serve's default policy and under ours (app/autoscaling.py)."""
    scaler = tiny_bert_spec(
        name="scaler",
        # 8 clients against batches of 2: four replicas' worth of queue for either policy.
        batching={"max_batch_size": 2, "batch_wait_timeout_s": 0.005},
        deployment={"num_cpus": 0.1, "num_gpus": 1},  # one logical GPU: 4 replicas need both workers
        autoscaling={"enabled": True, "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 1,
                     "upscale_delay_s": 0.5, "downscale_delay_s": 4, "metrics_interval_s": 0.5,
                     "look_back_period_s": 2, "policy": request.param, "target_queue_wait_ms": 50,
                     "max_queued_requests": -1},  # about scaling: every request waits and is answered
        # A fixed 20 ms per batch, so the 8 clients' items queue in the replicas whatever this host's
        # speed: a tiny model on one thread answered so fast that the queue signal asked for only 2.
        faults={"batch_delay_s": 0.02},
    )
    with extra_app(base_url, app_entry("scaling", [scaler])) as url:
        yield url


def test_scales_out_across_nodes_and_back_without_losing_requests(scaling_url):
    assert running_replicas("scaling", "scaler") == 1
    traffic = Traffic()
    t0 = time.monotonic()
    asyncio.run(drive(scaling_url, "scaler", traffic, t0, seconds=120, clients=8, until_replicas=3))
    replicas = traffic.replicas()
    nodes = {n for _, _, n in traffic.served_by}
    first_new = traffic.first_new_replica_s()
    print(f"\n[{scaling_url}] burst: {len(traffic.statuses)} requests, {len(replicas)} replicas on {len(nodes)} nodes; "
          f"first request served by a new replica {first_new:.1f} s after the load step; "
          f"status: {app_status('scaling').deployments['scaler']}")
    assert len(replicas) >= 3, replicas
    assert len(nodes) >= 2, nodes
    assert set(traffic.statuses) == {200} and traffic.wrong == 0

    # Load stops: back down to one replica; a trickle of requests during scale-down all succeed.
    trickle = Traffic()
    t1 = time.monotonic()

    async def trickle_until_one() -> None:
        async with httpx.AsyncClient(base_url=scaling_url, timeout=60) as c:
            while running_replicas("scaling", "scaler") > 1 and time.monotonic() - t1 < 90:
                r = await c.post("/v1/models/scaler:predict", json={"instances": ["trickle"]})
                trickle.statuses.append(r.status_code)
                await asyncio.sleep(0.1)

    asyncio.run(trickle_until_one())
    print(f"scaled down to 1 replica {time.monotonic() - t1:.1f} s after the load stopped; "
          f"{len(trickle.statuses)} requests during scale-down")
    assert running_replicas("scaling", "scaler") == 1
    assert trickle.statuses and set(trickle.statuses) == {200}


@pytest.fixture(scope="module")
def gang_url(base_url):
    gang = {
        "name": "gang",
        "source": {"kind": "random_init", "architecture": "llama",
                   "config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 4}},
        "task": "embed",
        "max_seq_len": 32,
        "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.005},
        "deployment": {"num_cpus": 0.1},
        "parallel": {"strategy": "deepspeed_tp", "tp": 2, "rank_num_cpus": 0.25,
                     "devices": {"kind": "cpu", "per_node": 2}},
        "autoscaling": {"enabled": True, "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                        "upscale_delay_s": 0.5, "downscale_delay_s": 60, "metrics_interval_s": 0.5,
                        "look_back_period_s": 2, "max_queued_requests": -1},
    }
    with extra_app(base_url, app_entry("gangs", [gang]), ready_timeout_s=300) as url:
        yield url


def test_tensor_parallel_replicas_scale_as_whole_gangs(gang_url):
    assert running_replicas("gangs", "gang") == 1
    traffic = Traffic()
    t0 = time.monotonic()

    async def until_two() -> None:
        await drive(gang_url, "gang", traffic, t0, seconds=150, clients=12, until_replicas=2)

    asyncio.run(until_two())
    replicas = {r for _, r, _ in traffic.served_by}
    assert len(replicas) == 2, "a second tensor-parallel gang never served"
    assert running_replicas("gangs", "gang") == 2
    counts = {s: traffic.statuses.count(s) for s in set(traffic.statuses)}
    assert all(s == 200 for s in traffic.statuses), counts
    # Each gang reserved its own placement group: 2 replicas x (own bundle + 2 ranks).
    from ray.util import placement_group_table

    groups = [g for g in placement_group_table().values()
              if g["state"] == "CREATED" and len(g["bundles"]) == 3 and g["strategy"] == "STRICT_PACK"]
    assert len(groups) >= 2


@pytest.fixture(scope="module")
def generator_gang_url(base_url):
    """A generator on tensor-parallel gangs (tp=2, gloo on CPU) under the shipped policy (queue depth)."""
    gang = {
        "name": "gen-gang",
        "source": {"kind": "random_init", "architecture": "llama", "seed": 3,
                   "config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2}},
        "task": "generate", "max_seq_len": 128, "dtype": "float32", "device": "cpu",
        # 4 sequences a replica: 12 clients hold three replicas' worth, so the policy asks for its max.
        "generation": {"max_new_tokens": 32, "default_max_tokens": 16, "max_running_sequences": 4,
                       "kv_cache_max_tokens": 4096},
        "deployment": {"num_cpus": 0.1, "torch_threads": 1},
        "parallel": {"strategy": "deepspeed_tp", "tp": 2, "rank_num_cpus": 0.25,
                     "devices": {"kind": "cpu", "per_node": 2}},
        "autoscaling": {"enabled": True, "policy": "queue_depth", "min_replicas": 1, "max_replicas": 2,
                        "upscale_delay_s": 0.5, "downscale_delay_s": 4, "metrics_interval_s": 0.5,
                        "look_back_period_s": 2, "max_queued_requests": -1},
    }
    with extra_app(base_url, app_entry("gengangs", [gang]), ready_timeout_s=300) as url:
        yield url


@pytest.mark.slow  # ~3 min: two gangs start and one stops (`-m slow`)
def test_generator_gangs_scale_out_and_back_in_answering_every_request(generator_gang_url):
    """#20: the autoscaler adds a whole second generator gang under load and removes it after."""
    from ray.util import placement_group_table

    def gang_groups() -> int:  # one placement group per live gang: one bundle (its stage) of 2 ranks
        return sum(1 for g in placement_group_table().values()
                   if g["state"] == "CREATED" and len(g["bundles"]) == 1 and g["bundles"][0].get("CPU") == 0.5)

    url, model = generator_gang_url, "gen-gang"
    assert running_replicas("gengangs", model) == 1
    statuses: list[int] = []
    served_by: set[str] = set()
    t0 = time.monotonic()

    async def load(stop) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            async def client(k: int) -> None:
                i = 0
                while not stop():
                    r = await c.post("/v1/completions", json={"model": model, "prompt": f"client {k} asks {i}",
                                                              "max_tokens": 16})
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        assert r.json()["usage"]["completion_tokens"] >= 1
                        served_by.add(r.headers["x-replica"])
                    i += 1

            await asyncio.gather(*(client(k) for k in range(12)))

    asyncio.run(load(lambda: len(served_by) >= 2 or time.monotonic() - t0 > 150))
    counts = {s: statuses.count(s) for s in set(statuses)}
    print(f"\nburst: {len(statuses)} completions {counts}, {len(served_by)} gangs answered "
          f"{time.monotonic() - t0:.1f} s after the load step")
    assert len(served_by) == 2, "a second generator gang never served"
    assert running_replicas("gengangs", model) == 2
    assert gang_groups() >= 2
    assert set(statuses) == {200}, counts

    # Load stops: back to one gang, while a trickle of completions is answered.
    trickle: list[int] = []
    t1 = time.monotonic()

    async def trickle_until_one() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            while running_replicas("gengangs", model) > 1 and time.monotonic() - t1 < 90:
                r = await c.post("/v1/completions", json={"model": model, "prompt": "trickle", "max_tokens": 4})
                trickle.append(r.status_code)
                await asyncio.sleep(0.2)

    asyncio.run(trickle_until_one())
    print(f"back to one gang {time.monotonic() - t1:.1f} s after the load stopped; {len(trickle)} completions meanwhile")
    assert running_replicas("gengangs", model) == 1
    assert trickle and set(trickle) == {200}
    # The removed gang's placement group is released.
    from ray._common.test_utils import wait_for_condition

    wait_for_condition(lambda: gang_groups() == 1, timeout=30)

"""Bad input, overload, cancellations and faults: nothing lost silently, nothing wedged."""

from __future__ import annotations

import asyncio
import math
import os
import time

import httpx
import numpy as np
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray._common.test_utils import wait_for_condition

from bench.overload import closed_loop_rate
from deployments.replica_wait import ReplicaCensus
from tests.helpers import tiny_bert_spec
from tests.integration.conftest import app_entry, app_status, extra_app, shipped_env

pytestmark = pytest.mark.integration

MODEL = "fragile"
POISON = "POISON-ITEM"


def running(deployment: str) -> int:
    status = app_status("fragile")
    return 0 if status is None else status.deployments[deployment].replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def fragile_url(base_url):
    spec = tiny_bert_spec(
        name=MODEL,
        batching={"max_batch_size": 8, "batch_wait_timeout_s": 0.01},
        deployment={"num_replicas": 2, "num_cpus": 0.1, "max_ongoing_requests": 16},
        autoscaling={"max_queued_requests": 24},
        faults={"fail_on_text": POISON, "batch_delay_s": 0.05},
    )
    with extra_app(base_url, app_entry("fragile", [spec])) as url:
        yield url


async def _post_many(url: str, bodies: list[dict], timeout: float = 60) -> list[httpx.Response | Exception]:
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=300)) as c:
        return await asyncio.gather(*(c.post(f"/v1/models/{MODEL}:predict", json=b) for b in bodies),
                                    return_exceptions=True)


def test_poisoned_item_fails_alone(fragile_url):
    bodies = [{"instances": [f"good {i}"]} for i in range(15)]
    bodies.insert(7, {"instances": [POISON]})
    responses = asyncio.run(_post_many(fragile_url, bodies))
    statuses = [r.status_code for r in responses]
    assert statuses[7] == 500 and "injected fault" in responses[7].json()["error"]
    assert statuses[:7] + statuses[8:] == [200] * 15


# Queueing bound of the app below: (4 queued + 4 in the replica) / 2 per batch x 0.5 s ~ 2 s, plus
# the running batch; on 2 cores the client and proxy at 10x load also slow everything down.
OVERLOAD_TARGET_P99_MS = 5000.0


def test_overload_at_ten_times_capacity_sheds_with_503_and_keeps_accepted_p99(base_url):
    """Measure the capacity of a deliberately slow replica, offer 10x that rate open loop: the excess
    gets 503 + Retry-After at once, accepted requests stay within the configured p99 target, nothing
    hangs, and the service answers normally as soon as the load stops."""
    spec = tiny_bert_spec(
        name="slowpoke",
        batching={"max_batch_size": 2, "batch_wait_timeout_s": 0.01, "target_p99_ms": OVERLOAD_TARGET_P99_MS},
        deployment={"num_replicas": 1, "num_cpus": 0.1, "max_ongoing_requests": 4},
        autoscaling={"max_queued_requests": 4},
        faults={"batch_delay_s": 0.5},  # ~4 req/s: 10x that stays within what 2 cores can offer
    )
    # With the replica settings the shipped config runs (Serve's router and our code on one loop):
    # what the README recommends, and what keeps rejections fast on 2 cores.
    with extra_app(base_url, app_entry("slowpoke", [spec], env=shipped_env())) as url:
        path = "/v1/models/slowpoke:predict"

        async def open_loop(rate: float, seconds: float):
            results = []
            async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=500)) as c:
                async def one(i):
                    t0 = time.perf_counter()
                    try:
                        r = await c.post(path, json={"instances": [f"flood {i}"]})
                        results.append((r.status_code, time.perf_counter() - t0, r.headers.get("retry-after")))
                    except httpx.TimeoutException:
                        results.append(("hang", time.perf_counter() - t0, None))
                tasks, start, i = [], time.perf_counter(), 0
                while time.perf_counter() - start < seconds:
                    tasks.append(asyncio.create_task(one(i)))
                    i += 1
                    await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
                await asyncio.gather(*tasks)
            return results

        capacity = asyncio.run(closed_loop_rate(url, path, b'{"instances": ["cap"]}', 4.0, 4))
        offered = 10 * capacity
        results = asyncio.run(open_loop(offered, 5.0))
        statuses = [s for s, _, _ in results]
        accepted = sorted(t for s, t, _ in results if s == 200)
        shed = sorted(t for s, t, _ in results if s == 503)
        p99 = accepted[int(0.99 * (len(accepted) - 1))] * 1000 if accepted else float("nan")
        print(f"\noverload: capacity {capacity:.1f} req/s, offered {offered:.0f} req/s for 5 s: {len(results)} requests, "
              f"{len(accepted)} accepted ({len(accepted) / 5.0:.1f} req/s, p99 {p99:.0f} ms), "
              f"rejection p99 {shed[int(0.99 * (len(shed) - 1))] * 1000:.0f} ms, "
              f"{len(shed)} shed with 503 ({len(shed) / len(results):.0%}; slowest rejection "
              f"{(shed[-1] if shed else 0) * 1000:.0f} ms), other {sorted(set(statuses) - {200, 503})}")
        assert "hang" not in statuses and set(statuses) <= {200, 503}, set(statuses)
        assert len(shed) >= 0.5 * len(results), "at 10x capacity most requests must be shed"
        assert all(ra for s, _, ra in results if s == 503), "every 503 says when to retry"
        # Rejected at once, not after queueing: far sooner than accepted requests are answered. Alone
        # this run's rejection p99 is ~150 ms; inside the full suite, with other test apps' replicas
        # alive on the same 2 cores, 1.05-1.24 s was measured (docs/performance.md "Overload"), and
        # 1.66 s in a later full run (accepted p99 3.9 s). The bound that says "at once" is the
        # relative one; the absolute one only catches rejections that queue like accepted requests.
        reject_p99 = shed[int(0.99 * (len(shed) - 1))]
        assert reject_p99 < 2.5 and reject_p99 * 1000 < 0.5 * p99, (reject_p99, p99)
        assert p99 <= OVERLOAD_TARGET_P99_MS
        t_stop = time.perf_counter()
        r = httpx.post(f"{url}{path}", json={"instances": ["after the storm"]}, timeout=30)
        assert r.status_code == 200 and time.perf_counter() - t_stop < 5.0


def test_cancelled_and_timed_out_clients_do_not_wedge_batching(fragile_url):
    async def impatient():
        async with httpx.AsyncClient(base_url=fragile_url, timeout=0.02) as c:
            return await asyncio.gather(*(c.post(f"/v1/models/{MODEL}:predict", json={"instances": [f"gone {i}"]})
                                          for i in range(40)), return_exceptions=True)

    gone = asyncio.run(impatient())
    assert any(isinstance(x, httpx.TimeoutException) for x in gone)
    # Later traffic, batched as before, is answered promptly and correctly.
    responses = asyncio.run(_post_many(fragile_url, [{"instances": [f"after {i}", "two"]} for i in range(16)], timeout=30))
    assert all(r.status_code == 200 and len(r.json()["predictions"]) == 2 for r in responses)
    assert max(int(r.headers["x-batch-size"]) for r in responses) > 2


def test_replica_killed_under_load_is_replaced_and_nothing_hangs(fragile_url):
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::fragile#{MODEL}#")]
    assert len(names) == 2, names
    victim = ray.get_actor(names[0], namespace="serve")
    outcomes: list[object] = []

    async def load():
        async with httpx.AsyncClient(base_url=fragile_url, timeout=30) as c:
            async def client(k):
                t_end = time.monotonic() + 8
                while time.monotonic() < t_end:
                    try:
                        r = await c.post(f"/v1/models/{MODEL}:predict", json={"instances": [f"c{k}"]})
                        outcomes.append(r.status_code if r.status_code == 200 else (r.status_code, r.json().get("error")))
                    except httpx.TimeoutException:
                        outcomes.append("hang")
            async def killer():
                await asyncio.sleep(2)
                ray.kill(victim, no_restart=True)
            await asyncio.gather(killer(), *(client(k) for k in range(8)))

    t_kill = time.monotonic() + 2
    asyncio.run(load())
    wait_for_condition(lambda: running(MODEL) == 2, timeout=120)
    recovered_s = time.monotonic() - t_kill
    errors = [o for o in outcomes if o != 200]
    print(f"\nreplica kill: {len(outcomes)} requests, {len(errors)} errors {errors[:3]}, "
          f"replaced within {recovered_s:.1f} s of the kill")
    assert "hang" not in outcomes
    # The ingress's census (the plain controller document, not serve.status()) counts the same.
    assert len(ReplicaCensus.read()[("fragile", MODEL)]) == running(MODEL) == 2
    assert all(isinstance(o, tuple) and o[0] >= 500 and o[1] for o in errors)  # clear 5xx, not silence
    # Inference is idempotent, so a request whose replica died is retried once on another one.
    assert outcomes.count(200) >= 0.98 * len(outcomes)


# ------------------------------------------------------------------------------ memory: OOM and token budget


def test_out_of_memory_splits_the_batch_retries_and_lowers_the_cap(base_url):
    """A batch over 4 items raises torch.OutOfMemoryError (injected): every request still gets its
    answer, from halves, and the replica's batch cap comes down to what fit."""
    spec = tiny_bert_spec(
        name="oomy", max_seq_len=32,
        batching={"max_batch_size": 16, "batch_wait_timeout_s": 0.3},
        deployment={"num_replicas": 1, "num_cpus": 0.1},
        limits={"max_batch_tokens": 64},
        faults={"oom_above_items": 4},
    )
    with extra_app(base_url, app_entry("oomy", [spec])) as url:
        async def burst():
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                single = [c.post("/v1/models/oomy:predict", json={"instances": [f"item {i}"]}) for i in range(12)]
                return await asyncio.gather(*single)

        responses = asyncio.run(burst())
        assert [r.status_code for r in responses] == [200] * 12
        assert all(len(r.json()["predictions"]) == 1 for r in responses)
        info = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
        assert info["batching"]["max_batch_size"] <= 4, info["batching"]
        # One request of 8 items now runs as chunks within the lowered cap: all 8 answered, in order.
        texts = [f"row {i}" for i in range(8)]
        r = httpx.post(f"{url}/v1/models/oomy:predict", json={"instances": texts}, timeout=60)
        one_by_one = [httpx.post(f"{url}/v1/models/oomy:predict", json={"instances": [t]}, timeout=60).json()
                      ["predictions"][0]["probabilities"] for t in texts]
        assert r.status_code == 200
        np.testing.assert_allclose([p["probabilities"] for p in r.json()["predictions"]], one_by_one,
                                   rtol=1e-4, atol=1e-5)

        # Token budget (64 per batch): three ~30-token texts are refused before batching, two pass.
        long_text = " ".join(["token"] * 40)  # truncated to max_seq_len 32 tokens
        too_many = httpx.post(f"{url}/v1/models/oomy:predict", json={"instances": [long_text] * 3}, timeout=30)
        assert too_many.status_code == 413, too_many.text
        assert "max_batch_tokens" in too_many.json()["error"]
        fits = httpx.post(f"{url}/v1/models/oomy:predict", json={"instances": [long_text] * 2}, timeout=30)
        assert fits.status_code == 200
        assert httpx.post(f"{url}/v1/models/oomy:predict", json={"instances": ["short"] * 6},
                          timeout=30).status_code == 200


# ------------------------------------------------------------------------------ fuzzing

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=50))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                             st.dictionaries(st.text(max_size=10), inner, max_size=6)),
                          max_leaves=40)
tensor = st.fixed_dictionaries({
    "name": st.one_of(st.sampled_from(["text", "input_ids", "attention_mask"]), st.text(max_size=8), json_value),
    "datatype": st.one_of(st.sampled_from(["BYTES", "INT64", "INT32", "FP32", "BOOL"]), json_value),
    "shape": st.one_of(st.lists(st.integers(min_value=-5, max_value=10**12), max_size=4), json_value),
}, optional={"data": json_value, "parameters": json_value})
v2_body = st.fixed_dictionaries({"inputs": st.one_of(st.lists(tensor, max_size=3), json_value)},
                                optional={"outputs": json_value, "parameters": json_value, "id": json_value})
raw_body = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(str.encode),
    st.sampled_from([b"", b"NaN", b'{"instances": Infinity}', b"[" * 5000, b'{"instances": [NaN]}', b'{"instances": ["\\ud800"]}',
                     b'{"instances": ' + b"[" * 3000 + b"]" * 3000 + b"}"]),
)
cases = st.one_of(
    st.tuples(st.just("v1"), json_value.map(lambda v: {"instances": v})),
    st.tuples(st.just("v1"), json_value),
    st.tuples(st.just("v2"), v2_body),
    st.tuples(st.sampled_from(["v1", "v2"]), raw_body),
)
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))


def _fuzz(base_url: str, examples: int) -> dict[int, int]:
    paths = {"v1": "/v1/models/bert-classifier:predict", "v2": "/v2/models/bert-classifier/infer"}
    counts: dict[int, int] = {}
    client = httpx.Client(base_url=base_url, timeout=30)

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(cases)
    def one(case):
        route, body = case
        if isinstance(body, bytes):
            r = client.post(paths[route], content=body)
        else:
            r = client.post(paths[route], json=body)
        counts[r.status_code] = counts.get(r.status_code, 0) + 1
        assert r.status_code < 500, (route, body, r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert r.json()["error"]

    one()
    client.close()
    return counts


def test_fuzzed_requests_get_only_4xx_and_the_service_still_answers(base_url):
    counts = _fuzz(base_url, FUZZ_EXAMPLES)
    print(f"\nfuzz: {sum(counts.values())} requests, statuses {dict(sorted(counts.items()))}")
    assert sum(counts.values()) >= FUZZ_EXAMPLES
    r = httpx.post(f"{base_url}/v1/models/minilm:predict", json={"instances": ["still fine"]}, timeout=30)
    assert r.status_code == 200 and len(r.json()["predictions"][0]) == 384
    assert not math.isnan(r.json()["predictions"][0][0])


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fuzz_ten_thousand(base_url):
    t0 = time.monotonic()
    counts = _fuzz(base_url, 10_000)
    print(f"\nfuzz (slow): {sum(counts.values())} requests in {time.monotonic() - t0:.0f} s, "
          f"statuses {dict(sorted(counts.items()))}")
    assert sum(counts.values()) >= 10_000
